"""The disk-writer's per-VM disks: one mapping per defined domain, in the VM disk directory.

Each cycle the supervisor sends the host fragment, each running VM's fragment
(by UUID) and the UUIDs of the defined domains that do not run. For each
defined domain the writer writes ``<metrics>`` + host + that VM's own
metrics + ``</metrics>`` to ``DIR/<uuid>`` with the shared disk's protocol
(``MetricsDisk.write``: busy, msync, header and content, zeroed tail, msync,
idle, msync). A domain that does not run gets the host metrics only.

Files are opened relative to the directory descriptor with the shared disk's
rules (no symlink, nothing others may write, no second hard link; created
exclusively, mode 0644, blocks reserved), but a file another user owns is
taken back (fchown): libvirt gives each disk image to QEMU's user when its
domain starts and never gives a read-only one back, and only root can make
files in the directory. A refused file is logged once and skipped; the
others are still written.

Bounded at 1024 VMs: a file's descriptor is closed as soon as it is mapped
(the mapping keeps the file), and after each write the mapping's pages are
dropped from this process (MADV_DONTNEED: the data stays in the file), so
the writer holds one descriptor (the directory) and a few pages at a time.
With descriptors closed, a file's size and identity are checked by one scan
of the directory per cycle (fstatat): a file truncated, removed or replaced
under the writer is opened again (and sized again) before it is written.

Removal: a file is removed in the first cycle that lists its domain as
neither running nor defined, if this writer saw the domain before, unless
it was modified (claimed by the libvirt hook or ``vhostmd --domain-xml``
for a domain starting again, see ``disk/vmdir.py``) after that listing was
taken: then it stays until a later listing. A UUID-named file of a domain
this writer never saw (made for a transient domain not started yet, or left
by a domain undefined while vhostmd was stopped) is removed once it has not
been modified for ``UNKNOWN_GRACE`` seconds. Each removal holds the
directory's claims lock, which a claim takes too, and looks at the file
again under it (the file's own flock where there is no lock directory).
Nothing else in the directory is ever touched, and nothing at all is
removed while libvirt cannot be listed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import mmap
import os
import stat
import time
from collections.abc import Callable

from vhostmd.disk.handle import DiskHandle, DiskRefused
from vhostmd.disk.mapped import DiskTooSmall, MetricsDisk
from vhostmd.disk.vmdir import (
    CLAIM_MARGIN,
    UNKNOWN_GRACE,
    UUID_RE,
    VmDir,
    open_claims_lock,
    open_vm_disk,
)
from vhostmd.document import assemble

log = logging.getLogger("vhostmd")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.msync.argtypes = _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
_MS_SYNC = 4


class Mapping:
    """A MAP_SHARED mapping that keeps no descriptor (Python's mmap keeps a dup of it).

    What MetricsDisk uses of mmap.mmap: slice assignment, flush (msync,
    MS_SYNC, the whole mapping), close; plus drop() (MADV_DONTNEED).
    """

    def __init__(self, fd: int, size: int) -> None:
        addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.addr = addr
        self.size = size
        self.view: memoryview | None = memoryview(
            (ctypes.c_char * size).from_address(addr)).cast("B")

    def __setitem__(self, where: slice, data: bytes) -> None:
        assert self.view is not None
        self.view[where] = data

    def __getitem__(self, where: slice) -> bytes:
        assert self.view is not None
        return bytes(self.view[where])

    def _call(self, function: str, *args: int) -> None:
        if getattr(_libc, function)(self.addr, self.size, *args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{function}: {os.strerror(err)}")

    def flush(self) -> None:
        self._call("msync", _MS_SYNC)

    def drop(self) -> None:
        """Drop the pages from this process (the file keeps the data)."""
        self._call("madvise", mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
            self._call("munmap")


class VmDisk(MetricsDisk):
    """One VM's disk, mapped; its descriptor is closed by the caller after this."""

    _map: Mapping  # type: ignore[assignment]

    def __init__(self, handle: DiskHandle) -> None:
        super().__init__(handle)
        st = os.fstat(handle.fd)
        self.ident = (st.st_dev, st.st_ino)
        self._map.drop()

    def _map_file(self, handle: DiskHandle) -> Mapping:  # type: ignore[override]
        return Mapping(handle.fd, self.size)

    def _check_size(self) -> None:
        """No descriptor to fstat: VmDisks' directory scan checked the size this cycle."""

    def write(self, content: bytes) -> None:
        try:
            super().write(content)
        finally:
            self._map.drop()


class VmDisks:
    """Every per-VM disk of one VM disk directory, as the disk-writer keeps them."""

    def __init__(self, vm_dir: VmDir, clock: Callable[[], float] = time.time) -> None:
        self.dir = vm_dir
        self.clock = clock
        self.disks: dict[str, VmDisk] = {}
        self.listed: set[str] = set()  # defined (or running) in the last listing
        self.problems: dict[str, str] = {}  # uuid -> the problem logged for it
        self.claims: int | None = None  # the claims lock, opened at the first removal

    def publish(self, host: bytes, fragments: dict[str, bytes],
                inactive: tuple[str, ...] | None, listed_at: float) -> None:
        """Write every defined domain's disk; remove those of domains now undefined.

        ``fragments``: the running domains' own metrics by UUID; ``inactive``:
        the defined domains that do not run, or None when libvirt could not be
        listed (then the disks already mapped get the host metrics and no file
        is made or removed); ``listed_at``: when (time.time()) the listing
        began.
        """
        entries = self.scan()
        if inactive is None:
            wanted = set(self.disks)
        else:
            wanted = set(fragments) | set(inactive)
            kept = self.remove_gone(wanted, entries, listed_at)
            # A gone domain's file kept for now is still one we saw: the next
            # listing that does not have it removes it.
            self.listed = wanted | kept
        created = 0
        for uuid in sorted(wanted):
            disk = self.disk_for(uuid, entries.get(uuid))
            if disk is None:
                continue
            created += uuid not in entries
            try:
                disk.write(assemble([host, fragments.get(uuid, b"")]))
            except DiskTooSmall as exc:
                self.problem(uuid, str(exc))
            except OSError as exc:
                self.problem(uuid, f"cannot write VM disk {self.dir.file(uuid)}: {exc}")
            else:
                self.recovered(uuid)
        if created:
            log.info("VM disks: created %d in %s", created, self.dir.path)

    def scan(self) -> dict[str, os.stat_result]:
        """lstat of every UUID-named entry of the directory (one getdents + fstatat each)."""
        found: dict[str, os.stat_result] = {}
        with os.scandir(self.dir.fd) as entries:
            for entry in entries:
                if UUID_RE.match(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        found[entry.name] = entry.stat(follow_symlinks=False)
        return found

    def disk_for(self, uuid: str, st: os.stat_result | None) -> VmDisk | None:
        """The mapped disk of ``uuid``, (re)opened if it is not what is mapped or too short."""
        disk = self.disks.get(uuid)
        if disk is not None:
            if (st is not None and (st.st_dev, st.st_ino) == disk.ident
                    and st.st_size >= self.dir.size):
                return disk
            log.warning("VM disk %s was removed, replaced or truncated while in use; "
                        "opening it again", self.dir.file(uuid))
            self.forget(uuid)
        try:
            handle = open_vm_disk(self.dir, uuid)
        except DiskRefused as exc:
            self.problem(uuid, f"{exc}; that VM's disk is not written")
            return None
        try:
            disk = VmDisk(handle)
        except (OSError, DiskRefused) as exc:
            self.problem(uuid, f"cannot map VM disk {self.dir.file(uuid)}: {exc}")
            return None
        finally:
            os.close(handle.fd)
        self.disks[uuid] = disk
        return disk

    def remove_gone(self, wanted: set[str], entries: dict[str, os.stat_result],
                    listed_at: float) -> set[str]:
        """Remove the files of domains not in ``wanted``; the seen ones kept for now."""
        removed = 0
        kept: set[str] = set()
        now = self.clock()
        for uuid, st in entries.items():
            if uuid in wanted:
                continue
            disk = self.disks.get(uuid)
            ours = disk is not None and (st.st_dev, st.st_ino) == disk.ident
            if not ours and (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1):
                continue  # not a file we made: never removed (any owner: see above)
            if ours or uuid in self.listed:
                # Gone since the last listing: unless claimed after this one was taken.
                if self.remove_unclaimed(uuid, st, listed_at - CLAIM_MARGIN):
                    removed += 1
                else:
                    kept.add(uuid)
            else:  # a domain we never saw: maybe about to start
                removed += self.remove_unclaimed(uuid, st, now - UNKNOWN_GRACE)
        for uuid in [u for u in self.disks if u not in wanted]:
            self.forget(uuid)  # removed, or claimed for a start: mapped again when listed
        for uuid in [u for u in self.problems if u not in wanted]:
            del self.problems[uuid]
        if removed:
            log.info("VM disks: removed %d in %s (domains no longer defined)", removed,
                     self.dir.path)
        return kept

    def remove_unclaimed(self, uuid: str, st: os.stat_result, unchanged_since: float) -> bool:
        """Remove the file ``st`` describes if it was not modified from ``unchanged_since``
        on; checked again under the claims lock, which a claim holds (disk/vmdir.py)."""
        if st.st_mtime >= unchanged_since:
            return False
        if self.claims is None:
            try:
                self.claims = open_claims_lock(self.dir)
            except DiskRefused as exc:  # its lock directory is unsafe: remove nothing
                self.problem(uuid, f"not removing VM disk {self.dir.file(uuid)}: {exc}")
                return False
        if self.claims is not None:
            try:
                fcntl.flock(self.claims, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a claim runs now: the next cycle looks again
        try:
            return self._remove_if_unchanged(uuid, st, unchanged_since)
        finally:
            if self.claims is not None:
                fcntl.flock(self.claims, fcntl.LOCK_UN)

    def _remove_if_unchanged(self, uuid: str, st: os.stat_result,
                             unchanged_since: float) -> bool:
        try:
            fd = os.open(uuid, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                         | os.O_NOCTTY, dir_fd=self.dir.fd)
        except OSError:
            return False  # gone already, or not a file to open
        try:
            if self.claims is None:  # no lock directory: the file's own flock
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or \
                    now.st_mtime >= unchanged_since:
                return False  # replaced or claimed since the scan
            os.unlink(uuid, dir_fd=self.dir.fd)
        except OSError:
            return False  # being claimed right now (EWOULDBLOCK), or gone
        finally:
            os.close(fd)
        return True

    def forget(self, uuid: str) -> None:
        disk = self.disks.pop(uuid, None)
        if disk is not None:
            disk.close()

    def problem(self, uuid: str, message: str) -> None:
        if self.problems.get(uuid) != message:
            log.error("%s", message)
        self.problems[uuid] = message

    def recovered(self, uuid: str) -> None:
        if self.problems.pop(uuid, None) is not None:
            log.info("VM disk %s written again", self.dir.file(uuid))

    def close(self) -> None:
        for uuid in list(self.disks):
            self.forget(uuid)
        if self.claims is not None:
            os.close(self.claims)
            self.claims = None
