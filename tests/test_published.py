"""Each cycle's result in shared memory: slots, placements, and who may rewrite what.

Real memfds; the readers are test doubles that record what they were sent
(the daemon-level tests run the real disk-writer and virtio process on it).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import pwd
from collections.abc import Iterator

import pytest

from vhostmd.document import DOCUMENT_OPEN, assemble
from vhostmd.runtime.published import (
    MIN_VIEW,
    Placement,
    PublicationTooLarge,
    SharedSlots,
    pack_fragments,
    unpack_fragments,
)
from vhostmd.supervisor.cycle import Rendered
from vhostmd.supervisor.publisher import Publisher
from vhostmd.wire import Domain


class Reader:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, message: tuple) -> None:
        self.sent.append(message)


def rendered(n: int, cycle: int, on_disk: int | None = None) -> Rendered:
    host = f"<host cycle='{cycle}'/>\n".encode()
    fragments = {vm: f"<vm id='{vm}' cycle='{cycle}'/>\n".encode() for vm in range(1, n + 1)}
    kept = list(fragments.values())[: n if on_disk is None else on_disk]
    return Rendered(assemble([host, *kept]), host, fragments,
                    tuple(Domain(vm, f"vm{vm}", f"uuid-{vm}") for vm in fragments),
                    published=n + 1, left_out=0, vms_not_on_disk=n - len(kept))


@pytest.fixture
def slots() -> Iterator[SharedSlots]:
    made = SharedSlots(slot_size=1 << 20)
    yield made
    made.close()


@pytest.mark.parametrize("on_disk", [5, 3, 0])  # all, two left off the disk, none
def test_a_placement_finds_the_document_host_and_every_vm(slots: SharedSlots,
                                                         on_disk: int) -> None:
    result = rendered(5, cycle=1, on_disk=on_disk)
    placed = slots.write(2, 7, result.document, len(DOCUMENT_OPEN.encode()),
                         result.host_fragment, list(result.vm_fragments),
                         list(result.vm_fragments.values()), on_disk)
    assert (placed.seq, placed.slot) == (7, 2)
    assert slots.read(placed, 0, placed.document_end) == result.document
    host, vms = slots.take(placed)
    assert host == result.host_fragment
    assert {vm: vms.get(vm) for vm in range(1, 6)} == result.vm_fragments
    assert vms.get(6) is None and len(vms) == 5


def started_child(shared: SharedSlots) -> SharedSlots:
    """The copy a child builds when it is started (what ``__reduce__`` hands over)."""
    rebuild, (fd, *rest) = shared.__reduce__()
    return rebuild(type(fd)(os.dup(fd.fd)), *rest)


def test_children_map_it_read_only_and_nobody_can_resize_it(slots: SharedSlots) -> None:
    child = started_child(slots)
    try:
        placed = slots.write(1, 1, b"<metrics/>", 0, b"", [], [], 0)
        assert child.read(placed) == b"<metrics/>"
        with pytest.raises(TypeError):
            child.view(1, 1)[0:1] = b"x"
        # Its descriptor is a read-only one: no writable mapping, no write.
        assert fcntl.fcntl(child.fd.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(PermissionError):
            mmap.mmap(child.fd.fd, 4096)
        with pytest.raises(OSError):
            os.pwrite(child.fd.fd, b"x", 0)
    finally:
        child.close()
    # Sealed: a child truncating it would make the supervisor's writes fault.
    with pytest.raises(PermissionError):
        os.ftruncate(slots.fd.fd, 4096)


def test_a_reader_that_is_not_root_cannot_reopen_it_for_writing(slots: SharedSlots) -> None:
    """A -u disk-writer or virtio holds the read-only descriptor: /proc/self/fd/N
    reopened O_RDWR would let it forge what virtio serves."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to become another user")
    nobody = pwd.getpwnam("nobody")
    placed = slots.write(0, 1, b"<metrics/>", 0, b"", [], [], 0)
    fd = slots.read_only_fd.fd
    pid = os.fork()
    if pid == 0:  # the reader, as another user: exit 0 only if it reads and cannot write
        status = 1
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            if mmap.mmap(fd, 4096, prot=mmap.PROT_READ)[: placed.end] == b"<metrics/>":
                try:
                    os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR))
                except PermissionError:
                    status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_each_process_maps_only_what_it_has_used() -> None:
    shared = SharedSlots()  # the daemon's size: three 128 MiB slots
    child = started_child(shared)
    try:
        assert shared.mapped() == 0 and child.mapped() == 0
        small = shared.write(0, 1, b"x" * 1000, 0, b"", [], [], 0)
        assert child.read(small) == b"x" * 1000
        assert shared.mapped() == child.mapped() == MIN_VIEW
        big = shared.write(2, 2, b"y" * (3 << 20), 0, b"", [], [], 0)  # 3 MiB
        assert child.read(big, 0, 10) == b"y" * 10  # the child maps what it reads
        assert child.mapped() == 2 * MIN_VIEW
        assert child.read(big) == b"y" * (3 << 20) and child.read(small) == b"x" * 1000
        # Slot 2 maps 4 MiB (the next power of two), slot 0 still its least.
        assert shared.mapped() == child.mapped() == MIN_VIEW + (4 << 20)
    finally:
        child.close()
        shared.close()


