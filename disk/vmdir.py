"""The directory of per-VM metrics disks, as the supervisor opens it.

``<vm_disks>`` gives each libvirt domain its own metrics disk, ``DIR/<uuid>``:
the host metrics and that VM's metrics only. The supervisor opens DIR as root
(creating it if missing), checks it is root's and nobody else may write it,
locks it (one daemon per directory, like the shared disk's flock) and keeps
the descriptor; the disk-writer gets a copy and creates, maps and removes the
files relative to it (openat), never through DIR's path. So a directory
renamed or replaced after start cannot send the writer elsewhere.

Nothing here maps or writes a document: that is the disk-writer's
(``disk/vmwriter.py``). ``vhostmd --domain-xml`` and the libvirt hook
(``vhostmd-libvirt-hook``) use ``prepare_vm_disk`` to make one VM's file
before its domain starts.

Claims. A domain about to start (the hook runs at libvirt's "prepare", before
QEMU opens the file) may have a file the writer is about to remove: a
transient domain that stopped and starts again (a restart, ``virsh save``
then ``restore``, a migration away and back) before the writer has acted on
the listing that saw it gone. So ``prepare_vm_disk`` *claims* the file: under
the directory's *claims lock* it makes the file if it is missing and sets
its modification time to now. The writer removes a file only under the
same lock, and only if it was not modified after the listing it acts on
(``CLAIM_MARGIN`` before it): a listing taken after the claim lists the
domain (libvirt gives a domain its id before it runs the prepare hook), so a
claimed file stays until a later listing no longer has its domain.

The claims lock is a file of root's in the lock directory
(``runtime/locks.py``), mode 0600, one per VM disk directory: a flock on
the VM disks themselves, which are world-readable (QEMU reads them), could be
taken by any local user, and a claim waiting for it would fail the domain's
start. Both sides are root wherever per-VM disks work (a daemon under -u
refuses them); without a lock directory (not root, no writable /run) each
side flocks the file itself instead (``_claim_on_the_file``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vhostmd import mdisk
from vhostmd.disk.handle import (
    DiskHandle,
    DiskRefused,
    lock_exclusive,
    open_disk,
    refuse_unsafe_parents,
)
from vhostmd.runtime.files import UnsafeFile, check_owned
from vhostmd.runtime.locks import HeldLock, LockUnavailable, lock_name_for_file, root_lock_dir

if TYPE_CHECKING:  # imported where a VmDir is made: the hook never loads the child runtime
    from vhostmd.runtime.child import InheritedFd

# A UUID as libvirt prints it (virDomainGetUUIDString): lower-case, dashed.
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
# How long the disk-writer keeps a file of a domain libvirt does not list (yet):
# time to start a transient domain after `vhostmd --domain-xml UUID` made it.
UNKNOWN_GRACE = 600.0
# A file modified less than this before a listing counts as modified after it:
# file times come from the kernel's coarse clock (a tick behind time.time()).
CLAIM_MARGIN = 0.1
# How long a claim waits for the writer's flock (held for one unlink at most).
CLAIM_LOCK_WAIT = 2.0


@dataclass(frozen=True)
class VmDir:
    """The open, locked directory of per-VM disks and the size of each disk.

    ``dir`` travels to the disk-writer as the descriptor itself (InheritedFd).
    """

    path: str
    size: int
    dir: InheritedFd
    lock: HeldLock | None = None  # the supervisor's only; pickled for a child, it is None


    @property
    def fd(self) -> int:
        return self.dir.fd

    def file(self, uuid: str) -> str:
        return os.path.join(self.path, uuid)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        self.dir.close()


def open_vm_dir(path: str, size: int, *, lock: bool = True,
                parents: bool = True) -> VmDir:
    """Open (creating it, mode 0755, if missing) and lock DIR; DiskRefused with one line.

    ``parents=False`` creates DIR only, never a missing directory above it.
    """
    fd, held = _open_vm_dir(path, lock=lock, parents=parents)
    from vhostmd.runtime.child import InheritedFd

    return VmDir(path, size, InheritedFd(fd), held)


def open_vm_dir_fd(path: str, *, lock: bool, parents: bool = True) -> int:
    """open_vm_dir's checks; the directory's descriptor (O_DIRECTORY, close-on-exec).

    With ``lock``, the directory's lock is held until this process exits.
    """
    return _open_vm_dir(path, lock=lock, parents=parents)[0]


def _open_vm_dir(path: str, *, lock: bool, parents: bool) -> tuple[int, HeldLock | None]:
    what = f"VM disk directory {path}"
    # Before anything is made there: every directory above must be root's alone.
    refuse_unsafe_parents(path, "VM disk directory")
    try:
        if parents:
            os.makedirs(path, 0o755, exist_ok=True)
        else:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o755)
    except OSError as exc:
        raise DiskRefused(f"cannot create {what}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise DiskRefused(f"{what} is a symbolic link; vhostmd does not follow links "
                              "there (name the real directory)") from None
        raise DiskRefused(f"cannot open {what}: {exc.strerror}") from None
    try:
        try:
            check_owned(os.fstat(fd), path, what="VM disk directory")
        except UnsafeFile as exc:
            raise DiskRefused(str(exc)) from None
        held = lock_exclusive(fd, what, "the directory's lock", kind="vmdir") if lock else None
    except BaseException:
        os.close(fd)
        raise
    return fd, held


def switch_vm_dir(current: VmDir | None, path: str | None, size: int, *,
                  dropped_to: str | None) -> VmDir | None:
    """The VM disk directory after a reload naming ``path`` (None: no <vm_disks>).

    Returns ``current`` when nothing changes, a handle sharing its descriptor
    for a new size, or a newly opened directory; raises DiskRefused (changing
    nothing) when the new one cannot be used. The caller closes ``current``
    when the result has another descriptor.
    """
    if path is None:
        return None
    if current is not None and current.path == path:
        return current if current.size == size else VmDir(path, size, current.dir,
                                                          current.lock)
    if dropped_to is not None:
        raise DiskRefused(f"<vm_disks> needs root, and vhostmd runs as {dropped_to} (-u); "
                          "restart vhostmd without -u to use it")
    return open_vm_dir(path, size)


def open_vm_disk(vm_dir: VmDir, uuid: str, *, shrink: bool = True) -> DiskHandle:
    """Open (or create) the disk of the VM ``uuid``, sized; the safety rules of open_disk,
    a file libvirt gave to QEMU's user taken back."""
    return open_disk(vm_dir.file(uuid), vm_dir.size, dir_fd=vm_dir.fd, lock=False,
                     regular_only=True, shrink=shrink, take_back=True)


