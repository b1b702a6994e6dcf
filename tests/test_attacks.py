"""A local user against the daemon, second round: each test plays the attacker.

The attacker is an unprivileged account: `nobody`, or a user made for the test
(useradd) where the daemon runs as that user itself (-u). Real daemons, real
files in world-writable sticky directories (like /dev/shm), real ptrace and
pidfd_getfd calls.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_harness import Daemon, config_xml, metric_xml, wait_for

NANOS = metric_xml("Nanos", "date +%s%N", mtype="uint64")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (other users)")


def as_user(user: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    entry = pwd.getpwnam(user)
    return subprocess.run(list(cmd), user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
                          capture_output=True, text=True, timeout=timeout)


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return as_user("nobody", *cmd)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-writable sticky directory, as /dev/shm is (reachable by nobody)."""
    where = Path(tempfile.mkdtemp(prefix="vhostmd-shm-"))
    os.chmod(where, 0o1777)
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def cycles(daemon: Daemon) -> int:
    return daemon.log().count("DEBUG: cycle ")


def more_cycles(daemon: Daemon, count: int = 2) -> None:
    first = cycles(daemon)
    wait_for(lambda: cycles(daemon) >= first + count, 10, f"{count} more cycles")


# -- 1. the Prometheus textfile ----------------------------------------------------------


@ROOT_ONLY
def test_textfile_is_never_written_through_a_directory_another_user_controls(
        tmp_path: Path) -> None:
    # The Debian layout: /var/lib/prometheus is prometheus's, its node-exporter/ is root's.
    base = Path(tempfile.mkdtemp(prefix="vhostmd-prometheus-"))
    try:
        nobody = pwd.getpwnam("nobody")
        os.chmod(base, 0o755)
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        where = base / "node-exporter"
        where.mkdir(mode=0o755)
        prom = where / "vhostmd.prom"
        secret = tmp_path / "root-only"
        secret.write_bytes(b"root's data\n")
        secret.chmod(0o600)
        conf = config_xml(tmp_path / "vhostmd0", NANOS,
                          globals_extra=f"<textfile>{prom}</textfile>")
        with Daemon(tmp_path, conf) as daemon:
            wait_for(prom.exists, 10, "the textfile")
            # The attacker swaps root's directory for one of its own, full of
            # links to root's file under every name the daemon could use.
            swap = (f"mv {where} {base}/old && mkdir {where} && "
                    f"for n in vhostmd.prom vhostmd.prom.tmp; do ln -s {secret} {where}/$n; done")
            assert as_nobody("sh", "-c", swap).returncode == 0
            daemon.wait_log("not writing the health textfile")
            more_cycles(daemon, 3)
            assert daemon.log().count("not writing the health textfile") == 1
            assert (f"not writing the health textfile {prom}: its directory {where} belongs "
                    f"to uid {nobody.pw_uid}, not to root or uid 0") in daemon.log()
            assert sorted(os.listdir(where)) == ["vhostmd.prom", "vhostmd.prom.tmp"]
            assert secret.read_bytes() == b"root's data\n"
            # A link to a directory of root's is not followed either.
            private = tmp_path / "private"
            private.mkdir()
            link = f"rm -r {where} && ln -s {private} {where}"
            assert as_nobody("sh", "-c", link).returncode == 0
            daemon.wait_log(f"its directory {where} is a symbolic link")
            more_cycles(daemon)
            assert os.listdir(private) == []
            # Root's own directory back: written again.
            assert as_nobody("sh", "-c", f"rm {where} && mv {base}/old {where}").returncode == 0
            daemon.wait_log("written again")
            assert daemon.stop() == 0
        assert [name for name in os.listdir(where) if name != "vhostmd.prom"] == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
