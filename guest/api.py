"""Public API for programs in the VM: read the metrics document, get typed values.

Typical use::

    from vhostmd.guest import read_metrics

    doc = read_metrics()                      # metrics disk first, then virtio
    cpus = doc.get("NumCPUs")                 # int
    cpu_time = doc.get("TotalCPUTime", "vm")  # float, this VM's own value

or, one value per read: ``get_metric("NumCPUs")``. Every error is a
:class:`vhostmd.guest.errors.MetricsError` with a one-line message.

A document is refused only when it is not well-formed XML. A metric whose value
does not fit its type (a C daemon writes empty values when an action failed)
is still in ``doc.metrics``, with its ``raw`` text and the ``problem``; asking
for its value raises :class:`~vhostmd.guest.errors.InvalidMetricValue`, and
every other metric reads as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import vhostmd.guest.vbd as vbd
import vhostmd.guest.virtio as virtio
from vhostmd.document import (
    CONTEXTS,
    DocumentError,
    Metric,
    ReadMetric,
    describe,
    read_document_metrics,
)
from vhostmd.guest.errors import (
    AmbiguousMetric,
    InvalidDocument,
    InvalidMetricValue,
    MetricNotFound,
    MetricsError,
    NoMetricsFound,
)
from vhostmd.protocol import GUEST_PORT

DEFAULT_TIMEOUT = 5.0
TRANSPORTS = ("vbd", "virtio")
# Readable by root only; libvirt sets the SMBIOS UUID of a VM to its domain UUID.
DMI_PRODUCT_UUID = "/sys/class/dmi/id/product_uuid"

Value = int | float | str
Number = int | float


@dataclass(frozen=True, slots=True)
class MetricsDocument:
    """One document as read from a transport.

    ``raw`` is exactly what the host published (disk content, or the virtio
    response including its closing blank line); ``metrics`` are all its metrics
    in document order, each a :class:`~vhostmd.document.ReadMetric` with its raw
    text and either a typed value or the ``problem`` why there is none;
    ``problems`` has one line for each metric with a problem (and each element
    that is not a metric), naming where.
    """

    raw: bytes
    metrics: tuple[Metric, ...]
    source: str
    transport: str
    problems: tuple[str, ...] = ()

    def find(self, name: str, context: str = "host", *, uuid: str | None = None) -> Metric:
        """The metric ``name`` in ``context``; for ``vm``, this VM's own (or ``uuid``'s)."""
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, not {context!r}")
        matches = [m for m in self.metrics if m.name == name and m.context == context]
        if not matches:
            raise MetricNotFound(f"metric {name} ({context}) is not published in {self.source}")
        if context == "host":
            return matches[0]
        return _own_vm_metric(matches, name, uuid, self.source)

    def get(self, name: str, context: str = "host", *, uuid: str | None = None) -> Value:
        """Typed value: int for the int types, float for real32/64, str for string.

        Raises InvalidMetricValue when the metric is published but has no typed
        value (``find(...).raw`` still gives its text).
        """
        return self.value_of(self.find(name, context, uuid=uuid))

    def value_of(self, metric: Metric) -> Value:
        """Typed value of a metric of this document; InvalidMetricValue if it has none."""
        problem = _problem(metric)
        if problem is not None:
            raise InvalidMetricValue(f"{self.source}: {describe(metric)}: {problem}")
        return metric.typed_value()

    def as_json_objects(self) -> list[dict[str, Any]]:
        return [metric_as_json(m) for m in self.metrics]


def _problem(metric: Metric) -> str | None:
    # Plain Metric objects (built by hand, not read) were checked when published.
    return metric.problem if isinstance(metric, ReadMetric) else None


def metric_as_json(metric: Metric) -> dict[str, Any]:
    """The ``--format json`` object of one metric: the typed value (null when
    there is none), the raw text as published, and the problem (null if none)."""
    problem = _problem(metric)
    return {
        "name": metric.name,
        "type": metric.type,
        "context": metric.context,
        "unit": metric.unit,
        "id": metric.vm_id,
        "uuid": metric.uuid,
        "value": None if problem is not None else metric.typed_value(),
        "raw": metric.raw if isinstance(metric, ReadMetric) else metric.value,
        "problem": problem,
    }


def _own_vm_metric(matches: list[Metric], name: str, uuid: str | None, source: str) -> Metric:
    if uuid is not None:
        for metric in matches:
            if (metric.uuid or "").lower() == uuid.lower():
                return metric
        raise MetricNotFound(f"metric {name} of VM {uuid} is not published in {source}")
    vms = {(m.vm_id, m.uuid) for m in matches}
    if len(vms) == 1:
        return matches[0]  # virtio responses, or a disk shared with no other VM
    own = own_vm_uuid()
    if own is None:
        raise AmbiguousMetric(
            f"{len(vms)} VMs publish {name} in {source} and this VM's UUID is unknown "
            f"(not readable: {DMI_PRODUCT_UUID}); pass the VM's uuid"
        )
    return _own_vm_metric(matches, name, own, source)


def own_vm_uuid(path: str | None = None) -> str | None:
    """This VM's UUID as SMBIOS reports it (lower case), or None when unreadable."""
    try:
        with open(path or DMI_PRODUCT_UUID) as uuid_file:
            return uuid_file.read().strip().lower() or None
    except OSError:
        return None