def prepare_vm_disk(vm_dir: VmDir, uuid: str) -> bool:
    """Make sure the VM's disk exists and claim it before its domain starts (see the
    module's docstring); True if it was made now. DiskRefused with one line.

    A file without a header gets one that says busy (signature kept), so the
    guest waits for the daemon's first document instead of finding no disk.
    An existing file is never shrunk (the writer may map it at another size).
    """
    if not UUID_RE.match(uuid):
        raise DiskRefused(f"{uuid!r} is not a domain UUID as libvirt prints it")
    deadline = time.monotonic() + CLAIM_LOCK_WAIT
    claims = open_claims_lock(vm_dir)
    if claims is None:
        return _claim_on_the_file(vm_dir, uuid, deadline)
    try:
        _lock_until(claims, deadline, f"the claims lock of {vm_dir.path}")
        existed = _exists(vm_dir, uuid)
        handle = open_vm_disk(vm_dir, uuid, shrink=False)
        try:
            _mark_claimed(handle.fd)
        except OSError as exc:
            raise DiskRefused(f"cannot prepare VM disk {vm_dir.file(uuid)}: "
                              f"{exc.strerror}") from None
        finally:
            os.close(handle.fd)
        return not existed
    finally:
        os.close(claims)  # releases the lock


def open_claims_lock(vm_dir: VmDir) -> int | None:
    """The descriptor of the directory's claims lock file (see the module's docstring),
    not locked; None without a lock directory. DiskRefused with one line."""
    try:
        lock_dir = root_lock_dir()
    except LockUnavailable as exc:
        raise DiskRefused(str(exc)) from None
    if lock_dir is None:
        return None
    name = lock_name_for_file("claims", os.fstat(vm_dir.fd))
    try:
        # Never removed, so never replaced under a holder; root's directory alone.
        return os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                       dir_fd=lock_dir)
    except OSError as exc:
        raise DiskRefused(f"cannot open the claims lock {name}: {exc.strerror}") from None
    finally:
        os.close(lock_dir)


def _mark_claimed(fd: int) -> None:
    if os.pread(fd, 4, 0) != mdisk.SIGNATURE:
        os.pwrite(fd, mdisk.pack_header(1, 0, 0), 0)
    os.utime(fd)  # the claim: modified now, after any listing without it


def _claim_on_the_file(vm_dir: VmDir, uuid: str, deadline: float) -> bool:
    """The claim without a lock directory: under the flock of the file itself."""
    for _attempt in range(3):
        existed = _exists(vm_dir, uuid)
        try:
            handle = open_vm_disk(vm_dir, uuid, shrink=False)
        except DiskRefused:
            if existed and not _exists(vm_dir, uuid):
                continue  # removed by the writer between our look and our open
            raise
        try:
            _lock_until(handle.fd, deadline, f"VM disk {vm_dir.file(uuid)}")
            if os.fstat(handle.fd).st_nlink == 0:
                continue  # the writer removed it before we held the lock: make it again
            _mark_claimed(handle.fd)
            return not existed
        except OSError as exc:
            raise DiskRefused(f"cannot prepare VM disk {vm_dir.file(uuid)}: "
                              f"{exc.strerror}") from None
        finally:
            with contextlib.suppress(OSError):
                os.close(handle.fd)  # releases the flock
    raise DiskRefused(f"VM disk {vm_dir.file(uuid)} was removed while being prepared, "
                      "three times in a row")


def _exists(vm_dir: VmDir, uuid: str) -> bool:
    try:
        os.stat(uuid, dir_fd=vm_dir.fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _lock_until(fd: int, deadline: float, what: str) -> None:
    """flock ``fd`` exclusively, waiting until ``deadline`` (time.monotonic())."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if time.monotonic() > deadline:
            raise DiskRefused(f"{what} stayed locked for {CLAIM_LOCK_WAIT:g} s")
        time.sleep(0.005)
