"""Process plumbing for the supervisor: pid file, daemonizing, privileges, logging."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import logging.handlers
import os
import pwd
import sys
from dataclasses import dataclass

log = logging.getLogger("vhostmd")


class StartupError(Exception):
    """Something that keeps the daemon from starting; str() is one line."""


class PidFile:
    """An exclusively locked pid file (flock), removed on exit.

    The lock, not the file's existence, says whether vhostmd runs: a stale file
    left by a crash is simply taken over.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644)
        except OSError as exc:
            raise StartupError(f"cannot open pid file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartupError(
                f"another vhostmd is running (pid {other}, pid file {self.path})"
            ) from None
        self.fd = fd

    def write(self, pid: int) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def chown(self, uid: int, gid: int) -> None:
        with contextlib.suppress(OSError):
            os.fchown(self.fd, uid, gid)

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError:
            # Privileges dropped and no write access to the directory: leave an
            # empty, unlocked file, which the next start takes over.
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1


def daemonize() -> None:
    """Double fork, new session, / as cwd, stdio on /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


@dataclass(frozen=True)
class RunAs:
    user: str
    uid: int
    gid: int


def lookup_user(name: str) -> RunAs:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise StartupError(f"unknown user {name!r}") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise StartupError(f"refusing to run as {name!r}: its uid or gid is 0")
    return RunAs(name, entry.pw_uid, entry.pw_gid)


def drop_privileges(run_as: RunAs) -> None:
    if os.geteuid() != 0:
        raise StartupError(f"-u {run_as.user} needs root to switch users")
    try:
        os.initgroups(run_as.user, run_as.gid)
        os.setgid(run_as.gid)
        os.setuid(run_as.uid)
    except OSError as exc:
        raise StartupError(f"cannot switch to user {run_as.user}: {exc.strerror}") from None
    if os.getuid() == 0 or os.geteuid() == 0:
        raise StartupError("still root after dropping privileges")
    groups = ",".join(grp.getgrgid(g).gr_name for g in os.getgroups() if _has_group(g))
    log.info("running as %s (groups %s)", run_as.user, groups or "-")


def _has_group(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


class _ProcessNameFilter(logging.Filter):
    """Tags each record with the role of the process that logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        import multiprocessing

        if not hasattr(record, "role"):  # set by a child whose record we write
            name = multiprocessing.current_process().name
            record.role = "supervisor" if name == "MainProcess" else name
        return True


def setup_logging(*, foreground: bool, verbose: bool) -> None:
    root = logging.getLogger("vhostmd")
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s vhostmd[%(process)d] %(role)s: "
                                               "%(levelname)s: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.setFormatter(logging.Formatter("vhostmd[%(process)d]: %(role)s: %(message)s"))
    else:  # no syslog socket (container): nowhere useful to write; stay quiet
        handler = logging.NullHandler()
    handler.addFilter(_ProcessNameFilter())
    root.addHandler(handler)
