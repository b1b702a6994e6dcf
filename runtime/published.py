"""Cycle results in shared memory: written once by the supervisor, read by the children.

A 1000-VM document is about 700 KB. Pickled through a queue it is copied
five times and crosses a 64 KB pipe in a dozen wake-ups, once to the
disk-writer and once more (as fragments) to the virtio process: per cycle,
more CPU than rendering it. Instead the supervisor writes each cycle's
*publication* into a slot of a memfd that both children map, and their
queues carry only where it is (``Placement``, a few hundred bytes).

A slot holds the document, then the fragments of VMs left off the disk (too
small a disk): everything virtio serves. ``Placement`` says where the
document ends, where the host fragment and each VM's fragment are.

The other way, each worker gets a result region of its own (a one-slot
``SharedSlots``, ``writable`` in the worker) for the VM fragments of its results: ``pack_fragments``
writes them back to back, the result carries only their ids and ends, and
the supervisor copies them out (``unpack_fragments``) before it gives that
worker its next job, so the slot is never rewritten while unread. A region
belongs to one worker process: a replacement gets a new one.

Slots are handed out by the supervisor (``vhostmd.supervisor.publisher``):
each reader has at most one placement in flight and acknowledges it, a slot
is rewritten only when no reader holds it, and with SLOTS = 3 one is always
free. Readers copy what they need out of the slot when a placement arrives.

The memfd has no name in any filesystem: only the daemon's processes hold
it. It is sealed against shrinking and growing, so no child can truncate it
under the supervisor's mapping. Pages are allocated only where written, and
each process maps only the part of a slot it has used (``SharedSlots.view``).
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter
from typing import Any

from vhostmd.runtime.child import InheritedFd

SLOTS = 3
# A slot's room: sparse, so only what a publication writes uses memory.
# 128 MiB is about 180,000 VMs' fragments.
SLOT_SIZE = 128 * 1024 * 1024
# Each process maps only as much of a slot as it has needed so far, from this
# much up in powers of two: a mapping's length is what ps and top show as
# VSZ, and three 128 MiB slots for every reader and a region for every worker
# made the supervisor look like a gigabyte. At 1000 VMs a slot maps 2 MiB.
MIN_VIEW = 256 * 1024


class PublicationTooLarge(ValueError):
    """A publication larger than a slot (str() says how large)."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one publication is: slot, document length, host and VM fragment spans.

    ``spans`` packs the VM ids, then their fragments' starts, then their
    ends, as signed 64-bit integers (array "q", native order: only the
    daemon's own processes read it). Built and read without a Python loop
    per VM: at 1000 VMs that is most of what publishing costs.
    """

    seq: int
    slot: int
    document_end: int
    end: int  # the document and the fragments left off it
    host: tuple[int, int]
    spans: bytes

    def vm_spans(self) -> dict[int, tuple[int, int]]:
        values = array.array("q")
        values.frombytes(self.spans)
        n = len(values) // 3
        ids, starts, ends = values[:n], values[n : 2 * n], values[2 * n :]
        return dict(zip(ids, zip(starts, ends, strict=True), strict=True))


class SharedSlots:
    """The memfd of publications, mapped by the supervisor and the children it is given to.

    Every process keeps the descriptor and maps each slot on its own, only as
    far as it has been used (``view``). The memfd's size never changes
    (sealed), so a mapping can never fault; only the views grow. A child
    that only reads gets a read-only descriptor of its own (reopened through
    /proc), so it can neither write a publication nor map one writable.
    """

    def __init__(self, fd: int | None = None, slots: int = SLOTS,
                 slot_size: int = SLOT_SIZE, writable: bool = False) -> None:
        self.slots = slots
        self.slot_size = slot_size
        # In a child: whether it maps its slots writable. For the supervisor,
        # which always writes: whether the children it hands this to write
        # (a worker's result region) or only read (publications).
        self.writable = writable
        self.views: list[mmap.mmap | None] = [None] * slots
        self.read_only_fd = InheritedFd(-1)
        writes = fd is None or writable
        self.prot = mmap.PROT_READ | (mmap.PROT_WRITE if writes else 0)
        if fd is None:  # the supervisor: create, size and seal it
            fd = os.memfd_create("vhostmd-publications", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, slots * slot_size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            if not writable:
                self.read_only_fd = InheritedFd(
                    os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC))
                # A memfd is made 0777: a reader running as -u USER could
                # reopen its read-only descriptor through /proc for writing.
                os.fchmod(fd, 0o400)
        self.fd = InheritedFd(fd)

    def view(self, slot: int, need: int) -> mmap.mmap:
        """This process's mapping of ``slot``, at least ``need`` bytes long."""
        current = self.views[slot]
        if current is not None and len(current) >= need:
            return current
        if need > self.slot_size:
            raise PublicationTooLarge(f"{need} bytes do not fit a {self.slot_size}-byte slot")
        length = min(self.slot_size, max(MIN_VIEW, 1 << max(need - 1, 0).bit_length()))
        grown = mmap.mmap(self.fd.fd, length, prot=self.prot, offset=slot * self.slot_size)
        if current is not None:
            current.close()
        self.views[slot] = grown
        return grown

    def mapped(self) -> int:
        """Bytes this process maps (what its VSZ holds of the slots)."""
        return sum(len(view) for view in self.views if view is not None)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Only while a child is being started: the descriptor travels with it,
        # the read-only one to a child that only reads.
        fd = self.fd if self.writable else self.read_only_fd
        return (_rebuild, (fd, self.slots, self.slot_size, self.writable))

    def write(self, slot: int, seq: int, document: bytes, prefix: int, host: bytes,
              vm_ids: list[int], fragments: list[bytes], on_disk: int) -> Placement:
        """Write one publication into ``slot``; return where everything is.

        ``document`` is ``prefix`` bytes of wrapper, ``host``, the first
        ``on_disk`` of ``fragments`` (of the VMs ``vm_ids``, in order), then
        the closing wrapper; the other fragments did not fit the disk and
        follow the document (virtio serves them all).
        """
        left_off = b"".join(fragments[on_disk:])
        end = len(document) + len(left_off)
        if end > self.slot_size:
            raise PublicationTooLarge(
                f"a cycle's metrics take {end} bytes, more than the {self.slot_size} "
                f"bytes the daemon can publish")
        view = self.view(slot, end)
        view[: len(document)] = document
        view[len(document) : end] = left_off
        host_end = prefix + len(host)
        lengths = list(map(len, fragments))
        # Fragments on the disk follow the host's, the others the document.
        in_document = list(accumulate(lengths[:on_disk], initial=host_end))
        after = list(accumulate(lengths[on_disk:], initial=len(document)))
        starts = array.array("q", in_document[:-1])
        starts.extend(after[:-1])
        ends = array.array("q", in_document[1:])
        ends.extend(after[1:])
        spans = array.array("q", vm_ids)
        spans.extend(starts)
        spans.extend(ends)
        return Placement(seq, slot, len(document), end, (prefix, host_end), spans.tobytes())

    def read(self, placement: Placement, start: int = 0, end: int | None = None) -> bytes:
        """A copy of bytes ``start``..``end`` of the placement's slot."""
        stop = placement.end if end is None else end
        return self.view(placement.slot, stop)[start:stop]

    def take(self, placement: Placement) -> tuple[bytes, VmFragments]:
        """Copy a whole publication out: the host fragment and every VM's fragment."""
        blob = self.read(placement)
        start, end = placement.host
        return blob[start:end], VmFragments(blob, placement.vm_spans())

    def close(self) -> None:
        for view in self.views:
            if view is not None:
                view.close()
        self.views = [None] * self.slots
        self.fd.close()
        self.read_only_fd.close()


class VmFragments:
    """The VM fragments of a publication copied out of its slot, by VM id.

    One copy of the publication, sliced when a VM's fragment is asked for
    (virtio builds each VM's response at most once per cycle).
    """

    def __init__(self, blob: bytes, spans: dict[int, tuple[int, int]]) -> None:
        self.blob = blob
        self.spans = spans

    def get(self, vm_id: int) -> bytes | None:
        span = self.spans.get(vm_id)
        return None if span is None else self.blob[span[0] : span[1]]

    def __len__(self) -> int:
        return len(self.spans)


def _rebuild(fd: InheritedFd, slots: int, slot_size: int, writable: bool) -> SharedSlots:
    return SharedSlots(fd.fd, slots, slot_size, writable)


def _region_view(region: SharedSlots, need: int) -> mmap.mmap:
    try:
        return region.view(0, need)
    except PublicationTooLarge:
        raise PublicationTooLarge(f"a job's metrics take {need} bytes, more than the "
                                  f"{region.slot_size} bytes a worker can send") from None


def pack_fragments(region: SharedSlots, fragments: tuple[tuple[int, bytes], ...]) -> bytes:
    """A worker's VM fragments written back to back into its slot; returns (id, end) pairs."""
    total = sum(len(fragment) for _vm, fragment in fragments)
    _region_view(region, total)[0:total] = b"".join(map(itemgetter(1), fragments))
    values = array.array("q", map(itemgetter(0), fragments))
    values.extend(accumulate(map(len, map(itemgetter(1), fragments))))
    return values.tobytes()


def unpack_fragments(region: SharedSlots, packed: bytes) -> tuple[tuple[int, bytes], ...]:
    """The supervisor's copy of the fragments ``pack_fragments`` wrote."""
    values = array.array("q")
    values.frombytes(packed)
    n = len(values) // 2
    ids, ends = values[:n], values[n:]
    if not ends:
        return ()
    blob = _region_view(region, ends[-1])[0 : ends[-1]]
    starts = [0, *ends[:-1]]
    return tuple(zip(ids, map(blob.__getitem__, map(slice, starts, ends)), strict=True))
