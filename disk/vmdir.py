"""The directory of per-VM metrics disks, as the supervisor opens it.

``<vm_disks>`` gives each libvirt domain its own metrics disk, ``DIR/<uuid>``:
the host metrics and that VM's metrics only. The supervisor opens DIR as root
(creating it if missing), checks it is root's and nobody else may write it,
locks it (one daemon per directory, like the shared disk's flock) and keeps
the descriptor; the disk-writer gets a copy and creates, maps and removes the
files relative to it (openat), never through DIR's path. So a directory
renamed or replaced after start cannot send the writer elsewhere.

Nothing here maps or writes a document: that is the disk-writer's
(``disk/vmwriter.py``). ``vhostmd --domain-xml`` uses ``prepare_vm_disk`` to
create one VM's file before its domain starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from dataclasses import dataclass

from vhostmd import mdisk
from vhostmd.disk.handle import (
    DiskHandle,
    DiskRefused,
    lock_exclusive,
    open_disk,
    refuse_unsafe_parents,
)
from vhostmd.runtime.child import InheritedFd
from vhostmd.runtime.locks import HeldLock

# A UUID as libvirt prints it (virDomainGetUUIDString): lower-case, dashed.
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
# How long the disk-writer keeps a file of a domain libvirt does not list (yet):
# time to start a transient domain after `vhostmd --domain-xml UUID` made it.
UNKNOWN_GRACE = 600.0


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


def open_vm_dir(path: str, size: int, *, lock: bool = True) -> VmDir:
    """Open (creating it, mode 0755, if missing) and lock DIR; DiskRefused with one line."""
    what = f"VM disk directory {path}"
    # Before anything is made there: every directory above must be root's alone.
    refuse_unsafe_parents(path, "VM disk directory")
    try:
        os.makedirs(path, 0o755, exist_ok=True)
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
        st = os.fstat(fd)
        me = os.geteuid()
        if st.st_uid != me:
            raise DiskRefused(f"{what} belongs to uid {st.st_uid}, not to uid {me}; "
                              "give it to that user or name another")
        if st.st_mode & 0o022:
            raise DiskRefused(f"{what} can be written by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); chmod go-w it")
        held = lock_exclusive(fd, what, "the directory's lock", kind="vmdir") if lock else None
    except BaseException:
        os.close(fd)
        raise
    return VmDir(path, size, InheritedFd(fd), held)


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


def open_vm_disk(vm_dir: VmDir, uuid: str) -> DiskHandle:
    """Open (or create) the disk of the VM ``uuid``, sized; the safety rules of open_disk."""
    return open_disk(vm_dir.file(uuid), vm_dir.size, dir_fd=vm_dir.fd, lock=False,
                     regular_only=True)


def prepare_vm_disk(vm_dir: VmDir, uuid: str) -> bool:
    """Make sure the VM's disk exists before its domain starts; True if it was made now.

    A file without a header gets one that says busy (signature kept), so the
    guest waits for the daemon's first document instead of finding no disk.
    """
    if not UUID_RE.match(uuid):
        raise DiskRefused(f"{uuid!r} is not a domain UUID as libvirt prints it")
    existed = True
    try:
        os.stat(uuid, dir_fd=vm_dir.fd, follow_symlinks=False)
    except FileNotFoundError:
        existed = False
    handle = open_vm_disk(vm_dir, uuid)
    try:
        if os.pread(handle.fd, 4, 0) != mdisk.SIGNATURE:
            os.pwrite(handle.fd, mdisk.pack_header(1, 0, 0), 0)
    finally:
        with contextlib.suppress(OSError):
            os.close(handle.fd)
    return not existed
