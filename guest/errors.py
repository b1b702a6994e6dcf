"""Every exception the guest API raises, in one place.

All derive from :class:`MetricsError`, so a program in the VM can catch one
class. Where a shared core error exists (disk format, document), the guest
error also derives from it, so code written against :mod:`vhostmd.mdisk` or
:mod:`vhostmd.document` keeps catching what it expects.
"""

from __future__ import annotations

from vhostmd.document import DocumentError
from vhostmd.mdisk import DiskBusyError, DiskFormatError


class MetricsError(Exception):
    """Base of all guest-side errors; ``str(exc)`` is a one-line reason."""


class TransportError(MetricsError):
    """No document could be fetched: no metrics disk, port missing, I/O error."""


class NoMetricsDisk(TransportError):
    """No block device carries the metrics disk signature."""


class DiskBusy(TransportError, DiskBusyError):
    """The host kept the metrics disk busy (or changing) longer than we wait."""


class CorruptDisk(MetricsError, DiskFormatError):
    """Bad signature, length past the end of the device, or checksum mismatch."""


class VirtioError(TransportError):
    """The virtio port is missing, busy, hung up, or answered something else."""


class VirtioTimeout(VirtioError):
    """The host did not send a complete response in time."""


class InvalidDocument(MetricsError, DocumentError):
    """The document is not well-formed XML (or, as InvalidMetricValue, one
    metric's value does not parse as its type)."""


class InvalidMetricValue(InvalidDocument):
    """A published metric has no typed value (empty, or not of its type); the
    rest of the document reads as usual. An InvalidDocument, so code that
    caught that for a bad value keeps working."""


class MetricNotFound(MetricsError, LookupError):
    """The requested metric is not in the document."""


class AmbiguousMetric(MetricsError, LookupError):
    """Several VMs publish the metric and this guest cannot tell which is its own."""


class NoMetricsFound(TransportError):
    """Neither transport gave a document; ``failures`` maps each one tried to its error."""

    def __init__(self, failures: dict[str, MetricsError]) -> None:
        self.failures = failures
        super().__init__("; ".join(f"{name}: {error}" for name, error in failures.items()))
