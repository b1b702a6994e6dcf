"""A local user against the daemon, second round: each test plays the attacker.

The attacker is an unprivileged account: `nobody`, or a user made for the test
(useradd) where the daemon runs as that user itself (-u). Real daemons, real
files in world-writable sticky directories (like /dev/shm), real ptrace and
pidfd_getfd calls.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

import psutil
import pytest

from vhostmd import mdisk

from daemon_harness import (
    VHOSTMD,
    Daemon,
    config_xml,
    metric_xml,
    ready_metrics,
    updates_resume,
    virtio_xml,
    wait_for,
)

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
            more_cycles(daemon, 2)
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
            more_cycles(daemon, 1)
            assert os.listdir(private) == []
            # Root's own directory back: written again.
            assert as_nobody("sh", "-c", f"rm {where} && mv {base}/old {where}").returncode == 0
            daemon.wait_log("written again")
            assert daemon.stop() == 0
        assert [name for name in os.listdir(where) if name != "vhostmd.prom"] == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- 2. -u USER: no process of the daemon is USER's to trace --------------------------------

ATTACKER = "vhostmd-test-u"

# Run as the -u user against each pid given: every way the first round's
# attacker got at the disk-writer's descriptors and memory. Prints one line
# per pid and way that worked.
TRACE_ATTEMPTS = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
PTRACE_ATTACH, PTRACE_DETACH, SYS_PIDFD_GETFD = 16, 17, 438
for pid in map(int, sys.argv[1:]):
    try:
        with open(f"/proc/{pid}/mem", "rb") as mem:
            print(pid, "mem opened")
    except OSError:
        pass
    try:
        print(pid, "fds listed", os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        continue
    for fd in range(64):
        got = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got >= 0:
            print(pid, "fd taken", fd, os.readlink(f"/proc/self/fd/{got}"))
    os.close(pidfd)
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
        print(pid, "attached")
        os.waitpid(pid, 0)
        libc.ptrace(PTRACE_DETACH, pid, None, None)
print("done")
"""


@pytest.fixture(scope="module")
def test_user() -> Iterator[str]:
    """A system account made for the test (-u runs the daemon as it), removed after."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd(8)")
    subprocess.run(["userdel", ATTACKER], capture_output=True, check=False)  # a leftover
    made = subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                           "--shell", "/usr/sbin/nologin", ATTACKER],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot add a user: {made.stderr.strip()}")
    try:
        yield ATTACKER
    finally:
        subprocess.run(["userdel", ATTACKER], capture_output=True, check=False)


def daemon_processes(daemon: Daemon) -> dict[int, str]:
    root = psutil.Process(daemon.pid)
    found = {root.pid: " ".join(root.cmdline())}
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            found[child.pid] = " ".join(child.cmdline())
    return found


def test_user_option_user_can_trace_no_process_of_the_daemon(
        test_user: str, shared_dir: Path) -> None:
    disk = shared_dir / "vhostmd0"
    channels = shared_dir / "channels"
    channels.mkdir()
    conf = config_xml(disk, NANOS, transports=("vbd", "virtio"),
                      globals_extra=virtio_xml(channels))
    script = shared_dir / "attempts.py"
    script.write_text(TRACE_ATTEMPTS)
    script.chmod(0o644)
    with Daemon(shared_dir, conf, args=("-u", test_user)) as daemon:
        updates_resume(disk)
        for role in ("forkserver", "worker", "disk-writer", "virtio"):
            daemon.child_pid(role)
        processes = daemon_processes(daemon)
        tried = as_user(test_user, sys.executable, str(script), *map(str, processes))
        assert tried.returncode == 0, tried.stderr
        assert tried.stdout.splitlines() == ["done"], (tried.stdout, processes)
        # Each runs as the user all the same: none is left to root.
        users = {pid: psutil.Process(pid).uids().real for pid in processes}
        assert {pid for pid, uid in users.items()
                if uid != pwd.getpwnam(test_user).pw_uid} == set(), processes
        updates_resume(disk)
        assert daemon.stop() == 0
    # Nothing of the daemon outlives it.
    assert not [pid for pid in processes if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


# -- 3. locks another user can take; the init script's pid --------------------------------

HOLD_LOCK = r"""
import fcntl, os, sys, time
fds = [os.open(path, os.O_RDONLY) for path in sys.argv[1:]]
for fd in fds:
    fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def hold_locks(user: str, *paths: Path) -> subprocess.Popen[str]:
    """A process of ``user`` holding an exclusive flock on each of ``paths`` (read access only)."""
    entry = pwd.getpwnam(user)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, *map(str, paths)],
                              user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


