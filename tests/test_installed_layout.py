"""The daemon laid out as the Debian package installs it, run the way its launcher runs it.

The package puts the modules in a private tree (/usr/share/vhostmd) that only
the launcher's ``sys.path`` names, and runs ``python3 -I``. The test suite
otherwise runs from a virtualenv where ``vhostmd`` is importable from
anywhere, so a helper process that does not get the supervisor's path would
still work here. This test builds the private tree (symbolic links to the
checkout), runs the interpreter with ``-I -S`` (no site directory: nothing
is importable but what the launcher names) and checks that the forkserver's
preload ran and that every process of the daemon has a ``vhostmd:`` title.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import psutil
import pytest

from daemon_harness import Daemon, config_xml, wait_document, wait_for

ROOT = Path(__file__).resolve().parent.parent
# Folder of the checkout -> its place in the installed tree (pyproject's package-dir).
FOLDERS = {"supervisor": "supervisor", "workers": "workers", "disk": "disk",
           "virtio": "virtio", "runtime": "runtime", "guest": "guest", "etc": "etc"}


def private_tree(where: Path) -> Path:
    """``where/vhostmd``: core/'s modules, with each other folder as a subpackage."""
    package = where / "vhostmd"
    package.mkdir(parents=True)
    for module in (ROOT / "core").glob("*.py"):
        (package / module.name).symlink_to(module)
    for folder, name in FOLDERS.items():
        (package / name).symlink_to(ROOT / folder, target_is_directory=True)
    return where


def launcher(tmp: Path) -> Path:
    """A launcher like debian/scripts/vhostmd: the private tree and the libraries, nothing else."""
    tree = private_tree(tmp / "share")
    libraries = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    script = tmp / "vhostmd-launcher"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = {[str(tree), *libraries]!r}\n"
        "from vhostmd.supervisor.cli import main\n"
        "sys.exit(main())\n")
    return script


def title_of(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()).strip()
    except psutil.ZombieProcess:
        return "(exited, not reaped)"
    except psutil.NoSuchProcess:
        return "(gone)"


def test_installed_layout_preloads_the_forkserver_and_titles_every_process(
        tmp_path: Path) -> None:
    import sys

    script = launcher(tmp_path)
    disk = tmp_path / "vhostmd0"
    daemon = Daemon(tmp_path, config_xml(disk, '<builtin set="vhostmd"/>'))
    with daemon.start_with([sys.executable, "-I", "-S", str(script)]):
        wait_document(disk, 15)
        supervisor = psutil.Process(daemon.pid)

        def everything_titles() -> dict[int, str]:
            return {p.pid: title_of(p) for p in [supervisor, *supervisor.children(recursive=True)]}

        def everything_started() -> dict[int, str] | None:
            titles = everything_titles()
            started = (any(t.startswith("vhostmd: worker") for t in titles.values())
                       and any(t.startswith("vhostmd: disk-writer") for t in titles.values()))
            return titles if started else None

        try:
            titles = wait_for(everything_started, 15, "the workers and the disk-writer")
        except AssertionError:
            pytest.fail(f"processes: {everything_titles()}\n{daemon.log()}")
        untitled = {pid: title[:100] for pid, title in titles.items()
                    if not title.startswith("vhostmd: ")}
        assert not untitled, f"processes of the daemon without a vhostmd: title: {untitled}"
        # The forkserver unlinks the queues' semaphores: no resource tracker.
        assert not [t for t in titles.values() if "resource" in t], titles
        forkserver = [pid for pid, title in titles.items() if title == "vhostmd: forkserver"]
        assert len(forkserver) == 1, titles
        # The preload ran: what the children run is in the forkserver, libvirt included.
        maps = Path(f"/proc/{forkserver[0]}/maps").read_text()
        if "libvirt" not in maps:
            pytest.fail("the forkserver has not loaded libvirt: its preload did not run")
        assert daemon.stop() == 0
