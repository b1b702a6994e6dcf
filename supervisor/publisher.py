"""Publishing a cycle's result: the document to the disk-writer, fragments to virtio.

Each cycle's result is written once into a slot of shared memory
(``vhostmd.runtime.published``); the disk-writer and the virtio process get
only its ``Placement`` over their queues, and copy what they need out of the
slot. With per-VM disks the disk-writer's message also carries the host
fragment, each VM's fragment by UUID and the defined domains (``vm_batch``):
still one message per cycle, under the same flow control.

Each reader has at most one placement in flight, always the newest: it
acknowledges it (the disk-writer "disk-written" once written, virtio
"virtio-taken" once copied), and a result replaced by a newer one before
the reader was free is simply never sent to it. A slot is rewritten only when
no reader holds it. A new writer says "disk-ready" and gets the latest
document at once; a restarted virtio process gets the latest fragments at once.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vhostmd.document import DOCUMENT_OPEN
from vhostmd.runtime.published import Placement, PublicationTooLarge, SharedSlots
from vhostmd.supervisor.cycle import Rendered

log = logging.getLogger("vhostmd")

# Anything with send(message): a Child, or a test double.
Target = Any
_ID_AND_NAME = operator.attrgetter("id", "name")
_PREFIX = len(DOCUMENT_OPEN.encode())  # where the host fragment starts in a document


def vm_batch(rendered: Rendered) -> tuple[bytes, dict[str, bytes], tuple[str, ...] | None,
                                           float]:
    """What the disk-writer needs for per-VM disks (disk/vmwriter.py, VmDisks.publish).

    The host fragment, each running domain's own fragment by UUID (empty when
    it has no metrics), the UUIDs of the defined domains not running (None
    when libvirt could not be listed), and when that listing began.
    """
    fragments = rendered.vm_fragments
    running = {d.uuid: fragments.get(d.id, b"") for d in rendered.domains}
    return rendered.host_fragment, running, rendered.inactive, rendered.listed_at


@dataclass
class Flow:
    """One reader's flow control: at most one placement in flight, always the newest."""

    acked: bool = True  # it may be sent the next one
    sent_seq: int = 0  # the last result it was sent
    slot: int | None = None  # the slot it holds until it acknowledges


class Publisher:
    def __init__(self, disk: Callable[[], Target | None],
                 virtio: Callable[[], Target | None],
                 vm_disks: Callable[[], bool] = lambda: False,
                 slots: SharedSlots | None = None) -> None:
        self._disk = disk
        self._virtio = virtio
        self._vm_disks = vm_disks
        self.slots = slots if slots is not None else SharedSlots()
        self.latest: Rendered | None = None
        self.seq = 0
        self.error: str | None = None
        self.error_kind: str | None = None
        self.disk_flow = Flow()
        self.virtio_flow = Flow()
        self.placed: Placement | None = None  # the latest result's placement, once written
        self.too_large: str | None = None

    @property
    def held(self) -> dict[str, int]:
        """Reader ("disk", "virtio") -> the slot it holds."""
        flows = {"disk": self.disk_flow, "virtio": self.virtio_flow}
        return {name: f.slot for name, f in flows.items() if f.slot is not None}

    def publish(self, rendered: Rendered) -> None:
        self.latest = rendered
        self.seq += 1
        self.send_document()
        self.send_fragments()

    def place(self) -> Placement | None:
        """The latest result in a slot no reader holds (written once, shared by both)."""
        rendered = self.latest
        if rendered is None:
            return None
        if self.placed is not None and self.placed.seq == self.seq:
            return self.placed
        # Each reader holds at most one slot: with three, one is always free.
        busy = set(self.held.values())
        slot = next(i for i in range(self.slots.slots) if i not in busy)
        fragments = rendered.vm_fragments
        on_disk = len(fragments) - rendered.vms_not_on_disk
        try:
            self.placed = self.slots.write(slot, self.seq, rendered.document, _PREFIX,
                                           rendered.host_fragment, list(fragments),
                                           list(fragments.values()), on_disk)
        except PublicationTooLarge as exc:
            if self.too_large is None:
                log.error("not publishing: %s", exc)
            self.too_large = str(exc)
            return None
        self.too_large = None
        return self.placed

    def _next_for(self, reader: Target | None, flow: Flow) -> Placement | None:
        """The latest result's placement if ``reader`` is there and may have it, now its."""
        if (reader is None or not flow.acked or self.latest is None
                or flow.sent_seq == self.seq):
            return None
        placed = self.place()
        if placed is not None:
            flow.acked, flow.sent_seq, flow.slot = False, self.seq, placed.slot
        return placed

    def send_document(self) -> None:
        writer = self._disk()
        if (placed := self._next_for(writer, self.disk_flow)) is not None:
            vms = vm_batch(self.latest) if self._vm_disks() else None  # type: ignore[arg-type]
            writer.send((self.seq, placed, vms))

    def send_fragments(self) -> None:
        virtio = self._virtio()
        if (placed := self._next_for(virtio, self.virtio_flow)) is not None:
            domains = self.latest.domains  # type: ignore[union-attr]
            virtio.send(("metrics", placed, tuple(map(_ID_AND_NAME, domains))))

    def virtio_took(self) -> None:
        """Virtio copied its fragments out of the slot: it may have the next."""
        self.virtio_flow = Flow(sent_seq=self.virtio_flow.sent_seq)
        self.send_fragments()

    def virtio_started(self) -> None:
        """A (re)started virtio process holds nothing and gets the latest at once."""
        self.virtio_flow = Flow()
        self.send_fragments()

    def writer_started(self) -> None:
        self.disk_flow = Flow(acked=False)  # until the new writer says it is ready

    def writer_ready(self) -> None:
        self.disk_flow = Flow()
        self.send_document()

    def written(self, error_kind: str | None, error: str | None) -> None:
        self.disk_flow = Flow(sent_seq=self.disk_flow.sent_seq)
        # Logged once per kind of problem: a too-large document changes size
        # (and so its message) nearly every cycle.
        if error_kind != self.error_kind:
            if error:
                log.error("metrics disk: %s", error)
            elif self.error_kind:
                log.info("metrics disk written again")
            self.error_kind = error_kind
        self.error = error
        self.send_document()
