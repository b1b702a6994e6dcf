"""``vm-dump-metrics --format prometheus``: what the guest read, as Prometheus text.

Naming (docs: the guest's Prometheus page has the table):

- a numeric host metric ``NAME`` becomes ``vhostmd_host_<snake_name>[_<unit>]``,
  this VM's numeric metric ``vhostmd_vm_<snake_name>[_<unit>]{uuid="..."}``;
  units are converted to Prometheus base units (``MiB`` -> ``_bytes``, times
  1048576; ``KiB/s`` -> ``_bytes_per_second``; ``s`` -> ``_seconds``); a unit
  we do not know is left as it is and named in the HELP text;
- the metrics that are counters by nature (:data:`COUNTERS`: CPU time and
  paging since boot) are counters (``..._total``), every other one a gauge;
- string metrics become labels of one info series per context:
  ``vhostmd_host_info{host_name="..."} 1`` and ``vhostmd_vm_info{uuid="..."} 1``;
- a metric without a readable value (a C daemon's empty value), one whose name
  gives no Prometheus name, or one whose name another metric already took, is
  left out with a ``# vhostmd: ...`` comment line saying why: no series is
  ever printed with a made-up value;
- the read itself: ``vhostmd_guest_read_success`` (1 or 0),
  ``vhostmd_guest_read_timestamp_seconds`` (when it was read) and, after a
  successful read, ``vhostmd_guest_read_info{transport="vbd|virtio",source="..."} 1``.
  A failed read prints only these (success 0) and the reason as a comment,
  so a textfile never keeps values the host no longer publishes.

On a metrics disk that every VM shares, the VM metrics are this VM's only
(found by its SMBIOS UUID, as ``--context vm`` does, or given by ``uuid``).

The exposition format is prometheus_client's (``generate_latest``), imported
only when this format is asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from vhostmd.document import INT_RANGES, REAL_TYPES, Metric, describe
from vhostmd.guest.api import DMI_PRODUCT_UUID, MetricsDocument, _problem, own_vm_uuid
from vhostmd.guest.errors import MetricsError

PREFIX = "vhostmd"
NUMERIC_TYPES = frozenset((*INT_RANGES, *REAL_TYPES))

# (context, document name) of the metrics that only ever grow while the host runs.
COUNTERS: frozenset[tuple[str, str]] = frozenset({
    ("host", "TotalCPUTime"),  # CPU seconds since boot, all CPUs
    ("host", "PagedInMemory"),  # KiB paged in since boot
    ("host", "PagedOutMemory"),  # KiB paged out since boot
    ("vm", "TotalCPUTime"),  # the VM's CPU seconds since it started
})

# Document unit -> (Prometheus unit suffix, factor to the base unit).
UNITS: dict[str, tuple[str, Fraction]] = {
    "s": ("seconds", Fraction(1)),
    "ms": ("seconds", Fraction(1, 1000)),
    "us": ("seconds", Fraction(1, 10**6)),
    "ns": ("seconds", Fraction(1, 10**9)),
    "B": ("bytes", Fraction(1)),
    "KiB": ("bytes", Fraction(1 << 10)),
    "MiB": ("bytes", Fraction(1 << 20)),
    "GiB": ("bytes", Fraction(1 << 30)),
    "TiB": ("bytes", Fraction(1 << 40)),
    "B/s": ("bytes_per_second", Fraction(1)),
    "KiB/s": ("bytes_per_second", Fraction(1 << 10)),
    "MiB/s": ("bytes_per_second", Fraction(1 << 20)),
    "GiB/s": ("bytes_per_second", Fraction(1 << 30)),
    "1/s": ("per_second", Fraction(1)),
    "%": ("ratio", Fraction(1, 100)),
}

# Words of a name: an acronym's plural (CPUs), an acronym before a word (CPU in
# CPUTime), a capitalised or lower-case word, an acronym, digits.
_WORDS = re.compile(r"[A-Z]{2,}s(?![a-z])|[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+[0-9]*|[A-Z]+[0-9]*"
                    r"|[0-9]+")
_UNSAFE_COMMENT = re.compile(r"[\x00-\x1f\x7f\\]")


def snake_name(name: str) -> str:
    """``TotalCPUTime`` -> ``total_cpu_time``, ``PVC-Cluster-Name`` -> ``pvc_cluster_name``;
    "" when the name has no ASCII letter or digit."""
    return "_".join(word.lower() for word in _WORDS.findall(name))


def unit_of(metric: Metric) -> tuple[str, Fraction] | None:
    return UNITS.get(metric.unit or "")


def series_name(metric: Metric) -> str:
    """The Prometheus name of a numeric metric (a counter's without ``_total``); ""
    when its name gives none."""
    base = snake_name(metric.name)
    if not base:
        return ""
    unit = unit_of(metric)
    if unit is not None:
        suffix = unit[0]
        if suffix.endswith("per_second") and base.endswith("_rate"):
            base = base[: -len("_rate")]  # page_in_rate in KiB/s: page_in_bytes_per_second
        if base != suffix and not base.endswith(f"_{suffix}"):
            base = f"{base}_{suffix}"
    return f"{PREFIX}_{metric.context}_{base}"


def is_counter(metric: Metric) -> bool:
    return (metric.context, metric.name) in COUNTERS


def base_value(metric: Metric, value: int | float) -> float:
    """The value in the series' unit (exact rational scaling, then one rounding)."""
    unit = unit_of(metric)
    if unit is None or unit[1] == 1:
        return float(value)
    return float(Fraction(value) * unit[1])


def _comment(text: str) -> str:
    # One line whatever a name holds: control characters and backslashes escaped.
    return "# vhostmd: " + _UNSAFE_COMMENT.sub(lambda m: repr(m.group())[1:-1], text)


@dataclass
class _Families:
    """What one document becomes, before prometheus_client formats it."""

    comments: list[str] = field(default_factory=list)
    # series name -> (document name, kind, help, [(labels, value)]); the VMs of a shared
    # disk add samples to the family of the same document name.
    numeric: dict[str, tuple[str, str, str, list[tuple[tuple[str, ...], float]]]] = field(
        default_factory=dict)
    taken: dict[str, str] = field(default_factory=dict)  # sample name -> what took it
    host_info: dict[str, str] = field(default_factory=dict)
    vm_info: dict[str, dict[str, str]] = field(default_factory=dict)  # uuid -> labels


def _help(metric: Metric) -> str:
    unit = unit_of(metric)
    where = "this VM's" if metric.context == "vm" else "host"
    text = f"vhostmd {where} metric {metric.name} ({metric.type}"
    if metric.unit and unit is None:
        text += f", unit {metric.unit}"
    elif unit is not None and unit[1] != 1:
        text += f", published in {metric.unit}, here in {unit[0].replace('_', ' ')}"
    return text + ")."


def _sample_names(name: str, kind: str) -> tuple[str, ...]:
    return (f"{name}_total", f"{name}_created") if kind == "counter" else (name,)


class Exposition:
    """The series of one read; ``text()`` is the exposition (comments first)."""

    def __init__(self, document: MetricsDocument | None, *, read_at: float,
                 error: str | None = None, uuid: str | None = None,
                 uuid_path: str | None = None, notes: tuple[str, ...] = ()) -> None:
        self.document = document
        self.read_at = read_at
        self.error = error
        self.families = _Families(comments=list(notes))
        for info in ("host_info", "vm_info"):
            self.families.taken[f"{PREFIX}_{info}"] = f"the {info.split('_')[0]} info series"
        if document is not None:
            self._add_document(document, uuid, uuid_path)

    # -- building -----------------------------------------------------------------

    def _leave_out(self, metric: Metric, why: str) -> None:
        self.families.comments.append(f"{describe(metric)} left out: {why}")

    def _own_vm(self, document: MetricsDocument, uuid: str | None,
                uuid_path: str | None) -> str | None:
        """The uuid whose VM metrics to print, or None (with a comment) for none."""
        uuids = list(dict.fromkeys(m.uuid or "" for m in document.metrics if m.context == "vm"))
        if not uuids:
            return None
        if uuid is not None:
            wanted = uuid.lower()
            if wanted not in {u.lower() for u in uuids}:
                self.families.comments.append(f"no VM metrics of VM {uuid} in {document.source}")
                return None
            return wanted
        if len(uuids) == 1:
            return uuids[0].lower()  # virtio, a per-VM disk, or a disk with one VM on it
        own = own_vm_uuid(uuid_path)
        if own is None:
            self.families.comments.append(
                f"VM metrics left out: {len(uuids)} VMs publish metrics in {document.source} "
                f"and this VM's UUID is unknown (not readable: {uuid_path or DMI_PRODUCT_UUID})")
            return None
        if own not in {u.lower() for u in uuids}:
            self.families.comments.append(
                f"VM metrics left out: this VM ({own}) publishes none in {document.source}")
            return None
        return own

    def _add_document(self, document: MetricsDocument, uuid: str | None,
                      uuid_path: str | None) -> None:
        own = self._own_vm(document, uuid, uuid_path)
        seen: set[tuple[str, str, str]] = set()
        for metric in document.metrics:
            if metric.context == "vm":
                if own is None or (metric.uuid or "").lower() != own:
                    continue
            elif metric.context != "host":
                self._leave_out(metric, f"unknown context {metric.context!r}")
                continue
            key = (metric.context, (metric.uuid or "").lower(), metric.name)
            if key in seen:
                self._leave_out(metric, "published twice, the first one is kept")
                continue
            seen.add(key)
            problem = _problem(metric)
            if problem is not None:
                self._leave_out(metric, problem)
            elif metric.type == "string":
                self._add_label(metric)
            elif metric.type in NUMERIC_TYPES:
                self._add_number(metric)
            else:
                self._leave_out(metric, f"type {metric.type} has no single value")

    def _add_label(self, metric: Metric) -> None:
        label = snake_name(metric.name)
        if metric.context == "host":
            labels = self.families.host_info
        else:
            labels = self.families.vm_info.setdefault(metric.uuid or "", {})
        if not label or label[0].isdigit():
            self._leave_out(metric, "its name gives no Prometheus label name")
        elif metric.context == "vm" and label == "uuid":
            self._leave_out(metric, "label uuid is the VM's own UUID")
        elif label in labels:
            self._leave_out(metric, f"label {label} is taken by another metric")
        else:
            labels[label] = str(metric.typed_value())

    def _add_number(self, metric: Metric) -> None:
        name = series_name(metric)
        if not name:
            self._leave_out(metric, "its name gives no Prometheus name")
            return
        kind = "counter" if is_counter(metric) else "gauge"
        family = self.families.numeric.get(name)
        if family is None or family[:2] != (metric.name, kind):
            clash = next((self.families.taken[n] for n in _sample_names(name, kind)
                          if n in self.families.taken), None)
            if clash is not None:
                self._leave_out(metric, f"its name {name} is taken by {clash}")
                return
            for sample in _sample_names(name, kind):
                self.families.taken[sample] = describe(metric)
            family = self.families.numeric[name] = (metric.name, kind, _help(metric), [])
        labels = (metric.uuid or "",) if metric.context == "vm" else ()
        family[3].append((labels, base_value(metric, metric.typed_value())))

    # -- output -------------------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        """prometheus_client collector protocol."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        document = self.document
        yield GaugeMetricFamily(f"{PREFIX}_guest_read_success",
                                "1 if this read of the host's metrics worked, else 0.",
                                value=0 if document is None else 1)
        yield GaugeMetricFamily(f"{PREFIX}_guest_read_timestamp_seconds",
                                "When the guest read the host's metrics (Unix time).",
                                value=self.read_at)
        if document is None:
            return
        info = InfoMetricFamily(f"{PREFIX}_guest_read",
                                "How the guest read the host's metrics.",
                                labels=["transport", "source"])
        info.add_metric([document.transport, document.source], {})
        yield info
        for name, (_metric_name, kind, help_text, samples) in self.families.numeric.items():
            labels = ["uuid"] if name.startswith(f"{PREFIX}_vm_") else []
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(name, help_text, labels=labels)
            for label_values, value in samples:
                family.add_metric(list(label_values), value)
            yield family
        if self.families.host_info:
            yield InfoMetricFamily(f"{PREFIX}_host", "The host's string metrics, as labels.",
                                   value=self.families.host_info)
        own = self._vm_uuids()
        if own:
            vm_info = InfoMetricFamily(f"{PREFIX}_vm", "This VM's string metrics, as labels.",
                                       labels=["uuid"])
            for uuid in own:
                vm_info.add_metric([uuid], self.families.vm_info.get(uuid, {}))
            yield vm_info

    def _vm_uuids(self) -> list[str]:
        """The uuid of every VM with a series, in the order first seen."""
        uuids: dict[str, None] = {}
        for _metric_name, _kind, _help_text, samples in self.families.numeric.values():
            for labels, _value in samples:
                if labels:
                    uuids.setdefault(labels[0])
        for uuid in self.families.vm_info:
            uuids.setdefault(uuid)
        return list(uuids)

    def text(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)  # type: ignore[arg-type]
        comments = list(self.families.comments)
        if self.error is not None:
            comments.insert(0, f"no metrics read: {self.error}")
        head = "".join(_comment(line) + "\n" for line in comments).encode()
        return head + generate_latest(registry)


def prometheus_text(document: MetricsDocument | None, *, read_at: float,
                    error: str | None = None, uuid: str | None = None,
                    uuid_path: str | None = None, notes: tuple[str, ...] = ()) -> bytes:
    """The exposition of one read: ``document`` (None when the read failed, ``error``
    saying why) read at ``read_at`` (Unix time); ``notes`` become comment lines."""
    return Exposition(document, read_at=read_at, error=error, uuid=uuid,
                      uuid_path=uuid_path, notes=notes).text()


class StaleDocument(MetricsError):
    """The host's clock metric says the document is older than allowed (``--max-age``)."""


# The SAP set's host metric: the host's Unix time when the cycle sampled.
HOST_CLOCK = "Time"


def host_clock(document: MetricsDocument) -> float | None:
    """When the host sampled this document (its ``Time`` metric), or None."""
    for metric in document.metrics:
        if (metric.context == "host" and metric.name == HOST_CLOCK
                and metric.type in NUMERIC_TYPES and _problem(metric) is None):
            return float(metric.typed_value())
    return None


def check_age(document: MetricsDocument, now: float, max_age: float) -> str | None:
    """Raise StaleDocument when the host sampled ``document`` more than ``max_age``
    seconds before ``now``; a note (for a comment line) when its age is unknown."""
    sampled = host_clock(document)
    if sampled is None:
        return (f"the document's age is unknown (no host metric {HOST_CLOCK}): "
                "--max-age cannot tell a stopped host")
    age = now - sampled
    if age > max_age:
        raise StaleDocument(
            f"{document.source}: the host sampled this document {age:.0f} s ago (its "
            f"{HOST_CLOCK} metric), more than --max-age {max_age:g} s: the host no longer "
            "publishes")
    return None


class PrometheusUnavailable(MetricsError):
    """prometheus_client is not installed."""


def require_prometheus_client() -> None:
    """Raise PrometheusUnavailable (one line) when prometheus_client is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise PrometheusUnavailable(
            "--format prometheus needs the Python module prometheus_client "
            "(Debian: apt-get install python3-prometheus-client)") from None
