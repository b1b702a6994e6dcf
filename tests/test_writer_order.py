"""The disk-writer's write order, recorded step by step (a unit test, no processes).

Guests that read with O_DIRECT bypass the page cache: they only see what an
msync wrote. So the order is the protocol (docs/formats.md, section 1.4):
busy=1 -> flush -> header and content (and zeros after a shorter document)
-> flush -> busy=0 -> flush. The real mapping is wrapped by a recorder that
logs every store and every flush, in order.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vhostmd import mdisk
from vhostmd.disk.handle import open_disk
from vhostmd.disk.mapped import MetricsDisk


class RecordingMap:
    """Wraps an mmap: stores and flushes go through, and are written down."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.steps: list[tuple] = []

    def __setitem__(self, key: slice, value: bytes) -> None:
        self.steps.append(("store", key.start, key.stop, bytes(value)))
        self.real[key] = value  # type: ignore[index]

    def __getitem__(self, key: slice) -> bytes:
        return self.real[key]  # type: ignore[index]

    def flush(self) -> None:
        self.steps.append(("flush",))
        self.real.flush()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.real.close()  # type: ignore[attr-defined]


@pytest.fixture
def disk(tmp_path: Path) -> MetricsDisk:
    handle = open_disk(str(tmp_path / "vhostmd0"), 64 * 1024)
    disk = MetricsDisk(handle)
    disk._map = RecordingMap(disk._map)  # type: ignore[assignment]
    yield disk
    disk.close()
    handle.close()


def phases(steps: list[tuple]) -> list[list[tuple]]:
    """The stores between flushes: [[stores before flush 1], [before flush 2], ...]."""
    out: list[list[tuple]] = [[]]
    for step in steps:
        if step[0] == "flush":
            out.append([])
        else:
            out[-1].append(step)
    return out


def test_busy_then_header_and_content_then_idle_each_flushed(disk: MetricsDisk) -> None:
    content = b"<metrics>\n</metrics>\n"
    disk.write(content)
    recorded = phases(disk._map.steps)  # type: ignore[attr-defined]
    assert len(recorded) == 4 and recorded[3] == []  # three flushes, nothing after the last
    busy, body, idle = recorded[:3]
    assert busy == [("store", 4, 8, (1).to_bytes(4, "big"))]
    header = mdisk.unpack_header(body[0][3])
    assert body[0][1:3] == (0, mdisk.HEADER_SIZE)
    assert (header.signature, header.busy, header.length) == (b"mvbd", 1, len(content))
    assert header.checksum == mdisk.checksum_signed(content)
    assert body[1] == ("store", mdisk.HEADER_SIZE, mdisk.HEADER_SIZE + len(content), content)
    assert idle == [("store", 4, 8, (0).to_bytes(4, "big"))]


def test_a_shorter_document_zeroes_the_old_tail_before_busy_is_cleared(
        disk: MetricsDisk) -> None:
    long = b"<metrics>\n" + b"  <!-- " + b"x" * 500 + b" -->\n</metrics>\n"
    short = b"<metrics>\n</metrics>\n"
    disk.write(long)
    disk._map.steps.clear()  # type: ignore[attr-defined]
    disk.write(short)
    busy, body, idle, _ = phases(disk._map.steps)  # type: ignore[attr-defined]
    end = mdisk.HEADER_SIZE + len(short)
    zeros = [s for s in body if s[1] == end]
    assert zeros == [("store", end, mdisk.HEADER_SIZE + len(long), bytes(len(long) - len(short)))]
    assert busy[0][3] == (1).to_bytes(4, "big") and idle[0][3] == (0).to_bytes(4, "big")
    raw = disk._map[0 : mdisk.HEADER_SIZE + len(long)]  # type: ignore[index]
    assert raw[end:] == bytes(len(long) - len(short))
