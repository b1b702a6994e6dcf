"""The metrics disk as the supervisor opens it: path, size and one locked descriptor.

The supervisor opens the disk as root, before it drops privileges (-u), and
keeps the descriptor for its whole life; the disk-writer child maps the disk
from that descriptor and never opens the path itself. So the file stays
root's (no chown), a restarted writer gets the same file whatever now sits at
the path, and a reload that names a new disk opens it before the old writer is
replaced.

One daemon per disk: the supervisor holds an exclusive lock for the disk.
The disk is world-readable, and flock(2) needs only read access, so a daemon
running as root does not lock the disk itself (any user could, and keep
vhostmd from starting): it locks a root-only file named after the disk's
identity (runtime/locks.py). A daemon that is not root flocks the disk's
descriptor. flock locks and the POSIX/OFD byte-range locks (fcntl) that QEMU
takes on disk images are separate lock types on Linux and never conflict
(flock(2), NOTES), so guests attached to the disk keep working; only on NFS,
where the kernel emulates flock with byte-range locks, would the two meet.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass

from vhostmd import mdisk
from vhostmd.runtime.files import (
    UnsafeFile,
    check_parents,
    check_private,
    open_no_follow,
    unlink_if_same,
)
from vhostmd.runtime.locks import HeldLock, LockBusy, LockUnavailable, lock_name_for_file
from vhostmd.runtime.locks import take as take_lock


class DiskRefused(Exception):
    """A metrics disk that cannot be used; str() is one line naming it and why."""


@dataclass(frozen=True)
class DiskHandle:
    """An open, locked metrics disk. ``fd`` is O_RDWR; ``lock`` is the disk's lock.

    Passed to the disk-writer child as is: with the fork start method the child
    inherits ``fd``; through a spawn/forkserver start method the descriptor is
    sent along when the handle is pickled (see __reduce__).
    """

    path: str
    size: int
    fd: int
    regular: bool  # a regular file (we size it) or a block device (it must be large enough)
    lock: HeldLock | None = None  # the supervisor's only; a child's copy has none

    def __reduce__(self) -> tuple:
        from multiprocessing import reduction
        from multiprocessing.context import get_spawning_popen

        if get_spawning_popen() is None:
            raise TypeError("a DiskHandle only travels to a child process being started")
        return (_rebuild, (self.path, self.size, reduction.DupFd(self.fd), self.regular))

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _rebuild(path: str, size: int, dup: object, regular: bool) -> DiskHandle:
    return DiskHandle(path, size, dup.detach(), regular)  # type: ignore[attr-defined]


def fit(handle: DiskHandle, *, shrink: bool = True) -> None:
    """Make the disk ``handle.size`` bytes long, with its blocks reserved.

    Reserving (posix_fallocate) turns a full filesystem into a clear error now,
    instead of a SIGBUS on a later write into the mapping. With shrink=False a
    larger file is left as it is (someone may still map the old size).
    """
    fd, size, path = handle.fd, handle.size, handle.path
    if not handle.regular:
        end = os.lseek(fd, 0, os.SEEK_END)
        if end < size:
            raise DiskRefused(f"metrics disk {path}: block device has {end} bytes, need {size}")
        return
    try:
        os.posix_fallocate(fd, 0, size)
        if shrink and os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
    except OSError as exc:
        raise DiskRefused(f"cannot make metrics disk {path} {size} bytes long: "
                          f"{exc.strerror}") from None


def open_disk(path: str, size: int, *, dir_fd: int | None = None, lock: bool = True,
              regular_only: bool = False, shrink: bool = True,
              take_back: bool = False) -> DiskHandle:
    """Open (or create) and lock the metrics disk; raises DiskRefused with one line.

    With ``dir_fd``, the file ``path`` names is opened in that directory (openat:
    a per-VM disk in the directory the supervisor opened). ``lock=False`` takes
    no flock (per-VM disks: the daemon locks their directory instead).
    ``shrink=False`` leaves a larger file as it is (see ``fit``).

    ``take_back=True`` (per-VM disks, in a directory only root may write): a
    regular file with one link that another user owns and nobody else may
    write is given back to us (fchown) instead of refused. libvirt's DAC
    driver chowns every disk image to QEMU's user when a domain starts and
    never gives read-only ones back; nobody but root can have made the file
    there. Elsewhere (/dev/shm) the file may be another user's plant.
    """
    if dir_fd is None:
        refuse_unsafe_parents(path, "metrics disk")
    try:
        # O_NONBLOCK: opening an odd device node planted at the path must not hang us.
        fd, created = open_no_follow(path, os.O_RDWR | os.O_NONBLOCK, what="metrics disk",
                                     dir_fd=dir_fd)
    except UnsafeFile as exc:
        raise DiskRefused(str(exc)) from None
    except OSError as exc:
        raise DiskRefused(f"cannot open metrics disk {path}: {exc.strerror}") from None
    try:
        if take_back:
            _take_back(fd)
        try:
            st = check_private(fd, path, what="metrics disk")
        except UnsafeFile as exc:
            raise DiskRefused(str(exc)) from None
        if regular_only and not stat.S_ISREG(st.st_mode):
            raise DiskRefused(f"metrics disk {path} is not a regular file")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DiskRefused(f"metrics disk {path} is not a regular file or block device")
        if not created and stat.S_ISREG(st.st_mode):
            check_adoptable(fd, path, st.st_size)
        held = lock_exclusive(fd, f"metrics disk {path}", "the disk's lock",
                              kind="disk") if lock else None
        handle = DiskHandle(path, size, fd, stat.S_ISREG(st.st_mode), held)
        try:
            fit(handle, shrink=shrink)
        except BaseException:
            if held is not None:
                held.release()
            raise
    except BaseException:
        if created:
            unlink_if_same(path, fd, dir_fd=dir_fd)  # leave no half-made disk behind
        os.close(fd)
        raise
    return handle


def _take_back(fd: int) -> None:
    """Make a regular, single-link file nobody else may write ours (see open_disk)."""
    st = os.fstat(fd)
    me = os.geteuid()
    if (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and not st.st_mode & 0o022
            and (st.st_uid, st.st_gid) != (me, os.getegid())):
        os.fchown(fd, me, os.getegid())


# Beyond this, an existing file without the signature is not read through for zeros.
ZERO_CHECK_LIMIT = 64 * 2**20


def check_adoptable(fd: int, path: str, size: int) -> None:
    """Refuse an existing file that is not a metrics disk: a typo must not destroy a file.

    Adopted: a metrics disk (the signature), or a file that is empty or all
    zeros (made by fallocate or truncate for the purpose).
    """
    if size == 0 or os.pread(fd, len(mdisk.SIGNATURE), 0) == mdisk.SIGNATURE:
        return
    if size <= ZERO_CHECK_LIMIT:
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            if chunk.count(0) != len(chunk):
                break
            offset += len(chunk)
        else:
            return
    raise DiskRefused(f"metrics disk {path} already holds something else (not a metrics "
                      "disk, not empty or zeros); not overwriting it: remove it or name "
                      "another path")


def existing_disk_refusal(path: str) -> str | None:
    """For --check: why the daemon would refuse the file already at ``path`` (None: it would not).

    Only what can be told without root and without changing anything: a
    directory above it that another user can change, or a file that is there,
    readable, and not a metrics disk.
    """
    try:
        refuse_unsafe_parents(path, "metrics disk")
    except DiskRefused as exc:
        return str(exc)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                     | os.O_NOCTTY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            check_adoptable(fd, path, st.st_size)
    except DiskRefused as exc:
        return str(exc)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def refuse_unsafe_parents(path: str, what: str) -> None:
    """DiskRefused (one line) if a directory above ``path`` can be changed by another user."""
    try:
        check_parents(path, what=what)
    except UnsafeFile as exc:
        raise DiskRefused(str(exc)) from None
    except OSError as exc:
        raise DiskRefused(f"cannot check the directories above {what} {path}: "
                          f"{exc.strerror}") from None


def lock_exclusive(fd: int, what: str, lock: str, *, kind: str) -> HeldLock:
    """Take the lock of the disk (or VM disk directory) open as ``fd``: one daemon each."""
    try:
        return take_lock(lock_name_for_file(kind, os.fstat(fd)), fd)
    except LockBusy:
        raise DiskRefused(f"{what} is in use by another vhostmd (it holds {lock})") from None
    except LockUnavailable as exc:
        raise DiskRefused(str(exc)) from None
    except OSError as exc:
        raise DiskRefused(f"cannot lock {what}: {exc.strerror}") from None


def switch_disk(current: DiskHandle | None, path: str | None, size: int, *,
                dropped_to: str | None) -> DiskHandle | None:
    """The disk to use after a reload that names ``path`` (None: no vbd transport).

    Returns ``current`` itself when nothing changes, a handle sharing its
    descriptor for a new size of the same disk, or a newly opened disk. Raises
    DiskRefused (and changes nothing) when the new disk cannot be used, so the
    running writer keeps publishing to the old one. The caller closes
    ``current`` when the result has another descriptor.
    """
    if path is None:
        return None
    if current is not None and current.path == path:
        if current.size == size:
            return current
        # Same file, held open: resizing needs no privileges. Only grow it now
        # (the running writer maps the old size); the new writer shrinks it.
        resized = DiskHandle(path, size, current.fd, current.regular, current.lock)
        fit(resized, shrink=False)
        return resized
    if dropped_to is not None:
        raise DiskRefused(f"opening metrics disk {path} needs root, and vhostmd runs as "
                          f"{dropped_to} (-u); restart vhostmd to use it")
    return open_disk(path, size)
