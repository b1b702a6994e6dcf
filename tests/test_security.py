"""Local users, -u, one daemon per disk, logs: what a local attacker and an operator meet.

Real daemons, real files in a world-writable sticky directory (like /dev/shm),
the real unprivileged user `nobody`, and real tmpfs mounts for a full disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostmd import mdisk

import nodes
from daemon_harness import (
    VHOSTMD,
    Daemon,
    config_xml,
    disk_metrics,
    header,
    metric_xml,
    ready_metrics,
    wait_for,
)

NANOS = metric_xml("Nanos", "date +%s%N", mtype="uint64")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (other users, mounts)")


def nanos(disk: Path) -> str | None:
    metrics = ready_metrics(disk)
    return next((m.value for m in metrics or () if m.name == "Nanos"), None)


def updates_resume(disk: Path, timeout: float = 5.0) -> None:
    first = wait_for(lambda: nanos(disk), timeout, "a document")
    wait_for(lambda: (n := nanos(disk)) is not None and n != first, timeout, "a newer document")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-writable sticky directory, as /dev/shm is (reachable by nobody)."""
    where = Path(tempfile.mkdtemp(prefix="vhostmd-shm-"))
    os.chmod(where, 0o1777)
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 96 KiB tmpfs: room for one 64 KiB disk, not for a second one or a 128 KiB one."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where = Path(tempfile.mkdtemp(prefix="vhostmd-tmpfs-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k,mode=0755", "tmpfs",
                              str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def start_fails(tmp: Path, disk: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Start vhostmd on ``disk``, expecting it to refuse.

    A daemon that starts instead (its pid in the pid file: it got past every
    check) is stopped at once and fails the test saying so, rather than
    running until a timeout.
    """
    conf = tmp / "refused.conf"
    conf.write_text(config_xml(disk, NANOS))
    pid_file = tmp / "refused.pid"
    proc = subprocess.Popen([VHOSTMD, "-d", "-f", str(conf), "-p", str(pid_file),
                             "-c", "test:///default", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ended_or_started() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return pid_file.read_text().strip() == str(proc.pid)
        except FileNotFoundError:
            return False

    started = True
    try:
        wait_for(ended_or_started, 30, "vhostmd to refuse or start")
        started = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.terminate()  # a clean stop: the daemon reaps its children
        stdout, stderr = proc.communicate(timeout=30)
    if started:
        raise AssertionError(f"vhostmd started on {disk} instead of refusing it:\n{stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), user="nobody", group="nogroup", extra_groups=[],
                          capture_output=True, text=True, timeout=30)


# -- 1. the disk path --------------------------------------------------------------------


def test_symlink_at_the_disk_path_is_refused(tmp_path: Path, shared_dir: Path) -> None:
    secret = tmp_path / "root-only"
    secret.write_bytes(b"root's data\n")
    secret.chmod(0o600)
    link = shared_dir / "vhostmd0"
    link.symlink_to(secret)
    line = one_line(start_fails(tmp_path, link))
    assert line == (f"vhostmd: metrics disk {link} is a symbolic link; vhostmd does not "
                    "follow links there (name the real file)")
    assert secret.read_bytes() == b"root's data\n"
    # A dangling link (to where the attacker wants a file created) is no better.
    secret.unlink()
    assert "is a symbolic link" in one_line(start_fails(tmp_path, link))
    assert not secret.exists()


@ROOT_ONLY
def test_planted_disk_files_are_refused(tmp_path: Path, shared_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    planted = shared_dir / "vhostmd0"
    created = as_nobody("sh", "-c", f"umask 022; echo fake > {planted}")
    assert created.returncode == 0, created.stderr
    line = one_line(start_fails(tmp_path, planted))
    assert line == (f"vhostmd: metrics disk {planted} belongs to nobody (uid {nobody.pw_uid}), "
                    "not to root (uid 0); remove it or give it to that user")
    assert planted.read_bytes() == b"fake\n"
    planted.unlink()
    # Root's own file, but others may write it: they could forge metrics.
    planted.write_bytes(b"")
    planted.chmod(0o666)
    assert "can be written by group or others (mode 0666)" in one_line(
        start_fails(tmp_path, planted))
    planted.unlink()
    # Absent: created by the daemon itself, readable by QEMU whatever the umask.
    conf = tmp_path / "ok.conf"
    conf.write_text(config_xml(planted, NANOS))
    with Daemon(tmp_path, conf.read_text()) as daemon:
        updates_resume(planted)
        st = planted.stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o644)
        assert daemon.stop() == 0


def test_disk_is_created_0644_whatever_the_umask(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    conf = tmp_path / "u.conf"
    conf.write_text(config_xml(disk, NANOS))
    proc = subprocess.Popen([VHOSTMD, "-d", "-f", str(conf), "-p", str(tmp_path / "u.pid"),
                             "-c", "test:///default"], stderr=subprocess.PIPE,
                            preexec_fn=lambda: os.umask(0o077))
    try:
        updates_resume(disk)
        assert disk.stat().st_mode & 0o777 == 0o644
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_truncated_disk_is_restored_not_a_sigbus_loop(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    with Daemon(tmp_path, config_xml(disk, NANOS)) as daemon:
        updates_resume(disk)
        writer = daemon.child_pid("disk-writer")
        for _ in range(3):  # truncated again and again: one log line each, no crash
            os.truncate(disk, 0)
            wait_for(lambda: disk.stat().st_size == 64 * 1024, 5, "the size restored")
            updates_resume(disk)
        assert daemon.child_pid("disk-writer") == writer
        log = daemon.log()
        assert "SIGBUS" not in log and "died" not in log
        assert log.count(f"metrics disk {disk} was truncated to 0 bytes while in use; "
                         "restored its size of 65536 bytes") == 3
        assert daemon.stop() == 0


def test_truncated_disk_on_a_full_filesystem_is_refused_then_restored(
        tmp_path: Path, small_tmpfs: Path) -> None:
    disk = small_tmpfs / "vhostmd0"
    with Daemon(tmp_path, config_xml(disk, NANOS)) as daemon:
        updates_resume(disk)
        writer = daemon.child_pid("disk-writer")
        os.truncate(disk, 0)
        filler = small_tmpfs / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            f.write(b"x" * (96 * 1024))  # fill it: the disk's blocks are gone
        daemon.wait_log("cannot be restored")
        assert daemon.log().count("cannot be restored") == 1
        filler.unlink()
        updates_resume(disk)
        assert daemon.child_pid("disk-writer") == writer
        assert "SIGBUS" not in daemon.log()
        assert daemon.stop() == 0


# -- 2. one daemon per disk --------------------------------------------------------------


def test_second_daemon_on_the_same_disk_refuses_and_guests_keep_reading(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    with Daemon(tmp_path, config_xml(disk, NANOS)) as first:
        updates_resume(disk)
        second = start_fails(tmp_path, disk)
        assert one_line(second) == (f"vhostmd: metrics disk {disk} is in use by another "
                                    "vhostmd (it holds the disk's lock)")
        assert first.proc is not None and first.proc.poll() is None
        # QEMU's image locks are OFD byte-range locks (fcntl): they do not meet
        # the daemon's flock, so a guest attached to the disk starts and reads.
        with open(disk, "rb") as image:
            for offset, kind in ((100, fcntl.F_RDLCK), (201, fcntl.F_RDLCK)):
                lock = struct.pack("hhqqi", kind, os.SEEK_SET, offset, 1, 0)
                fcntl.fcntl(image, fcntl.F_OFD_SETLK, lock)
            updates_resume(disk)
        assert first.stop() == 0
    # The lock lives with the daemon: once it stopped, the disk is free again.
    with Daemon(tmp_path, config_xml(disk, NANOS), name="again") as again:
        updates_resume(disk)
        assert again.stop() == 0


# -- 3. -u: files stay root's; reloads; imports -------------------------------------------


@ROOT_ONLY
def test_files_stay_roots_under_user_and_reloads_needing_root_are_refused(
        shared_dir: Path) -> None:
    disk = shared_dir / "vhostmd0"
    conf = config_xml(disk, NANOS)
    with Daemon(shared_dir, conf, args=("-u", "nobody")) as daemon:
        updates_resume(disk)
        status = shared_dir / "vhostmd.status"
        for path in (disk, daemon.pid_file, status):
            st = path.stat()
            assert (st.st_uid, st.st_mode & 0o022) == (0, 0), path
            # nobody (what the daemon runs as) can neither forge a pid nor metrics.
            denied = as_nobody("sh", "-c", f"echo 1 > {path}")
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, path
        out = subprocess.run([VHOSTMD, "--status", "-p", str(daemon.pid_file)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and f"running, pid {daemon.pid}" in out.stdout
        # A new disk path needs root: that part of the reload is refused, the rest applies.
        moved = shared_dir / "vhostmd1"
        daemon.conf.write_text(config_xml(moved, NANOS + metric_xml("New", "echo 2",
                                                                    mtype="uint32")))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("still writing")
        refused = [x for x in daemon.log().splitlines() if "reload:" in x]
        assert len(refused) == 1 and (
            f"reload: opening metrics disk {moved} needs root, and vhostmd runs as nobody (-u); "
            f"restart vhostmd to use it; still writing {disk} (65536 bytes)") in refused[0]
        wait_for(lambda: "New" in {m.name for m in disk_metrics(disk)}, 6, "the new metric")
        assert not moved.exists()
        # A new size of the same disk needs no root: the held descriptor resizes it.
        daemon.conf.write_text(config_xml(disk, NANOS, size_k=128))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: disk.stat().st_size == 128 * 1024, 6, "the disk resized")
        updates_resume(disk)
        assert disk.stat().st_uid == 0
        assert daemon.stop() == 0


@ROOT_ONLY
def test_stale_pid_file_of_another_user_is_replaced(shared_dir: Path) -> None:
    # Left by an older vhostmd that chowned it for -u, or planted: its owner
    # could write a pid of their choice into it for `stop` to signal.
    pid_file = shared_dir / "vhostmd.pid"
    planted = as_nobody("sh", "-c", f"umask 022; echo 1 > {pid_file}")
    assert planted.returncode == 0, planted.stderr
    disk = shared_dir / "vhostmd0"
    with Daemon(shared_dir, config_xml(disk, NANOS)) as daemon:
        updates_resume(disk)
        assert daemon.pid_file == pid_file
        st = pid_file.stat()
        assert (st.st_uid, st.st_mode & 0o022) == (0, 0)
        assert pid_file.read_text() == f"{daemon.pid}\n"
        assert daemon.stop() == 0
    assert not pid_file.exists()


def test_reload_to_a_disk_that_cannot_be_opened_keeps_the_old_one(
        tmp_path: Path, shared_dir: Path) -> None:
    disk = tmp_path / "vhostmd0"
    link = shared_dir / "vhostmd1"
    link.symlink_to(tmp_path / "elsewhere")
    with Daemon(tmp_path, config_xml(disk, NANOS)) as daemon:
        updates_resume(disk)
        assert daemon.proc is not None
        daemon.conf.write_text(config_xml(link, NANOS))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("still writing")
        assert f"reload: metrics disk {link} is a symbolic link" in daemon.log()
        updates_resume(disk)
        assert not (tmp_path / "elsewhere").exists()
        if os.geteuid() == 0:  # a file planted by another user: the same
            planted = shared_dir / "vhostmd2"
            assert as_nobody("sh", "-c", f"umask 022; : > {planted}").returncode == 0
            daemon.conf.write_text(config_xml(planted, NANOS))
            daemon.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: daemon.log().count("still writing") == 2, 10, "a second refusal")
            assert f"reload: metrics disk {planted} belongs to nobody" in daemon.log()
            updates_resume(disk)
            assert planted.stat().st_size == 0
        assert daemon.stop() == 0


def test_reload_to_a_full_filesystem_keeps_publishing_to_the_old_disk(
        tmp_path: Path, small_tmpfs: Path) -> None:
    disk = tmp_path / "vhostmd0"
    full = small_tmpfs / "vhostmd0"
    with Daemon(tmp_path, config_xml(disk, NANOS)) as daemon:
        updates_resume(disk)
        writer = daemon.child_pid("disk-writer")
        assert daemon.proc is not None
        daemon.conf.write_text(config_xml(full, NANOS, size_k=128))  # tmpfs holds 96 KiB
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("still writing")
        line = next(x for x in daemon.log().splitlines() if "reload:" in x)
        assert line.endswith(f"reload: cannot make metrics disk {full} 131072 bytes long: "
                             f"No space left on device; still writing {disk} (65536 bytes)")
        assert not full.exists()  # no half-made disk left behind
        updates_resume(disk)
        assert daemon.child_pid("disk-writer") == writer
        # A disk that fits is switched to, once open.
        daemon.conf.write_text(config_xml(full, NANOS, size_k=64))
        daemon.proc.send_signal(signal.SIGHUP)
        updates_resume(full)
        assert daemon.stop() == 0


def test_status_file_lock_never_stalls_the_daemon_nor_shows_half_a_file(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    with Daemon(tmp_path, config_xml(disk, NANOS)) as daemon:
        updates_resume(disk)
        status = tmp_path / "vhostmd.status"
        cmd = [VHOSTMD, "--status", "-p", str(daemon.pid_file)]
        wait_for(lambda: subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0,
                 5, "a status")
        with open(status, "rb") as held:
            # Any user can hold a shared lock on the (world-readable) file for
            # ever: the supervisor skips its rewrites, and publishes as usual.
            fcntl.flock(held, fcntl.LOCK_SH)
            frozen = status.read_bytes()
            updates_resume(disk)
            updates_resume(disk)
            assert status.read_bytes() == frozen
            # A writer mid-rewrite (exclusive lock): --status waits, then says so.
            fcntl.flock(held, fcntl.LOCK_EX)
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            assert out.returncode == 4
            assert out.stdout.strip() == (f"vhostmd is running (pid {daemon.pid}) but {status} "
                                          "is locked by its writer for too long")
        wait_for(lambda: status.read_bytes() != frozen, 5, "the status rewritten again")
        assert daemon.stop() == 0


def _copy_site_package(name: str, into: Path) -> None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    origin = Path(spec.origin)
    if spec.submodule_search_locations:
        shutil.copytree(origin.parent, into / origin.parent.name)
    else:
        shutil.copy2(origin, into / origin.name)


@ROOT_ONLY
def test_user_option_from_a_tree_only_root_can_read_is_refused_clearly(tmp_path: Path) -> None:
    """-u with a checkout and packages only root can read: one clear line, no traceback.

    The supervisor imports what it runs before it drops root, but children
    are started by a forkserver that runs as the -u user and imports what
    they run itself: it could not, so the daemon refuses to start.
    """
    tree = Path(tempfile.mkdtemp(prefix="vhostmd-private-"))
    try:
        os.chmod(tree, 0o700)
        lib = tree / "lib"
        pkg = lib / "vhostmd"
        source = Path(__file__).resolve().parent.parent
        # The layout that pyproject.toml's package-dir maps the checkout to.
        shutil.copytree(source / "core", pkg, ignore=shutil.ignore_patterns("__pycache__"))
        for folder in ("supervisor", "workers", "disk", "virtio", "runtime", "guest", "etc"):
            shutil.copytree(source / folder, pkg / folder,
                            ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("libvirt", "libvirtmod", "psutil", "lxml", "setproctitle"):
            _copy_site_package(name, lib)
        disk = tree / "vhostmd0"
        conf = tree / "p.conf"
        conf.write_text(config_xml(disk, NANOS + '<builtin set="vhostmd"/>'))
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(lib)}
        # -S: no site-packages, so nothing is found outside the private tree.
        result = subprocess.run(
            [sys.executable, "-S", "-m", "vhostmd.supervisor.cli", "-d", "-f", str(conf),
             "-p", str(tree / "p.pid"), "-c", "test:///default", "-u", "nobody"],
            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            timeout=60)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr
        refusal = [line for line in result.stderr.splitlines() if line.startswith("vhostmd: ")]
        assert len(refusal) == 1, result.stderr
        assert f"-u nobody: cannot read {tree}" in refusal[0]
        assert "install vhostmd where nobody can read it" in refusal[0]
        # Unlocked and empty (nobody may not unlink in the 0700 directory): no stale pid.
        pid_file = tree / "p.pid"
        assert not pid_file.exists() or pid_file.read_text() == ""
    finally:
        shutil.rmtree(tree, ignore_errors=True)


# -- 4. logs -------------------------------------------------------------------------------


@ROOT_ONLY
def test_daemon_without_syslog_says_where_it_logs(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private /var/log")
    disk = tmp_path / "vhostmd0"
    conf = tmp_path / "l.conf"
    conf.write_text(config_xml(disk, NANOS))
    pid_file = tmp_path / "l.pid"
    # A private mount namespace: its own empty /var/log, and no syslog socket.
    hide = "[ -e /dev/log ] && mount --bind /dev/null /dev/log; "
    script = (f"mount -t tmpfs tmpfs /var/log && {hide}exec {VHOSTMD} -f {conf} "
              f"-p {pid_file} -c test:///default -u nobody")
    started = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                              script], capture_output=True, text=True, timeout=30)
    if started.returncode != 0 and "unshare" in started.stderr:
        pytest.skip(f"cannot make a mount namespace here: {started.stderr.strip()}")
    assert started.returncode == 0, started.stderr
    assert started.stderr.strip() == ("vhostmd: logging to /var/log/vhostmd.log "
                                      "(no syslog at /dev/log)")
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 5, "pid"))
    try:
        log_file = Path(f"/proc/{pid}/root/var/log/vhostmd.log")
        text = wait_for(lambda: log_file.exists() and "running as nobody" in
                        log_file.read_text() and log_file.read_text(), 5, "the log")
        assert f"vhostmd 2.0.0 starting: -f {conf} -p {pid_file} -c test:///default " \
               "-u nobody" in text
        st = log_file.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o640)
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "the daemon to exit")


def test_log_file_option_refuses_a_symlink(tmp_path: Path, shared_dir: Path) -> None:
    link = shared_dir / "vhostmd.log"
    link.symlink_to(tmp_path / "target")
    conf = tmp_path / "s.conf"
    conf.write_text(config_xml(tmp_path / "vhostmd0", NANOS))
    proc = subprocess.run([VHOSTMD, "-f", str(conf), "-p", str(tmp_path / "s.pid"),
                           "-c", "test:///default", "--log-file", str(link)],
                          capture_output=True, text=True, timeout=30)
    assert one_line(proc) == (f"vhostmd: log file {link} is a symbolic link; vhostmd does not "
                              "follow links there (name the real file)")
    assert not (tmp_path / "target").exists()


def test_journal_gets_priorities_and_no_timestamp(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    conf = tmp_path / "j.conf"
    conf.write_text(config_xml(disk, NANOS + metric_xml("Broken", "exit 3", mtype="uint32")))
    err = tmp_path / "stderr"
    with open(err, "wb") as stream:
        st = os.fstat(stream.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = subprocess.Popen([VHOSTMD, "-d", "-f", str(conf), "-p", str(tmp_path / "j.pid"),
                                 "-c", "test:///default"], stderr=stream, env=env)
        try:
            wait_for(lambda: "left out" in err.read_text(), 10, "a warning")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
    lines = err.read_text().splitlines()
    assert lines and all(re.match(r"<[0-7]>vhostmd\[\d+\] ", x) for x in lines), lines
    assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", x) for x in lines), lines
    assert any(x.startswith("<4>") and "host metric Broken left out" in x for x in lines)
    assert any(x.startswith("<6>") and "starting: -d -f" in x for x in lines)


def test_long_vm_names_are_cut_in_log_lines(tmp_path: Path) -> None:
    plain = "v" * 200
    odd = "o" * 199 + "!"
    uri, _ = nodes.write_node(tmp_path / "node.xml", 0, names=[plain, odd])
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, metric_xml("Broken", "exit 3", mtype="uint32", context="vm"))
    with Daemon(tmp_path, conf, uri=uri) as daemon:
        daemon.wait_log("VM name is not plain")
        daemon.wait_log("vm metric Broken of domain id")
        assert daemon.stop() == 0
    log = daemon.log()
    assert plain not in log and odd[:100] not in log
    assert f"'{'v' * 64}...'" in log and f"'{'o' * 64}...'" in log
    assert max(len(x) for x in log.splitlines()) < 400


# -- 5. --check -----------------------------------------------------------------------------


def test_check_counts_builtin_metrics() -> None:
    shipped = Path(__file__).resolve().parent.parent / "etc" / "vhostmd.conf"
    listing = subprocess.run([VHOSTMD, "--list-builtins"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    rows = [x.split() for x in listing.splitlines() if re.match(r"\w+ +(host|vm) ", x)]
    selected = [r for r in rows if {"sap", "vhostmd"} & set(r[4].split(","))]
    assert selected
    out = subprocess.run([VHOSTMD, "--check", "-f", str(shipped)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f": OK ({len(selected)} metrics, transports vbd, virtio)" in out.stdout


# -- 6. nothing stale after the document -----------------------------------------------------


def test_bytes_after_a_shorter_document_are_zero(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    value = tmp_path / "value"
    value.write_text("secret-of-a-vm-now-gone-" * 100)
    conf = config_xml(disk, NANOS + metric_xml("Text", f"cat {value}"))
    with Daemon(tmp_path, conf) as daemon:
        wait_for(lambda: any(m.name == "Text" for m in ready_metrics(disk) or ()), 10,
                 "the long document")
        long_end = mdisk.HEADER_SIZE + header(disk).length
        value.write_text("short")
        wait_for(lambda: [m.value for m in ready_metrics(disk) or () if m.name == "Text"]
                 == ["short"], 10, "the short document")
        raw = disk.read_bytes()
        end = mdisk.HEADER_SIZE + header(disk).length
        assert end < long_end
        assert raw[end:] == bytes(len(raw) - end)
        assert b"secret-of-a-vm" not in raw
        assert daemon.stop() == 0


# -- the disk handle through a forkserver ----------------------------------------------------


def _report_size(handle: object, answer: object) -> None:
    answer.put(os.fstat(handle.fd).st_size)  # type: ignore[attr-defined]


def test_disk_handle_travels_through_a_forkserver(tmp_path: Path) -> None:
    import multiprocessing

    from vhostmd.disk.handle import DiskRefused, open_disk

    handle = open_disk(str(tmp_path / "vhostmd0"), 65536)
    ctx = multiprocessing.get_context("forkserver")
    answer = ctx.SimpleQueue()
    child = ctx.Process(target=_report_size, args=(handle, answer))
    child.start()
    try:
        assert answer.get() == 65536
        with pytest.raises(DiskRefused, match="in use by another vhostmd"):
            open_disk(str(tmp_path / "vhostmd0"), 65536)  # the lock stays here
    finally:
        child.join(15)
        handle.close()
    open_disk(str(tmp_path / "vhostmd0"), 65536).close()  # and is let go with the handle
