"""Publishing a cycle's result: the document to the disk-writer, fragments to virtio.

The disk-writer gets at most one document in flight, always the newest: it
acknowledges each write ("disk-written"), and a document that was replaced
by a newer one before the writer was free is simply never sent. A new
writer says "disk-ready" and gets the latest document at once; a restarted
virtio process gets the latest fragments at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from vhostmd.supervisor.cycle import Rendered

log = logging.getLogger("vhostmd")

# Anything with send(message): a Child, or a test double.
Target = Any


class Publisher:
    def __init__(self, disk: Callable[[], Target | None],
                 virtio: Callable[[], Target | None]) -> None:
        self._disk = disk
        self._virtio = virtio
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
        writer.send((self.seq, self.latest.document))

    def send_fragments(self) -> None:
        virtio = self._virtio()
        rendered = self.latest
        if virtio is not None and rendered is not None:
            virtio.send(("metrics", rendered.host_fragment, rendered.vm_fragments,
                         tuple((d.id, d.name) for d in rendered.domains)))

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
