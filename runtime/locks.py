"""Locks that say "another vhostmd runs", which no other user can take.

flock(2) needs only read access, and the metrics disk is world-readable (QEMU
reads it), as are the pid file and the directory of per-VM disks: a lock on
them could be taken by any local user, who would then keep vhostmd from
starting. So a daemon running as root locks a file of its own instead, in a
directory only root may write (``LOCK_DIR``, mode 0755, root's): one file per
metrics disk or VM disk directory, named after the file's identity (device
and inode), and one per pid file path. The file is created 0600 and removed
when the daemon lets go of it (a daemon that then runs as -u USER cannot
remove it; an old file does no harm and goes at the next boot).

A daemon that is not root, or that cannot make the directory (no writable
/run), locks the file itself, as before, and another user who can read that
file can take the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
from typing import Any

LOCK_DIR = "/run/vhostmd"


class LockBusy(Exception):
    """Another process holds the lock."""


class LockUnavailable(Exception):
    """The lock directory cannot be used; str() is one line."""


class HeldLock:
    """An exclusive lock held by this process, on a file in LOCK_DIR (or on the file itself).

    Never passed to a child: pickled, it becomes None there.
    """

    def __init__(self, fd: int, name: str | None) -> None:
        self.fd = fd
        self.name = name  # in LOCK_DIR; None: the lock is on the locked file's own descriptor

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_no_lock, ())

    def release(self) -> None:
        if self.fd < 0:
            return
        if self.name is not None:
            # Removed while still held: whoever opened it meanwhile sees, once
            # it has the lock, that the name is gone, and makes a new file.
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(LOCK_DIR, self.name))
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = -1


def _no_lock() -> None:
    return None


def root_lock_dir() -> int | None:
    """LOCK_DIR, opened (made if missing) when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    try:
        os.mkdir(LOCK_DIR, 0o755)
    except FileExistsError:
        pass
    except OSError:
        return None  # no writable /run (some containers): lock the files themselves
    try:
        fd = os.open(LOCK_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise LockUnavailable(f"cannot open the lock directory {LOCK_DIR}: "
                              f"{exc.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        os.close(fd)
        raise LockUnavailable(f"the lock directory {LOCK_DIR} is not root's alone (uid "
                              f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); remove it")
    return fd


def lock_name_for_file(kind: str, st: os.stat_result) -> str:
    """The lock file's name for the file (or block device) ``st`` describes."""
    if stat.S_ISBLK(st.st_mode):
        return f"{kind}-blk-{st.st_rdev:x}.lock"
    return f"{kind}-{st.st_dev:x}-{st.st_ino}.lock"


def lock_name_for_path(kind: str, path: str) -> str:
    digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:32]
    return f"{kind}-{digest}.lock"


def take(name: str, fallback_fd: int | None = None) -> HeldLock:
    """Lock ``name`` in LOCK_DIR; not root: flock ``fallback_fd`` itself (None: no lock).

    Raises LockBusy when another process holds it, LockUnavailable (one line)
    when LOCK_DIR cannot be used, OSError otherwise.
    """
    dir_fd = root_lock_dir()
    if dir_fd is None:
        if fallback_fd is None:
            return HeldLock(-1, None)
        _flock(fallback_fd)
        return HeldLock(fallback_fd, None)
    try:
        for _ in range(5):
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
            try:
                _flock(fd)
                # Its holder may have removed the name between our open and our
                # lock: then the lock is on a file nobody else will find.
                if os.path.samestat(os.fstat(fd),
                                    os.stat(name, dir_fd=dir_fd, follow_symlinks=False)):
                    return HeldLock(fd, name)
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise LockUnavailable(f"the lock file {LOCK_DIR}/{name} keeps disappearing")
    finally:
        os.close(dir_fd)


def _flock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LockBusy from None