def test_a_slot_a_reader_holds_is_never_rewritten(slots: SharedSlots) -> None:
    writer, virtio = Reader(), Reader()
    publisher = Publisher(lambda: writer, lambda: virtio, slots=slots)
    publisher.publish(rendered(3, cycle=1))
    [(seq, to_disk, _vms)] = writer.sent
    [(_kind, to_virtio, names)] = virtio.sent
    assert to_disk == to_virtio and seq == 1  # written once, for both
    assert names == ((1, "vm1"), (2, "vm2"), (3, "vm3"))
    held = slots.read(to_virtio)
    # Virtio never takes its copy (hung); the writer acknowledges every cycle.
    for cycle in range(2, 8):
        publisher.written(None, None)
        publisher.publish(rendered(3, cycle=cycle))
        latest = writer.sent[-1][1]
        assert isinstance(latest, Placement) and latest.slot != to_virtio.slot
        assert slots.read(latest, 0, latest.document_end) == publisher.latest.document
        assert slots.read(to_virtio) == held  # untouched all along
    assert len(virtio.sent) == 1  # nothing more while it holds one
    publisher.virtio_took()
    [(_kind, newest, _names)] = virtio.sent[1:]
    host, _vms = slots.take(newest)
    assert host == b"<host cycle='7'/>\n"


def test_a_restarted_reader_gets_the_latest_at_once_and_holds_nothing_old(
        slots: SharedSlots) -> None:
    writer, virtio = Reader(), Reader()
    publisher = Publisher(lambda: writer, lambda: virtio, slots=slots)
    publisher.publish(rendered(2, cycle=1))
    publisher.virtio_started()  # the old one died holding slot 0
    assert publisher.held.get("virtio") == virtio.sent[-1][1].slot
    assert len(virtio.sent) == 2 and virtio.sent[-1][1].seq == 1


def test_a_publication_larger_than_a_slot_is_refused_once(
        caplog: pytest.LogCaptureFixture) -> None:
    small = SharedSlots(slot_size=4096)
    try:
        writer, virtio = Reader(), Reader()
        publisher = Publisher(lambda: writer, lambda: virtio, slots=small)
        with caplog.at_level(logging.ERROR, "vhostmd"):
            publisher.publish(rendered(200, cycle=1))
            publisher.publish(rendered(200, cycle=2))
        assert writer.sent == [] and virtio.sent == []
        assert caplog.text.count("not publishing: a cycle's metrics take") == 1
        publisher.publish(rendered(2, cycle=3))  # fits again
        assert len(writer.sent) == 1 and len(virtio.sent) == 1
    finally:
        small.close()


def test_worker_fragments_go_through_its_slot_and_come_back_whole() -> None:
    region = SharedSlots(slots=1, slot_size=1 << 20)
    try:
        worker_side = SharedSlots(os.dup(region.fd.fd), 1, region.slot_size, writable=True)
        fragments = tuple((vm, f"<metric vm='{vm}'/>\n".encode() * (vm % 3 + 1))
                          for vm in (3, 1, 2, 10))
        packed = pack_fragments(worker_side, fragments)
        assert len(packed) == 8 * 2 * len(fragments)  # ids and ends only
        assert unpack_fragments(region, packed) == fragments
        assert unpack_fragments(region, pack_fragments(worker_side, ())) == ()
        with pytest.raises(PublicationTooLarge):
            pack_fragments(worker_side, ((1, bytes(region.slot_size + 1)),))
        worker_side.close()
    finally:
        region.close()