def parse_metrics(raw: bytes, *, source: str = "document", transport: str = "") -> MetricsDocument:
    """Parse a published document, type-checking each metric on its own.

    Raises InvalidDocument only when ``raw`` is not well-formed XML; a metric
    that does not check is kept with its ``problem`` (see :class:`MetricsDocument`).
    """
    try:
        metrics, problems = read_document_metrics(raw, where=source)
    except DocumentError as exc:
        raise InvalidDocument(str(exc)) from None
    return MetricsDocument(raw, tuple(metrics), source, transport, tuple(problems))


def read_vbd(
    disk: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    log: vbd.Log | None = None,
) -> MetricsDocument:
    """The document on ``disk`` (a device or image file), or on the first metrics
    disk found among the block devices."""
    if disk is None:
        disk, raw = vbd.read_first_disk(timeout=timeout, log=log or _no_log)
    else:
        raw = vbd.read_disk(disk, timeout=timeout)
    return parse_metrics(raw, source=disk, transport="vbd")


def read_virtio(port: str = GUEST_PORT, *, timeout: float = DEFAULT_TIMEOUT) -> MetricsDocument:
    """Host metrics plus this VM's own, asked for over the virtio-serial port."""
    raw = virtio.request_metrics(port, timeout=timeout)
    return parse_metrics(raw, source=port, transport="virtio")


def read_metrics(
    transport: str | None = None,
    *,
    disk: str | None = None,
    port: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    log: vbd.Log | None = None,
) -> MetricsDocument:
    """Read from ``transport`` ("vbd" or "virtio"); with None try vbd, then virtio."""
    if transport not in (None, *TRANSPORTS):
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
    if transport == "vbd":
        return read_vbd(disk, timeout=timeout, log=log)
    if transport == "virtio":
        return read_virtio(port or GUEST_PORT, timeout=timeout)
    failures: dict[str, MetricsError] = {}
    try:
        return read_vbd(disk, timeout=timeout, log=log)
    except MetricsError as exc:
        failures["vbd"] = exc
        (log or _no_log)(f"vbd: {exc}; trying virtio")
    try:
        return read_virtio(port or GUEST_PORT, timeout=timeout)
    except MetricsError as exc:
        failures["virtio"] = exc
    raise NoMetricsFound(failures)


def _no_log(_message: str) -> None:
    pass


