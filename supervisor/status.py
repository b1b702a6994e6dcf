"""The status file the supervisor keeps, and `vhostmd --status` that prints it.

The supervisor rewrites a small JSON file after every cycle (in place, under
a lock: see StatusFile), next to its pid file:
``/var/run/vhostmd.pid`` -> ``/var/run/vhostmd.status``. `vhostmd --status`
reads it and checks the pid file's lock to tell whether the daemon runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from typing import Any

from vhostmd import __version__
from vhostmd.runtime.files import UnsafeFile, check_private, holds_for_writing, open_no_follow
from vhostmd.supervisor.children import DISK_SEAT, EVENTS_SEAT, wanted_children

STATUS_VERSION = 1
# LSB init-script status codes: running, dead with pid file, not running, unknown.
RUNNING, DEAD_PID_FILE, NOT_RUNNING, UNKNOWN = 0, 1, 3, 4


def status_path_for(pid_path: str) -> str:
    base = pid_path[: -len(".pid")] if pid_path.endswith(".pid") else pid_path
    return f"{base}.status"


class StatusFile:
    """The status file: created by the supervisor as root at start, rewritten through its fd.

    Opened once, before -u drops privileges, so the file stays root's and the
    unprivileged supervisor needs no write access to its directory (/run).
    It is rewritten in place (truncate, write) under an exclusive flock;
    `vhostmd --status` reads it under a shared flock, so it never sees a
    half-written file. The supervisor never waits for that lock: if a reader
    holds it (another user may hold it forever), that cycle's rewrite is
    skipped and the next one tries again.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def open(self) -> None:
        """Create it afresh; raises UnsafeFile or OSError."""
        # Whatever is there is a previous run's (we hold the pid file's lock):
        # replace it, so the file is ours whoever owned the old one.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fd, _created = open_no_follow(self.path, os.O_RDWR, what="status file")
        try:
            check_private(fd, self.path, what="status file")
        except UnsafeFile:
            os.close(fd)
            raise
        self.fd = fd

    def write(self, status: dict[str, Any]) -> bool:
        """Rewrite it; False if a reader holds the lock now. Raises OSError."""
        # One line: json.dumps without indent is C code, with it Python (every cycle).
        data = (json.dumps(status, sort_keys=True) + "\n").encode()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            # Write over, then cut to length: truncating to 0 first makes a
            # disk filesystem free and reallocate the blocks every cycle.
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return True

    def remove(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except OSError:
            # No write access to the directory after -u: leave it empty; the
            # pid file's free lock already says that vhostmd is not running.
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1


# A status file is a few KiB (one line per child).
MAX_STATUS_BYTES = 1 << 20


def read_status(path: str, timeout: float = 2.0) -> dict[str, Any]:
    """The status file's content, read under a shared lock; raises OSError or ValueError."""
    # O_NONBLOCK: a FIFO put there must not hang `vhostmd --status`.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OSError(errno.EWOULDBLOCK, "locked by its writer for too long") \
                        from None
                time.sleep(0.01)
        data = os.read(fd, MAX_STATUS_BYTES + 1)
        if len(data) > MAX_STATUS_BYTES:
            raise ValueError("larger than a status file")
        return json.loads(data)
    finally:
        os.close(fd)


def child_state(supervisor: Any, seat: int, child: Any) -> str:
    if child is None:
        return "waiting to restart (crash loop)" if supervisor.pool.waiting(seat) else "starting"
    job = child.busy_with
    if job is not None and hasattr(job, "describe"):
        return f"busy: {job.describe()}"
    if seat == EVENTS_SEAT:
        return supervisor.instant.describe()
    if seat == DISK_SEAT:
        error = supervisor.publisher.error
        return f"error: {error}" if error else "ok"
    return "idle" if seat < DISK_SEAT else "running"


def build_status(supervisor: Any) -> dict[str, Any]:
    """What the status file holds, from the running supervisor."""
    children = []
    wanted = wanted_children(supervisor.config, supervisor.uri, supervisor.disk,
                             supervisor.vm_dir)
    for seat, spec in sorted(wanted.items()):
        child = supervisor.pool.get(seat)
        children.append({
            "role": spec.role,
            "pid": child.pid if child is not None else None,
            "state": child_state(supervisor, seat, child),
            "restarts": supervisor.pool.restarts(seat),
            "heartbeat_age": round(child.heartbeat_age(), 3) if child is not None else None,
        })
    virtio = None
    if supervisor.virtio_status is not None:
        connected, known, maximum = supervisor.virtio_status
        virtio = {"connected": connected, "known": known, "max": maximum}
    stats = supervisor.cycles.stats
    return {
        "version": __version__, "pid": os.getpid(), "config": supervisor.config_path,
        "update_period": supervisor.config.update_period, "started": supervisor.started_wall,
        "updated": time.time(), "last_cycle_at": supervisor.cycles.last_cycle_wall,
        "last_cycle_seconds": round(stats["last_cycle_seconds"], 4),
        "cycles": stats["cycles"], "published": stats["published"],
        "left_out": stats["left_out"], "carried": stats["carried"],
        "vms_not_on_disk": stats["vms_not_on_disk"],
        "shell_jobs": stats["shell_jobs"], "shell_done": stats["shell_done"],
        "refresh_seconds": round(supervisor.config.update_period * stats["shell_jobs"]
                                 / max(1, stats["shell_done"]), 1),
        "children": children, "virtio": virtio,
    }


def daemon_running(pid_path: str) -> int | None:
    """The pid of the vhostmd holding ``pid_path``'s lock, or None if no vhostmd holds it.

    Any user who can read the file can lock it, and the pid in a stale file
    may belong to another process by now: the process must also hold the file
    open for writing, as only the daemon does (or, where we may not look at
    its descriptors, be titled as the supervisor).
    """
    try:
        fd = os.open(pid_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if not text.isdigit():
                return -1
            pid = int(text)
            holds = holds_for_writing(pid, st)
            if holds is None:
                holds = _title(pid).startswith("vhostmd: supervisor")
            return pid if holds else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read(256).decode(errors="replace")
    except OSError:
        return ""


def _ago(wall: float | None, now: float) -> str:
    if not wall:
        return "never"
    return f"{max(0.0, now - wall):.1f} s ago"


def process_usage(pid: object) -> tuple[str, str]:
    """CPU time and resident memory of one of the daemon's processes, for the table.

    Read here, in the `vhostmd --status` process: the supervisor itself never
    reads /proc.
    """
    import psutil

    if not isinstance(pid, int) or pid <= 0:
        return "-", "-"
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            times = proc.cpu_times()
            rss = proc.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "-", "-"
    return f"{times.user + times.system:.2f} s", f"{rss / 2**20:.1f} MiB"


def format_status(status: dict[str, Any], pid: int) -> str:
    now = time.time()
    lines = [
        f"vhostmd {status.get('version', '?')}: running, pid {pid}, "
        f"config {status.get('config', '?')}, period {status.get('update_period', '?')} s",
        f"status written {_ago(status.get('updated'), now)}",
        f"last cycle: {_ago(status.get('last_cycle_at'), now)}, took "
        f"{status.get('last_cycle_seconds', 0.0):.3f} s; {status.get('published', 0)} metrics "
        f"published, {status.get('left_out', 0)} left out; {status.get('cycles', 0)} cycles",
        *_work_lines(status),
        f"{'CHILD':<14} {'PID':>7} {'RESTARTS':>8} {'HEARTBEAT':>10} {'CPU':>9} {'RSS':>9}  STATE",
    ]
    rows = [{"role": "supervisor", "pid": pid, "restarts": "-", "state": "running"},
            *status.get("children", [])]
    for child in rows:
        beat = child.get("heartbeat_age")
        beat_text = f"{beat:.1f} s" if isinstance(beat, int | float) else "-"
        cpu, rss = process_usage(child.get("pid"))
        lines.append(f"{child.get('role', '?'):<14} {child.get('pid') or '-':>7} "
                     f"{child.get('restarts', 0):>8} {beat_text:>10} {cpu:>9} {rss:>9}  "
                     f"{child.get('state', '?')}")
    virtio = status.get("virtio")
    if virtio:
        lines.append(f"virtio channels: {virtio.get('connected', 0)} connected, "
                     f"{virtio.get('known', 0)} known, max {virtio.get('max', '?')}")
    return "\n".join(lines)


def _work_lines(status: dict[str, Any]) -> list[str]:
    """Lines only shown when something does not fit: the disk, or the period."""
    lines = []
    if status.get("carried"):
        lines.append(f"{status['carried']} metric fragments kept from earlier cycles "
                     "(not refreshed in the last one)")
    jobs, done = status.get("shell_jobs", 0), status.get("shell_done", 0)
    if jobs and done < jobs:
        lines.append(f"shell actions: {done} of {jobs} ran in the last cycle; each is "
                     f"refreshed about every {status.get('refresh_seconds', '?')} s")
    if status.get("vms_not_on_disk"):
        lines.append(f"metrics disk: {status['vms_not_on_disk']} VMs do not fit and are left "
                     "out of it (virtio still serves them)")
    return lines


def show_status(pid_path: str) -> tuple[int, str]:
    """(exit status, text) for `vhostmd --status`."""
    pid = daemon_running(pid_path)
    if pid is None:
        exists = os.path.exists(pid_path) and os.path.getsize(pid_path) > 0
        return (DEAD_PID_FILE, f"vhostmd is not running (stale pid file {pid_path})") if exists \
            else (NOT_RUNNING, "vhostmd is not running")
    path = status_path_for(pid_path)
    try:
        status = read_status(path)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "unreadable"
        return UNKNOWN, f"vhostmd is running (pid {pid}) but {path} is {reason}"
    return RUNNING, format_status(status, pid)
