"""Process plumbing for the supervisor: pid file, daemonizing, privileges, logging."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import logging.handlers
import multiprocessing
import os
import pwd
import socket
import stat
import sys
from dataclasses import dataclass

from vhostmd.runtime.files import UnsafeFile, check_private, holds_for_writing, open_no_follow
from vhostmd.runtime.locks import (
    HeldLock,
    LockBusy,
    LockUnavailable,
    lock_name_for_path,
)
from vhostmd.runtime.locks import take as take_lock
from vhostmd.runtime.privileges import forbid_tracing

log = logging.getLogger("vhostmd")


class StartupError(Exception):
    """Something that keeps the daemon from starting; str() is one line."""


class PidFile:
    """An exclusively locked pid file (flock), removed on exit.

    The lock, not the file's existence, says whether vhostmd runs: a stale file
    left by a crash is simply taken over. It stays root's under -u: the
    supervisor writes and truncates it through the descriptor it opened as root.

    The file is world-readable, so any user could flock it. A daemon started
    as root therefore decides "another vhostmd runs" by a lock of its own that
    only root can take (runtime/locks.py, one per pid file path); holding
    that, a pid file someone else has locked is an impostor's, and is replaced.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.lock: HeldLock | None = None

    def acquire(self) -> None:
        try:
            self.lock = take_lock(lock_name_for_path("pidfile", self.path))
        except LockBusy:
            raise StartupError(f"another vhostmd is running (pid {self._pid_in_file()}, "
                               f"pid file {self.path})") from None
        except LockUnavailable as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot lock pid file {self.path}: {exc.strerror}") from None
        try:
            self._acquire_file()
        except BaseException:
            self.lock.release()
            raise

    def _pid_in_file(self) -> str:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return "?"
        try:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        except OSError:
            return "?"
        finally:
            os.close(fd)

    def _acquire_file(self) -> None:
        fd = self._open_locked()
        try:
            check_private(fd, self.path, what="pid file")
        except UnsafeFile:
            # A stale file that is not root's alone (an older vhostmd chowned it
            # for -u; or planted): its owner could write another pid into it,
            # which `stop` would then signal. Replace it, keeping the old lock
            # until the new file is locked.
            fd = self._replace(fd)
        self.fd = fd

    def _replace(self, old: int | None) -> int:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        try:
            new = self._open_locked(replacing=True)
            check_private(new, self.path, what="pid file")
        except UnsafeFile as exc:
            raise StartupError(str(exc)) from None
        finally:
            if old is not None:
                os.close(old)
        return new

    def _open_locked(self, *, replacing: bool = False) -> int:
        try:
            fd, _created = open_no_follow(self.path, os.O_RDWR | os.O_NONBLOCK, what="pid file")
        except UnsafeFile as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot open pid file {self.path}: {exc.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise StartupError(f"pid file {self.path} is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if (self.lock is not None and self.lock.name is not None and not replacing
                    and not (other.isdigit() and holds_for_writing(int(other), st))):
                # We hold root's lock for this path, and the pid in the file
                # does not hold it open for writing (as a vhostmd that predates
                # that lock would): someone else locked the readable file to
                # make us look running.
                return self._replace(None)
            raise StartupError(
                f"another vhostmd is running (pid {other}, pid file {self.path})"
            ) from None
        return fd

    def write(self, pid: int) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def release(self) -> None:
        if self.fd < 0:
            if self.lock is not None:
                self.lock.release()
                self.lock = None
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
        if self.lock is not None:
            self.lock.release()
            self.lock = None


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
    # Not traceable by the user, whatever fs.suid_dumpable says: we hold root's files.
    try:
        forbid_tracing()
    except OSError as exc:
        raise StartupError(f"cannot keep {run_as.user} from tracing vhostmd: "
                           f"{exc.strerror}") from None
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
        if not hasattr(record, "role"):  # set by a child whose record we write
            name = multiprocessing.current_process().name
            record.role = "supervisor" if name == "MainProcess" else name
        return True


DEFAULT_LOG_FILE = "/var/log/vhostmd.log"
SYSLOG_SOCKET = "/dev/log"
_FULL_FORMAT = "%(asctime)s vhostmd[%(process)d] %(role)s: %(levelname)s: %(message)s"


@dataclass
class LogTarget:
    """Where a daemonized vhostmd logs: syslog, or a file (``file`` names it)."""

    handler: logging.Handler
    file: str | None = None


def _syslog_answers() -> bool:
    """Whether a syslog daemon listens on SYSLOG_SOCKET (SysLogHandler hides a failure)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(SYSLOG_SOCKET)
            except OSError:
                continue
            return True
    return False


def open_log_target(log_file: str | None) -> LogTarget:
    """Open the daemon's log before detaching (and before -u): syslog, else a file.

    Without ``log_file``, syslog when its socket answers, else DEFAULT_LOG_FILE:
    a daemon in a container or in early boot must not lose every line. The
    file is opened as root (it stays root's, mode 0640) and appended to
    through the descriptor, so rotate it with copytruncate.
    """
    if log_file is None:
        if _syslog_answers():
            handler = logging.handlers.SysLogHandler(
                address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.setFormatter(logging.Formatter("vhostmd[%(process)d]: %(role)s: %(message)s"))
            return LogTarget(handler)
        log_file = DEFAULT_LOG_FILE
    try:
        fd, _created = open_no_follow(log_file, os.O_WRONLY | os.O_APPEND, what="log file",
                                      mode=0o640)
    except UnsafeFile as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot open log file {log_file}: {exc.strerror}") from None
    try:
        check_private(fd, log_file, what="log file")
    except UnsafeFile as exc:
        os.close(fd)
        raise StartupError(str(exc)) from None
    # Line-buffered, appending: each line is one write(), whichever process logs it.
    stream = os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="replace")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(_FULL_FORMAT))
    return LogTarget(handler, log_file)


# sd-daemon(3) priority prefixes: journald strips them and files the line under it.
_JOURNAL_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4,
                     logging.INFO: 6, logging.DEBUG: 7}


class _JournalFormatter(logging.Formatter):
    """``<N>`` + the line, no timestamp (journald adds its own)."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _JOURNAL_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal (JOURNAL_STREAM, systemd.exec(5))."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(*, verbose: bool, target: LogTarget | None = None) -> None:
    """Log to ``target`` (daemonized), or else to stderr (foreground, and until detached)."""
    root = logging.getLogger("vhostmd")
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    handler: logging.Handler
    if target is not None:
        handler = target.handler
    else:
        handler = logging.StreamHandler(sys.stderr)
        if stderr_is_journal():
            handler.setFormatter(_JournalFormatter(
                "vhostmd[%(process)d] %(role)s: %(levelname)s: %(message)s"))
        else:
            handler.setFormatter(logging.Formatter(_FULL_FORMAT))
    handler.addFilter(_ProcessNameFilter())
    root.addHandler(handler)