def get_metric(
    name: str,
    context: str = "host",
    *,
    uuid: str | None = None,
    document: MetricsDocument | None = None,
    transport: str | None = None,
    disk: str | None = None,
    port: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Value:
    """Typed value of one metric, read fresh unless ``document`` is given.

    Raises MetricNotFound when the metric is not published, InvalidMetricValue
    when it is but has no typed value, and the errors of :func:`read_metrics`
    when nothing can be read.
    """
    if document is None:
        document = read_metrics(transport, disk=disk, port=port, timeout=timeout)
    return document.get(name, context, uuid=uuid)


@dataclass(frozen=True, slots=True)
class MemoryMetrics:
    """The original libmetrics memory group; None where the host does not publish it.

    Units are those the host's config gives (the default config: MiB for
    total/used/free, KiB for paged in/out, KiB per second for PageInRate and faults per
    second for PageFaultRate).
    """

    total: Number | None
    used: Number | None
    free: Number | None
    paged_in: Number | None
    paged_out: Number | None
    page_in_rate: Number | None
    page_fault_rate: Number | None
    # Field -> why it is None although its metric is published (e.g. an empty value).
    problems: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CpuMetrics:
    """The original libmetrics cpu group; None where the host does not publish it."""

    total_phys_cpus: Number | None
    num_cpus_utilized: Number | None
    total_cpu_time: Number | None  # seconds
    # Field -> why it is None although its metric is published (e.g. an empty value).
    problems: dict[str, str] = field(default_factory=dict)


# Field -> metric names, the default config's name first, then older spellings
# (the original README and mdisk example).
MEMORY_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "total": ("TotalPhyMem",),
    "used": ("UsedMem",),
    "free": ("FreeMem", "FreePhyMem"),
    "paged_in": ("PagedInMemory",),
    "paged_out": ("PagedOutMemory",),
    "page_in_rate": ("PageInRate",),
    "page_fault_rate": ("PageFaultRate",),
}
CPU_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "total_phys_cpus": ("TotalPhyCPUs",),
    "num_cpus_utilized": ("NumCPUs", "NumCPUsUtilized"),
    "total_cpu_time": ("TotalCPUTime",),
}


def _group_values(
    document: MetricsDocument,
    names: dict[str, tuple[str, ...]],
    context: str,
    uuid: str | None,
    group: str,
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for field_name, candidates in names.items():
        values[field_name] = None
        for name in candidates:
            try:
                metric = document.find(name, context, uuid=uuid)
            except MetricNotFound:
                continue
            # One bad metric leaves its own field None and says why; the group still reads.
            problem = _problem(metric)
            if problem is None and metric.type == "string":
                problem = "is a string, not a number"
            if problem is not None:
                problems[field_name] = f"{describe(metric)}: {problem}"
            else:
                values[field_name] = metric.typed_value()
            break
    if all(value is None for value in values.values()) and not problems:
        wanted = ", ".join(candidates[0] for candidates in names.values())
        raise MetricNotFound(
            f"none of the {context} {group} metrics ({wanted}) is published in {document.source}"
        )
    values["problems"] = problems
    return values


def get_mem_metrics(
    context: str = "host",
    *,
    uuid: str | None = None,
    document: MetricsDocument | None = None,
    transport: str | None = None,
    disk: str | None = None,
    port: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> MemoryMetrics:
    """Memory group of the host or of this VM; MetricNotFound if none is published."""
    if document is None:
        document = read_metrics(transport, disk=disk, port=port, timeout=timeout)
    return MemoryMetrics(**_group_values(document, MEMORY_METRIC_NAMES, context, uuid, "memory"))


def get_cpu_metrics(
    context: str = "host",
    *,
    uuid: str | None = None,
    document: MetricsDocument | None = None,
    transport: str | None = None,
    disk: str | None = None,
    port: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> CpuMetrics:
    """CPU group of the host or of this VM; MetricNotFound if none is published."""
    if document is None:
        document = read_metrics(transport, disk=disk, port=port, timeout=timeout)
    return CpuMetrics(**_group_values(document, CPU_METRIC_NAMES, context, uuid, "cpu"))


def get_host_mem_metrics(document: MetricsDocument | None = None, **read: Any) -> MemoryMetrics:
    return get_mem_metrics("host", document=document, **read)


def get_vm_mem_metrics(document: MetricsDocument | None = None, **read: Any) -> MemoryMetrics:
    return get_mem_metrics("vm", document=document, **read)


def get_host_cpu_metrics(document: MetricsDocument | None = None, **read: Any) -> CpuMetrics:
    return get_cpu_metrics("host", document=document, **read)


def get_vm_cpu_metrics(document: MetricsDocument | None = None, **read: Any) -> CpuMetrics:
    return get_cpu_metrics("vm", document=document, **read)