@ROOT_ONLY
def test_a_users_flock_keeps_no_daemon_from_starting(shared_dir: Path) -> None:
    disk = shared_dir / "vhostmd0"
    vm_dir = shared_dir / "vms"
    conf = config_xml(disk, NANOS, globals_extra=f"<vm_disks><path>{vm_dir}</path></vm_disks>")
    with Daemon(shared_dir, conf, name="first") as daemon:
        updates_resume(disk)
        assert daemon.stop() == 0
    # The disk, the VM disk directory and the pid file are world-readable:
    # nobody flocks them all, as the first round's attacker did.
    pid_file = shared_dir / "again.pid"
    pid_file.write_text("1\n")
    holder = hold_locks("nobody", disk, vm_dir, pid_file)
    try:
        with Daemon(shared_dir, conf, name="again") as daemon:
            updates_resume(disk)
            assert pid_file.read_text() == f"{daemon.pid}\n"
            # ... and a second vhostmd is still refused: the lock that counts is root's.
            second = subprocess.run([VHOSTMD, "-d", "-f", str(daemon.conf), "-p",
                                     str(shared_dir / "second.pid"), "-c", "test:///default"],
                                    capture_output=True, text=True, timeout=30)
            assert second.returncode == 1
            assert second.stderr.strip() == (f"vhostmd: metrics disk {disk} is in use by "
                                             "another vhostmd (it holds the disk's lock)")
            assert daemon.stop() == 0
    finally:
        holder.kill()
        holder.wait()


OLDER_DAEMON = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, f"{os.getpid()}\n".encode())
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


