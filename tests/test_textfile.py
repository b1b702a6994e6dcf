"""core/textfile.py: atomic writes that never follow a planted link or a swapped directory.

Each attack is played for real on the filesystem: links at the final and at
the temporary name, the directory replaced by a link, a directory swapped
after it was opened, directories others own or may write.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostmd import textfile
from vhostmd.textfile import TextfileError, UnsafeDirectory, write_atomically

CONTENT = b"vhostmd_guest_read_success 1\n"


@pytest.fixture
def target(tmp_path: Path) -> Path:
    directory = tmp_path / "node-exporter"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    return directory


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file an attacker would like us to overwrite."""
    path = tmp_path / "victim"
    path.write_bytes(b"precious\n")
    return path


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_writes_and_replaces_atomically_with_mode_0644(target: Path) -> None:
    path = target / "guest.prom"
    old_umask = os.umask(0o077)  # the mode is set explicitly, not left to the umask
    try:
        write_atomically(str(path), b"old\n")
        write_atomically(str(path), CONTENT)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == CONTENT
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert entries(target) == ["guest.prom"]  # no temporary file left


def test_link_at_the_final_name_is_replaced_not_followed(target: Path, victim: Path) -> None:
    path = target / "guest.prom"
    path.symlink_to(victim)
    write_atomically(str(path), CONTENT)
    assert not path.is_symlink() and path.read_bytes() == CONTENT
    assert victim.read_bytes() == b"precious\n"


def test_link_planted_at_the_temporary_name_is_never_opened(
        target: Path, victim: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = ".guest.prom.0123456789abcdef.tmp"
    (target / planted).symlink_to(victim)
    names: Iterator[str] = iter([planted, planted, ".guest.prom.fresh.tmp"])
    monkeypatch.setattr(textfile, "temp_name", lambda _name: next(names))
    write_atomically(str(target / "guest.prom"), CONTENT)
    assert victim.read_bytes() == b"precious\n"
    assert (target / "guest.prom").read_bytes() == CONTENT
    assert (target / planted).is_symlink()  # left alone, not removed or renamed
    assert entries(target) == sorted([planted, "guest.prom"])


def test_every_temporary_name_taken_is_an_error(
        target: Path, victim: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = ".guest.prom.taken.tmp"
    (target / planted).symlink_to(victim)
    monkeypatch.setattr(textfile, "temp_name", lambda _name: planted)
    with pytest.raises(TextfileError, match="random names all exist"):
        write_atomically(str(target / "guest.prom"), CONTENT)
    assert victim.read_bytes() == b"precious\n"


def test_directory_that_is_a_link_is_refused(tmp_path: Path, target: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UnsafeDirectory, match="symbolic link"):
        write_atomically(str(link / "guest.prom"), CONTENT)
    assert entries(target) == []


def test_directory_swapped_after_it_was_opened_is_not_written_through(
        tmp_path: Path, target: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dir_fd = textfile.open_directory(str(target))
    try:
        # The attacker moves the directory away and puts a link to theirs in its place.
        moved = tmp_path / "moved"
        target.rename(moved)
        target.symlink_to(elsewhere)
        textfile.write_in_directory(dir_fd, "guest.prom", CONTENT, where=str(target))
    finally:
        os.close(dir_fd)
    assert entries(elsewhere) == []
    assert (moved / "guest.prom").read_bytes() == CONTENT


def test_directory_of_another_user_is_refused(target: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    os.chown(target, 65534, 65534)
    with pytest.raises(UnsafeDirectory, match="belongs to uid 65534"):
        write_atomically(str(target / "guest.prom"), CONTENT)
    assert entries(target) == []


def test_directory_others_may_write_is_refused_unless_sticky(target: Path) -> None:
    os.chmod(target, 0o777)
    with pytest.raises(UnsafeDirectory, match="writable by group or others"):
        write_atomically(str(target / "guest.prom"), CONTENT)
    assert entries(target) == []
    os.chmod(target, 0o1777)  # like /tmp: no one else can rename or remove our files
    write_atomically(str(target / "guest.prom"), CONTENT)
    assert (target / "guest.prom").read_bytes() == CONTENT


def test_not_a_directory_and_missing_directory(tmp_path: Path, victim: Path) -> None:
    with pytest.raises(UnsafeDirectory, match="not a directory"):
        write_atomically(str(victim / "guest.prom"), CONTENT)
    with pytest.raises(TextfileError, match="No such file"):
        write_atomically(str(tmp_path / "missing" / "guest.prom"), CONTENT)
    with pytest.raises(TextfileError, match="not a file name"):
        write_atomically(str(tmp_path) + "/", CONTENT)


def test_failed_rename_leaves_no_temporary_file(target: Path) -> None:
    (target / "guest.prom").mkdir()  # rename cannot replace a directory
    with pytest.raises(TextfileError, match="cannot write"):
        write_atomically(str(target / "guest.prom"), CONTENT)
    assert entries(target) == ["guest.prom"]
