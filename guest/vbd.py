"""The vbd transport: find the metrics disk among the guest's block devices and read it.

Reads use O_DIRECT into a page-aligned buffer so every read reaches the device:
through the page cache a guest could keep seeing an old copy of a disk the host
rewrites underneath it. The header and content are read with the shared
busy/recheck protocol (:func:`vhostmd.mdisk.read_document`), bounded in time.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from types import TracebackType

from vhostmd.guest.errors import CorruptDisk, DiskBusy, NoMetricsDisk, TransportError
from vhostmd.mdisk import (
    HEADER_SIZE,
    MIN_SIZE,
    DiskBusyError,
    DiskFormatError,
    is_metrics_disk,
    read_document,
)

# A multiple of every logical block size O_DIRECT may demand (512 .. 4096), and
# the page size, so buffers from an anonymous mmap are always suitably aligned.
ALIGNMENT = 4096
SYS_BLOCK = "/sys/block"
DEV_DIR = "/dev"
DEFAULT_TIMEOUT = 5.0

Log = Callable[[str], None]


def _no_log(_message: str) -> None:
    pass


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


class BlockReader:
    """Aligned, uncached reads of a block device or disk image file.

    O_DIRECT is dropped only for a regular file on a filesystem that refuses
    it (tmpfs on older kernels, e.g. ``/dev/shm/vhostmd0`` given by ``--disk``);
    a block device that refuses it is an error, never a silent cached read.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.direct = True
        self._buffer: mmap.mmap | None = None
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not _is_regular_file(path):
                raise
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.direct = False
        try:
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            self.close()
            raise

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end of the device)."""
        if length <= 0:
            return b""
        start = offset - offset % ALIGNMENT
        span = _round_up(offset + length, ALIGNMENT) - start
        buffer = self._aligned_buffer(span)
        with memoryview(buffer) as whole, whole[:span] as view:
            got = self._fill(view, start)
            skip = offset - start
            return bytes(view[skip : max(skip, min(got, skip + length))])

    def _aligned_buffer(self, size: int) -> mmap.mmap:
        if self._buffer is None or len(self._buffer) < size:
            if self._buffer is not None:
                self._buffer.close()
            # Anonymous mappings start on a page boundary: the alignment O_DIRECT needs.
            self._buffer = mmap.mmap(-1, size)
        return self._buffer

    def _fill(self, view: memoryview, position: int) -> int:
        got = 0
        while got < len(view):
            try:
                count = os.preadv(self._fd, [view[got:]], position + got)
            except OSError as exc:
                # Some filesystems accept O_DIRECT at open and refuse it at read.
                if exc.errno == errno.EINVAL and self.direct and _is_regular_fd(self._fd):
                    self._reopen_cached()
                    continue
                raise
            if count == 0:
                break
            got += count
        return got

    def _reopen_cached(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        os.close(self._fd)
        self._fd = fd
        self.direct = False


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _is_regular_fd(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def read_disk(path: str, *, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The document stored on the metrics disk at ``path`` (device or image file).

    Raises CorruptDisk, DiskBusy (after ``timeout`` seconds) or TransportError.
    """
    try:
        with BlockReader(path) as reader:
            return read_document(reader.read_at, reader.size, timeout=timeout, where=path)
    except DiskBusyError as exc:
        raise DiskBusy(str(exc)) from None
    except DiskFormatError as exc:
        raise CorruptDisk(str(exc)) from None
    except OSError as exc:
        raise TransportError(f"{path}: {exc.strerror or exc}") from None


def block_devices(
    sys_block: str = SYS_BLOCK, dev_dir: str = DEV_DIR, log: Log = _no_log
) -> Iterator[str]:
    """Device nodes of the whole disks listed in ``sys_block``, big enough for a metrics disk."""
    try:
        names = sorted(os.listdir(sys_block))
    except OSError as exc:
        log(f"cannot list {sys_block}: {exc.strerror}")
        return
    for name in names:
        # sysfs spells a "/" in a device name as "!" (cciss!c0d0 is /dev/cciss/c0d0).
        path = os.path.join(dev_dir, name.replace("!", "/"))
        size = _sysfs_size(os.path.join(sys_block, name))
        # Empty loop devices, drives without media: nothing to open or wait for.
        if size is not None and size < MIN_SIZE:
            log(f"skipping {path}: {size} bytes")
            continue
        yield path


def _sysfs_size(device_dir: str) -> int | None:
    try:
        with open(os.path.join(device_dir, "size")) as size_file:
            return int(size_file.read()) * 512  # always in 512-byte sectors
    except (OSError, ValueError):
        return None


def find_metrics_disks(
    sys_block: str = SYS_BLOCK, dev_dir: str = DEV_DIR, log: Log = _no_log
) -> Iterator[str]:
    """Block devices whose first bytes carry the metrics disk signature, in name order."""
    for path in block_devices(sys_block, dev_dir, log):
        try:
            with BlockReader(path) as reader:
                head = reader.read_at(0, HEADER_SIZE)
        except OSError as exc:
            log(f"skipping {path}: {exc.strerror or exc}")
            continue
        if is_metrics_disk(head):
            yield path
        else:
            log(f"{path}: not a metrics disk")


def read_first_disk(
    *,
    timeout: float = DEFAULT_TIMEOUT,
    sys_block: str = SYS_BLOCK,
    dev_dir: str = DEV_DIR,
    log: Log = _no_log,
) -> tuple[str, bytes]:
    """(device, document) of the first metrics disk found by scanning ``sys_block``."""
    for path in find_metrics_disks(sys_block, dev_dir, log):
        log(f"metrics disk found on {path}")
        return path, read_disk(path, timeout=timeout)
    raise NoMetricsDisk(f"no block device in {sys_block} carries a metrics disk")