@ROOT_ONLY
def test_a_pid_file_locked_by_a_vhostmd_without_roots_lock_file_is_still_respected(
        tmp_path: Path) -> None:
    # An older vhostmd (before the lock files) holds the pid file as the daemon
    # does: locked, open for writing, its pid inside. Not an impostor.
    pid_file = tmp_path / "old.pid"
    older = subprocess.Popen([sys.executable, "-c", OLDER_DAEMON, str(pid_file)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert older.stdout is not None and older.stdout.readline() == "locked\n"
        conf = tmp_path / "o.conf"
        conf.write_text(config_xml(tmp_path / "vhostmd0", NANOS))
        refused = subprocess.run([VHOSTMD, "-d", "-f", str(conf), "-p", str(pid_file),
                                  "-c", "test:///default"], capture_output=True, text=True,
                                 timeout=30)
        assert (refused.returncode, refused.stderr.strip()) == (
            1, f"vhostmd: another vhostmd is running (pid {older.pid}, pid file {pid_file})")
        assert pid_file.read_text() == f"{older.pid}\n"
    finally:
        older.kill()
        older.wait()


def _set_subreaper(on: bool) -> None:
    import ctypes

    pr_set_child_subreaper = 36
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, int(on), 0, 0, 0)


def _take_pid(pid: int) -> subprocess.Popen[bytes] | None:
    """A root process with ``pid`` (freed before), through ns_last_pid; None if others raced."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as last:
            last.write(str(pid - 1))
        proc = subprocess.Popen(["sleep", "600"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


@ROOT_ONLY
def test_init_script_never_signals_a_pid_that_is_not_the_daemon(
        test_user: str, shared_dir: Path, tmp_path: Path) -> None:
    if not Path("/lib/lsb/init-functions").exists() or Path("/run/systemd/system").exists():
        pytest.skip("needs /lib/lsb/init-functions, and no systemd (it would take the commands)")
    source = Path(__file__).resolve().parent.parent / "etc" / "vhostmd.init"
    defaults = tmp_path / "default"
    pid_file = shared_dir / "vhostmd.pid"
    disk = shared_dir / "vhostmd0"
    conf = tmp_path / "vhostmd.conf"
    conf.write_text(config_xml(disk, NANOS))
    defaults.write_text(f'VHOSTMD_CONFIG={conf}\nVHOSTMD_URI=test:///default\n'
                        f'VHOSTMD_PIDFILE={pid_file}\nVHOSTMD_STOP_TIMEOUT=10\n'
                        f'VHOSTMD_OPTIONS="-u {test_user} --log-file {tmp_path}/log"\n')
    # The installed script, pointed at this checkout's vhostmd and these defaults.
    init = tmp_path / "vhostmd.init"
    init.write_text(source.read_text().replace("DAEMON=/usr/sbin/vhostmd", f"DAEMON={VHOSTMD}")
                    .replace("/etc/default/vhostmd", str(defaults)))
    init.chmod(0o755)

    def command(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(init), name], capture_output=True, text=True, timeout=60)

    # Where pid 1 reaps no orphans (containers), the killed daemon must be ours
    # to reap, or its pid is never free again.
    _set_subreaper(True)
    holder = victim = None
    try:
        assert command("start").returncode == 0
        pid = int(wait_for(lambda: pid_file.read_text().strip(), 10, "the pid"))
        updates_resume(disk)
        assert command("status").returncode == 0
        # The -u user kills its daemon (same uid), and locks the stale pid file.
        children = psutil.Process(pid).children(recursive=True)
        assert as_user(test_user, "kill", "-KILL", str(pid)).returncode == 0
        os.waitpid(pid, 0)
        # Its children go with it (none keeps root's disk open for ever).
        wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                                 for c in children), 10, "the children to end")
        holder = hold_locks(test_user, pid_file)
        status = command("status")
        assert (status.returncode, "is not running, but" in status.stdout) == (1, True), status
        shown = subprocess.run([VHOSTMD, "--status", "-p", str(pid_file)], capture_output=True,
                               text=True, timeout=30)
        assert (shown.returncode, shown.stdout.strip()) == (
            1, f"vhostmd is not running (stale pid file {pid_file})")
        # A root process gets the dead daemon's pid: never signalled.
        victim = _take_pid(pid)
        if victim is not None:
            assert command("status").returncode == 1
        stopped = command("stop")
        assert stopped.returncode == 0 and "not running" in stopped.stdout, stopped
        if victim is not None:
            assert victim.poll() is None, "stop signalled a process that is not vhostmd"
        # start is not fooled either: it starts a daemon, which replaces the pid file.
        started = command("start")
        assert started.returncode == 0 and "already running" not in started.stdout, started
        new_pid = int(wait_for(lambda: pid_file.read_text().strip(), 10, "the new pid"))
        assert new_pid != pid
        assert command("status").returncode == 0
        assert command("stop").returncode == 0
        assert not psutil.pid_exists(new_pid) or \
            psutil.Process(new_pid).status() == psutil.STATUS_ZOMBIE
    finally:
        for proc in (holder, victim):
            if proc is not None:
                proc.kill()
                proc.wait()
        if pid_file.exists():
            command("stop")
        _set_subreaper(False)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:  # what was reparented to us meanwhile
                pass


# -- 4. an existing file named as the disk ---------------------------------------------------


def test_existing_file_that_is_not_a_metrics_disk_is_never_adopted(tmp_path: Path) -> None:
    disk = tmp_path / "passwd-copy"
    original = Path("/etc/passwd").read_bytes()
    disk.write_bytes(original)
    disk.chmod(0o644)
    conf = tmp_path / "typo.conf"
    conf.write_text(config_xml(disk, NANOS))
    refusal = (f"vhostmd: metrics disk {disk} already holds something else (not a metrics "
               "disk, not empty or zeros); not overwriting it: remove it or name another path")
    checked = subprocess.run([VHOSTMD, "--check", "-f", str(conf)], capture_output=True,
                             text=True, timeout=30)
    assert (checked.returncode, checked.stderr.strip(), checked.stdout) == (1, refusal, "")
    started = subprocess.run([VHOSTMD, "-d", "-f", str(conf), "-p", str(tmp_path / "t.pid"),
                              "-c", "test:///default"], capture_output=True, text=True,
                             timeout=30)
    assert (started.returncode, started.stderr.strip()) == (1, refusal)
    assert disk.read_bytes() == original
    # Zeros (fallocate, truncate) and an old metrics disk are adopted.
    for content in (b"", bytes(4096), mdisk.pack_header(0, 0, 0) + b"old"):
        disk.write_bytes(content)
        checked = subprocess.run([VHOSTMD, "--check", "-f", str(conf)], capture_output=True,
                                 text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
    with Daemon(tmp_path, conf.read_text()) as daemon:
        updates_resume(disk)
        assert daemon.stop() == 0


# -- 5. smaller findings -----------------------------------------------------------------------


def test_fifo_at_the_pid_file_path_is_one_line_and_status_never_blocks(tmp_path: Path) -> None:
    pid_file = tmp_path / "vhostmd.pid"
    os.mkfifo(pid_file)
    conf = tmp_path / "f.conf"
    conf.write_text(config_xml(tmp_path / "vhostmd0", NANOS))
    started = subprocess.run([VHOSTMD, "-d", "-f", str(conf), "-p", str(pid_file),
                              "-c", "test:///default"], capture_output=True, text=True,
                             timeout=30)
    assert (started.returncode, started.stderr.strip()) == (
        1, f"vhostmd: pid file {pid_file} is not a regular file; remove it")
    assert not (tmp_path / "vhostmd.status").exists()
    shown = subprocess.run([VHOSTMD, "--status", "-p", str(pid_file)], capture_output=True,
                           text=True, timeout=30)
    assert shown.returncode in (1, 3) and "not running" in shown.stdout
    # A FIFO where a running daemon's status file was: --status says so, at once.
    pid_file.unlink()
    with Daemon(tmp_path, conf.read_text()) as daemon:
        status = tmp_path / "vhostmd.status"
        wait_for(status.exists, 10, "the status file")
        status.unlink()
        os.mkfifo(status)
        shown = subprocess.run([VHOSTMD, "--status", "-p", str(daemon.pid_file)],
                               capture_output=True, text=True, timeout=30)
        assert (shown.returncode, shown.stdout.strip()) == (
            4, f"vhostmd is running (pid {daemon.pid}) but {status} is not a regular file")
        assert daemon.stop() == 0


@pytest.mark.parametrize("config", ["/dev/zero", "/dev/null", "fifo", "huge"])
def test_config_that_is_not_a_regular_file_or_too_large_is_one_line(
        tmp_path: Path, config: str) -> None:
    path = Path(config)
    if config == "fifo":
        path = tmp_path / "fifo.conf"
        os.mkfifo(path)
    elif config == "huge":
        path = tmp_path / "huge.conf"
        with open(path, "wb") as huge:
            huge.truncate(64 * 2**20)
    for args in (["--check"], ["-d", "-p", str(tmp_path / "c.pid"), "-c", "test:///default"]):
        proc = subprocess.run([VHOSTMD, *args, "-f", str(path)], capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 1
        why = ("config is larger than 4 MiB; not reading it" if config == "huge" else
               "cannot read config: not a regular file")
        assert proc.stderr.strip() == f"vhostmd: {path}: {why}", proc.stderr


def test_actions_escaping_with_setsid_end_with_the_daemon_and_are_named_once(
        tmp_path: Path) -> None:
    # One escapes and keeps running until its timeout (so a stop finds it
    # running), one escapes and returns at once, one is innocent. Fast returns
    # only once its sleep has left the session: the kill of its group, right
    # after it returns, could otherwise catch the sleep before its setsid.
    slow = "setsid sleep 1000.41 &gt;/dev/null 2&gt;&amp;1 &amp; sleep 5; echo 1"
    left = tmp_path / "left"
    fast = escape(f"rm -f {left}; setsid -f sh -c 'echo $$ > {left}; exec sleep 1000.42' "
                  f">/dev/null 2>&1; while [ ! -s {left} ]; do sleep 0.01; done; echo 1")
    conf = config_xml(tmp_path / "vhostmd0", metric_xml("Slow", slow, mtype="uint32")
                      + metric_xml("Fast", fast, mtype="uint32")
                      + metric_xml("Innocent", "echo 1", mtype="uint32"))

    def escaped() -> list[int]:
        return [p.pid for p in psutil.process_iter(["cmdline"])
                if (p.info["cmdline"] or [""])[-1] in ("1000.41", "1000.42")]

    with Daemon(tmp_path, conf) as daemon:
        wait_for(lambda: cycles(daemon) >= 3, 15, "three cycles")
        daemon.wait_log("action Slow left")
        assert daemon.stop() == 0
    wait_for(lambda: not escaped(), 5, "no escaped process after the stop")
    lines = [x.split(": WARNING: ")[1] for x in daemon.log().splitlines() if " left " in x
             and "behind" in x]
    assert sorted(lines) == [
        f"action {name} left 1 process(es) behind in other sessions; killed them "
        "(said once per action)" for name in ("Fast", "Slow")], lines


@ROOT_ONLY
def test_disk_removed_while_in_use_is_made_again_never_adopted_from_another_user(
        shared_dir: Path) -> None:
    disk = shared_dir / "vhostmd0"
    with Daemon(shared_dir, config_xml(disk, NANOS)) as daemon:
        updates_resume(disk)
        # Removed (by root), and a local user quick to plant a file there: as
        # one step (a rename over it), so that the daemon cannot come first.
        planted = shared_dir / "planted"
        assert as_nobody("sh", "-c", f"umask 022; echo fake > {planted}").returncode == 0
        os.rename(planted, disk)
        daemon.wait_log(f"metrics disk {disk} was removed while in use; cannot make it again: "
                        f"metrics disk {disk} belongs to nobody")
        more_cycles(daemon, 2)
        assert daemon.log().count("was removed while in use") == 1
        assert disk.read_bytes() == b"fake\n"
        disk.unlink()
        daemon.wait_log(f"metrics disk {disk} was removed while in use; made it again")
        updates_resume(disk)
        st = disk.stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o644)
        assert daemon.stop() == 0


@ROOT_ONLY
def test_disk_paths_whose_directories_another_user_can_change_are_refused(
        tmp_path: Path, shared_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    private = tmp_path / "private"
    private.mkdir()
    # A link of nobody's on the way (into a directory of root's), nobody's own
    # directory, a directory root's group may write.
    assert as_nobody("ln", "-s", str(private), str(shared_dir / "link")).returncode == 0
    assert as_nobody("mkdir", "-m", "755", str(shared_dir / "mine")).returncode == 0
    group_writable = tmp_path / "group"
    group_writable.mkdir()
    group_writable.chmod(0o775)
    cases = {
        shared_dir / "link" / "vhostmd0":
            f"{shared_dir}/link is a symbolic link that belongs to nobody (uid "
            f"{nobody.pw_uid}); vhostmd only follows links of root's",
        shared_dir / "mine" / "vhostmd0":
            f"its directory {shared_dir}/mine belongs to nobody (uid {nobody.pw_uid}), who "
            "could replace what vhostmd puts there; use a directory of root's",
        group_writable / "vhostmd0":
            f"its directory {group_writable} can be written by group or others (mode 0775); "
            "chmod go-w it",
    }
    for disk, why in cases.items():
        conf = tmp_path / "p.conf"
        conf.write_text(config_xml(disk, NANOS))
        proc = subprocess.run([VHOSTMD, "-d", "-f", str(conf), "-p", str(tmp_path / "p.pid"),
                               "-c", "test:///default"], capture_output=True, text=True,
                              timeout=30)
        assert (proc.returncode, proc.stderr.strip()) == (
            1, f"vhostmd: metrics disk {disk}: {why}")
        checked = subprocess.run([VHOSTMD, "--check", "-f", str(conf)], capture_output=True,
                                 text=True, timeout=30)
        assert (checked.returncode, checked.stderr.strip()) == (
            1, f"vhostmd: metrics disk {disk}: {why}")
        # The same for the directory of per-VM disks.
        vms = disk.parent / "vms"
        conf.write_text(config_xml(tmp_path / "vhostmd0", NANOS,
                                   globals_extra=f"<vm_disks><path>{vms}</path></vm_disks>"))
        proc = subprocess.run([VHOSTMD, "-d", "-f", str(conf), "-p", str(tmp_path / "p.pid"),
                               "-c", "test:///default"], capture_output=True, text=True,
                              timeout=30)
        assert (proc.returncode, proc.stderr.strip()) == (
            1, f"vhostmd: VM disk directory {vms}: {why.replace('vhostmd0', 'vms')}")
    assert os.listdir(private) == [] and os.listdir(shared_dir / "mine") == []
    assert os.listdir(group_writable) == []


# Run as nobody: listen where a VM's channel would be, as QEMU does, and
# say whether vhostmd connected (it would then answer the "guest" its metrics).
FAKE_CHANNEL = r"""
import os, socket, sys
directory = sys.argv[1]
os.mkdir(directory, 0o755)
listener = socket.socket(socket.AF_UNIX)
listener.bind(os.path.join(directory, "org.github.vhostmd.1"))
listener.listen()
print("listening", flush=True)
listener.settimeout(30)
try:
    listener.accept()
    print("connected", flush=True)
except OSError:
    pass
"""


@ROOT_ONLY
def test_channel_directory_planted_by_another_user_is_not_served(shared_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    channels = shared_dir  # a channel path others may write to (sticky, like /tmp)
    planted = channels / "1-test"  # test:///default runs domain 1, "test"
    fake = subprocess.Popen([sys.executable, "-c", FAKE_CHANNEL, str(planted)],
                            user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and fake.stdout.readline() == "listening\n"
        conf = config_xml(shared_dir / "vhostmd0", NANOS, transports=("vbd", "virtio"),
                          globals_extra=virtio_xml(channels))
        with Daemon(shared_dir, conf) as daemon:
            more_cycles(daemon, 3)
            assert "connected to the channel" not in daemon.log()
            assert daemon.log().count("not using channel directory") == 1
            assert (f"not using channel directory '{planted}': it belongs to uid "
                    f"{nobody.pw_uid}, and others than root may write to channel path "
                    f"{channels}") in daemon.log()
            assert daemon.stop() == 0
    finally:
        fake.kill()
        out, _ = fake.communicate()
    assert "connected" not in out


def test_modules_planted_in_the_working_directory_are_never_imported(tmp_path: Path) -> None:
    """Root starting vhostmd from /tmp: Python puts the working directory first on
    sys.path for ``python3 -c`` (how multiprocessing starts its forkserver).
    Nothing a local user plants there may be imported."""
    planted = tmp_path / "cwd"
    planted.mkdir(mode=0o1777)
    planted.chmod(0o1777)  # world-writable and sticky, as /tmp is
    markers = tmp_path / "markers"
    markers.mkdir()
    for module in ("multiprocessing/__init__", "multiprocessing/forkserver", "setproctitle",
                   "vhostmd/__init__", "libvirt", "lxml/__init__", "psutil", "encodings/idna",
                   "sitecustomize", "usercustomize"):
        path = planted / f"{module}.py"
        path.parent.mkdir(exist_ok=True)
        name = module.replace("/", ".")
        path.write_text(f"open({str(markers / name)!r}, 'w').write('imported')\n")
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, '<builtin set="vhostmd"/>' + metric_xml("A", "echo 1"))
    with Daemon(tmp_path, conf, cwd=planted) as daemon:
        wait_for(lambda: any(m.context == "vm" for m in ready_metrics(disk) or ()), 20,
                 "VM metrics (the workers imported libvirt)")
        assert daemon.stop() == 0
    assert sorted(p.name for p in markers.iterdir()) == []
