"""A metrics disk mapped for writing, and its write protocol (docs/formats.md, section 1.4).

busy=1 -> flush -> header (checksum, length) and content (and zeros over
what a longer previous document left after it) -> flush -> busy=0 -> flush,
so readers that bypass the page cache (O_DIRECT guests) see the steps in
order too. A document that does not fit is refused and the previous one
stays. Used by the disk-writer process for the shared disk and for each
per-VM disk.
"""

from __future__ import annotations

import logging
import mmap
import os

from vhostmd import mdisk
from vhostmd.disk.handle import DiskHandle, DiskRefused, fit

log = logging.getLogger("vhostmd")

_BUSY = (1).to_bytes(4, "big")
_IDLE = (0).to_bytes(4, "big")


class DiskTooSmall(ValueError):
    pass


TOO_LARGE_PLACEHOLDER = (
    b"<metrics>\n  <!-- the metrics document is larger than this disk -->\n</metrics>\n"
)


class DiskShrunk(Exception):
    """The disk file is shorter than its mapping and could not be restored."""


class MetricsDisk:
    """A metrics disk (regular file or block device) mapped for writing.

    Mapped from the descriptor of a DiskHandle that the supervisor opened and
    locked: the writer never opens the disk's path itself.
    """

    def __init__(self, handle: DiskHandle) -> None:
        self.handle = handle
        self.path = handle.path
        self.size = handle.size
        fit(handle)  # also restores a file cut shorter while no writer ran
        self._map = self._map_file(handle)
        self.capacity = mdisk.document_capacity(self.size)
        self.published = False
        self.truncated_seen = False  # a truncation was logged, until a write finds it intact
        if not self._keep_previous():
            self._reset()

    def _map_file(self, handle: DiskHandle) -> mmap.mmap:
        return mmap.mmap(handle.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _keep_previous(self) -> bool:
        """Keep a valid document a previous writer left (a restart, an upgrade): True if kept.

        Guests holding the file open go on reading it until the first new
        document, instead of finding the disk busy; whatever follows it is
        zeroed. A disk without a valid, complete document is reset.
        """
        m = self._map
        try:
            head = mdisk.unpack_header(bytes(m[0 : mdisk.HEADER_SIZE]))
        except mdisk.DiskFormatError:
            return False
        if (head.signature != mdisk.SIGNATURE or head.busy != 0 or head.length == 0
                or head.length > self.capacity):
            return False
        end = mdisk.HEADER_SIZE + head.length
        if not mdisk.checksum_matches(bytes(m[mdisk.HEADER_SIZE : end]), head.checksum):
            return False
        m[end:] = bytes(self.size - end)
        m.flush()
        self.end = end
        self.published = True  # a too-large first document keeps this one
        return True

    def _reset(self) -> None:
        """Busy first (keeping the signature), then zero the rest: guests wait, not fail."""
        m = self._map
        m[0 : mdisk.HEADER_SIZE] = mdisk.pack_header(1, 0, 0)
        m.flush()
        m[mdisk.HEADER_SIZE :] = bytes(self.size - mdisk.HEADER_SIZE)
        m.flush()
        self.end = mdisk.HEADER_SIZE  # everything after here is zero

    def _check_size(self) -> None:
        """A file cut shorter under the mapping would SIGBUS the next write: restore it first.

        Only root can truncate the (root-owned, 0644) file, but a crash loop
        of writers is no answer to an administrator's mistake either. A
        truncation in the short window between this check and the write still
        kills this writer once; its replacement restores the size on start.
        """
        if not self.handle.regular:
            return
        now = os.fstat(self.handle.fd).st_size
        if now >= self.size:
            self.truncated_seen = False
            return
        try:
            fit(self.handle)
        except DiskRefused as exc:
            raise DiskShrunk(f"metrics disk {self.path} was truncated to {now} "
                             f"bytes and cannot be restored ({exc}); not writing it") from None
        if not self.truncated_seen:
            log.warning("metrics disk %s was truncated to %d bytes while in use; restored its "
                        "size of %d bytes", self.path, now, self.size)
        self.truncated_seen = True
        self._reset()

    def write(self, content: bytes) -> None:
        """Publish one document; raises DiskTooSmall (keeping the old one) if it does not fit."""
        self._check_size()
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
        if self.end > end:
            # What a longer previous document left after the end of this one
            # (metrics of VMs now gone) must not stay readable to every guest.
            m[end : self.end] = bytes(self.end - end)
        m.flush()
        m[4:8] = _IDLE
        m.flush()
        self.end = end
        self.published = True

    def close(self) -> None:
        self._map.close()
