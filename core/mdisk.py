"""The metrics disk format, shared by the host writer and the guest reader.

Layout (all big-endian uint32), then the XML document at offset 16::

    0  signature  b"mvbd"
    4  busy       1 while the writer is mid-update, 0 when stable
    8  checksum   sum of the content bytes taken as *signed* chars, mod 2**32
   12  length     content length in bytes

The C original sums ``char`` on x86 (signed); other writers (KubeVirt) sum
unsigned bytes, so readers accept either.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

SIGNATURE = b"mvbd"
HEADER = struct.Struct(">4sIII")
HEADER_SIZE = HEADER.size
BUSY_OFFSET = 4
# The C guest library and vm-dump-metrics read the disk in whole 64 KiB
# O_DIRECT blocks: a smaller disk cannot be read by them at all, and a
# document that runs into a last, partial block fails to read.
BLOCK_SIZE = 64 * 1024
MIN_SIZE = BLOCK_SIZE
MAX_SIZE = 256 * 1024 * 1024
DEFAULT_SIZE = 256 * 1024


def document_capacity(size: int) -> int:
    """The longest document a disk of ``size`` bytes holds for every guest.

    Only its whole 64 KiB blocks count: what lies past the last one is out of
    a C guest's reach.
    """
    return size - size % BLOCK_SIZE - HEADER_SIZE

# Bytes >= 0x80 are negative as signed chars: deleting them lets us count them
# at C speed instead of looping in Python.
_HIGH_BYTES = bytes(range(0x80, 0x100))


class DiskError(Exception):
    """A metrics disk that cannot be read; the message says why in one line."""


class DiskFormatError(DiskError):
    """Bad signature, impossible length, or checksum mismatch."""


class DiskBusyError(DiskError):
    """The writer kept the disk busy (or changing) for longer than we wait."""


@dataclass(frozen=True, slots=True)
class Header:
    signature: bytes
    busy: int
    checksum: int
    length: int


def checksum_signed(content: bytes) -> int:
    """The C original's sum: each byte as a signed char, modulo 2**32."""
    high = len(content) - len(content.translate(None, _HIGH_BYTES))
    return (sum(content) - 256 * high) & 0xFFFFFFFF


def checksum_unsigned(content: bytes) -> int:
    return sum(content) & 0xFFFFFFFF


def checksum_matches(content: bytes, stored: int) -> bool:
    return stored in (checksum_signed(content), checksum_unsigned(content))


def pack_header(busy: int, checksum: int, length: int) -> bytes:
    return HEADER.pack(SIGNATURE, busy, checksum, length)


def unpack_header(buf: bytes) -> Header:
    if len(buf) < HEADER_SIZE:
        raise DiskFormatError(f"short header: {len(buf)} bytes")
    sig, busy, checksum, length = HEADER.unpack_from(buf)
    return Header(sig, busy, checksum, length)


def is_metrics_disk(buf: bytes) -> bool:
    return buf[:4] == SIGNATURE


ReadAt = Callable[[int, int], bytes]


def read_document(
    read_at: ReadAt,
    device_size: int | None = None,
    *,
    timeout: float = 5.0,
    delay: float = 0.01,
    where: str = "disk",
) -> bytes:
    """Read one stable document with the busy/recheck protocol.

    ``read_at(offset, length)`` returns bytes from the disk. Retries while the
    writer is busy or the content changes under us, for at most ``timeout``
    seconds (the C original retries forever), then raises DiskBusyError.
    Raises DiskFormatError for a disk that is not a metrics disk or is corrupt.
    """
    deadline = time.monotonic() + timeout
    last_problem = "busy"
    mismatches = 0
    while True:
        head = unpack_header(read_at(0, HEADER_SIZE))
        if head.signature != SIGNATURE:
            raise DiskFormatError(f"{where}: bad signature {head.signature!r}, not a metrics disk")
        if not head.busy:
            if device_size is not None and HEADER_SIZE + head.length > device_size:
                raise DiskFormatError(
                    f"{where}: content length {head.length} runs past the end of the "
                    f"{device_size}-byte disk"
                )
            if head.length > MAX_SIZE:
                raise DiskFormatError(f"{where}: content length {head.length} is too large")
            content = read_at(HEADER_SIZE, head.length)
            again = unpack_header(read_at(0, HEADER_SIZE))
            if again.busy == 0 and again.checksum == head.checksum and again.length == head.length:
                if len(content) != head.length:
                    raise DiskFormatError(
                        f"{where}: content length {head.length} runs past the end of the disk"
                    )
                if checksum_matches(content, head.checksum):
                    return content
                # A stable header whose content does not match is corrupt, unless
                # the writer rewrote it twice in between: a few retries tell.
                mismatches += 1
                last_problem = f"checksum mismatch (stored {head.checksum:#x})"
                if mismatches >= 3:
                    raise DiskFormatError(f"{where}: {last_problem}")
            else:
                last_problem = "content changed while reading"
        if time.monotonic() >= deadline:
            if last_problem.startswith("checksum"):
                raise DiskFormatError(f"{where}: {last_problem}")
            raise DiskBusyError(f"{where}: still {last_problem} after {timeout:g} s")
        time.sleep(delay)
