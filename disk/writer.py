"""The disk-writer process: owns an mmap of the metrics disk.

Write protocol (docs/formats.md, section 1.4): busy=1 -> flush -> header and
content -> flush -> busy=0 -> flush, so readers that bypass the
page cache (O_DIRECT guests) see the steps in order too. A document that does
not fit is refused and the previous one stays.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat

from vhostmd import mdisk
from vhostmd.runtime.child import ChildContext, serve

log = logging.getLogger("vhostmd")

_BUSY = (1).to_bytes(4, "big")
_IDLE = (0).to_bytes(4, "big")


class DiskTooSmall(ValueError):
    pass


TOO_LARGE_PLACEHOLDER = (
    b"<metrics>\n  <!-- the metrics document is larger than this disk -->\n</metrics>\n"
)


class MetricsDisk:
    """A metrics disk file (or block device) mapped for writing."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                if st.st_size != size:
                    os.ftruncate(fd, size)
                # Reserve the blocks now: a full filesystem is then a clear error
                # here instead of a SIGBUS on a later write into the mapping.
                os.posix_fallocate(fd, 0, size)
            elif stat.S_ISBLK(st.st_mode):
                end = os.lseek(fd, 0, os.SEEK_END)
                if end < size:
                    raise DiskTooSmall(f"{path}: block device has {end} bytes, need {size}")
            else:
                raise DiskTooSmall(f"{path}: not a regular file or block device")
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.capacity = size - mdisk.HEADER_SIZE
        self.published = False
        self._reset()

    def _reset(self) -> None:
        """Busy first (keeping the signature), then zero the rest: guests wait, not fail."""
        m = self._map
        m[0 : mdisk.HEADER_SIZE] = mdisk.pack_header(1, 0, 0)
        m.flush()
        m[mdisk.HEADER_SIZE :] = bytes(self.capacity)
        m.flush()

    def write(self, content: bytes) -> None:
        """Publish one document; raises DiskTooSmall (keeping the old one) if it does not fit."""
        if len(content) > self.capacity:
            if not self.published:
                # Nothing to keep yet: publish a valid, empty document rather than
                # leave guests facing busy=1 until a document fits.
                self.write(TOO_LARGE_PLACEHOLDER)
            raise DiskTooSmall(
                f"document of {len(content)} bytes does not fit the {self.size}-byte disk "
                f"{self.path}; keeping the previous one"
            )
        m = self._map
        end = mdisk.HEADER_SIZE + len(content)
        m[4:8] = _BUSY
        m.flush()
        m[0 : mdisk.HEADER_SIZE] = mdisk.pack_header(
            1, mdisk.checksum_signed(content), len(content)
        )
        m[mdisk.HEADER_SIZE : end] = content
        m.flush()
        m[4:8] = _IDLE
        m.flush()
        self.published = True

    def close(self) -> None:
        self._map.close()


def disk_writer_main(ctx: ChildContext, path: str, size: int) -> None:
    """Child main: write each document the supervisor sends, acknowledge each."""
    ctx.title(f"disk-writer {path}")
    try:
        disk = MetricsDisk(path, size)
    except (OSError, DiskTooSmall) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        ctx.send(("disk-failed", f"cannot open metrics disk {path}: {reason}"))
        raise SystemExit(1) from None
    ctx.send(("disk-ready", path))
    idle = f"disk-writer {path}"

    def handle(message: tuple[int, bytes]) -> None:
        seq, content = message
        ctx.title(f"{idle} writing")
        try:
            disk.write(content)
        except DiskTooSmall as exc:
            ctx.send(("disk-written", seq, "too-large", str(exc)))
        except OSError as exc:
            ctx.send(("disk-written", seq, f"os-error {exc.errno}", str(exc)))
        else:
            ctx.send(("disk-written", seq, None, None))

    serve(ctx, handle, idle)
