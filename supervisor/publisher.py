"""Publishing a cycle's result: the document to the disk-writer, fragments to virtio.

With per-VM disks the disk-writer's message also carries the host fragment,
each VM's fragment by UUID and the defined domains (``vm_batch``): still one
message per cycle, under the same flow control.

The disk-writer gets at most one document in flight, always the newest: it
acknowledges each write ("disk-written"), and a document that was replaced
by a newer one before the writer was free is simply never sent. A new
writer says "disk-ready" and gets the latest document at once; a restarted
virtio process gets the latest fragments at once.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

from vhostmd.supervisor.cycle import Rendered

log = logging.getLogger("vhostmd")

# Anything with send(message): a Child, or a test double.
Target = Any
_ID_AND_NAME = operator.attrgetter("id", "name")


def vm_batch(rendered: Rendered) -> tuple[bytes, dict[str, bytes], tuple[str, ...] | None]:
    """What the disk-writer needs for per-VM disks (disk/vmwriter.py, VmDisks.publish).

    The host fragment, each running domain's own fragment by UUID (empty when
    it has no metrics), and the UUIDs of the defined domains not running
    (None when libvirt could not be listed).
    """
    fragments = rendered.vm_fragments
    running = {d.uuid: fragments.get(d.id, b"") for d in rendered.domains}
    return rendered.host_fragment, running, rendered.inactive


class Publisher:
    def __init__(self, disk: Callable[[], Target | None],
                 virtio: Callable[[], Target | None],
                 vm_disks: Callable[[], bool] = lambda: False) -> None:
        self._disk = disk
        self._virtio = virtio
        self._vm_disks = vm_disks
        self.latest: Rendered | None = None
        self.seq = 0
        self.sent_seq = 0
        self.acked = True
        self.error: str | None = None
        self.error_kind: str | None = None

    def publish(self, rendered: Rendered) -> None:
        self.latest = rendered
        self.seq += 1
        self.send_document()
        self.send_fragments()

    def send_document(self) -> None:
        writer = self._disk()
        if (writer is None or not self.acked or self.latest is None
                or self.sent_seq == self.seq):
            return
        self.acked = False
        self.sent_seq = self.seq
        vms = vm_batch(self.latest) if self._vm_disks() else None
        writer.send((self.seq, self.latest.document, vms))

    def send_fragments(self) -> None:
        virtio = self._virtio()
        rendered = self.latest
        if virtio is not None and rendered is not None:
            virtio.send(("metrics", rendered.host_fragment, rendered.vm_fragments,
                         tuple(map(_ID_AND_NAME, rendered.domains))))

    def writer_started(self) -> None:
        self.acked = False  # until the new writer says it is ready

    def writer_ready(self) -> None:
        self.acked = True
        self.sent_seq = 0
        self.send_document()

    def written(self, error_kind: str | None, error: str | None) -> None:
        self.acked = True
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
