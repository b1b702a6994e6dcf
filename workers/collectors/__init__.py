"""Built-in collectors: metrics gathered in-process, no process spawned per metric or VM.

Interface used by the rest of the daemon (kept small on purpose):

- ``validate_ref(ref) -> str | None``: why a <builtin> element is wrong, or None.
- ``plan(refs) -> list[CollectorPlan]``: which collector jobs a config needs.
- ``run_collector(job, libvirt) -> JobResult``: run one Collect job (in a worker).
- ``describe_builtins() -> str``: the table printed by ``vhostmd --list-builtins``.

Each data source is one module of this package defining ``SOURCE`` (see
source.py); modules are found at import time, so a new source is one file.
Every built-in metric has one definition, keyed by (context, name): where two
standard sets share a name (host TotalCPUTime, PagedInMemory, PagedOutMemory;
vm TotalCPUTime) they share that definition, so selecting both sets publishes
each metric once with one unit. The standard sets and their order are
defined once, in ``SETS`` below, not by the modules: adding a module
reorders nothing.

A cycle runs one host job per <builtin> element that selects host metrics
(in config order, so the document follows the config) and one vm job for all
built-in VM metrics together, so libvirt is asked for domain stats once.

This package must not import libvirt or psutil at the top level: the
supervisor imports it to plan cycles and validate configs.
"""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from vhostmd.document import InvalidValue, check_value, render_metric, vm_attributes
from vhostmd.wire import Collect, Domain, Failure, JobResult
from vhostmd.workers.collectors.source import (
    MetricSpec,
    Request,
    Sample,
    Source,
    SourceFailed,
    int_text,
    seconds_from_ticks,
    tuple_getter,
)
from vhostmd.workers.results import FragmentBuilder

log = logging.getLogger("vhostmd")

VM_JOB = "domains"  # the collector name of the single per-cycle vm job


@dataclass(frozen=True, slots=True)
class CollectorPlan:
    collector: str
    context: str  # "host": one job per cycle; "vm": one job per cycle for all domains
    metric_names: tuple[str, ...]
    order: int  # position in the document (the config line of the first <builtin>)


def _discover() -> tuple[Source, ...]:
    sources = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        source = getattr(module, "SOURCE", None)
        if isinstance(source, Source):
            sources.append(source)
    return tuple(sources)


SOURCES: tuple[Source, ...] = _discover()
# (context, name) -> (source, spec): one definition per published metric.
METRICS: dict[tuple[str, str], tuple[Source, MetricSpec]] = {}
# job kind ("host"/"vm") -> name -> (source, spec): what a job's metric_names mean.
BY_KIND: dict[str, dict[str, tuple[Source, MetricSpec]]] = {"host": {}, "vm": {}}

# The standard sets, each in the order the document publishes it: a set's
# metrics are in this order whatever module defines them, so a new source
# file reorders nothing. A set's host metrics read through libvirt come first:
# the cycle's one libvirt job (the vm job) renders them together, and its
# host part is published just before the host part of the first <builtin>
# element that selects one of them.
SETS: dict[str, tuple[tuple[str, str], ...]] = {
    "sap": (
        ("host", "VirtProductInfo"),
        ("host", "MemoryAllocatedToVirtualServers"),
        ("host", "HostName"),
        ("host", "HostSystemInfo"),
        ("host", "VirtualizationVendor"),
        ("host", "NumberOfPhysicalCPUs"),
        ("host", "TotalCPUTime"),
        ("host", "FreePhysicalMemory"),
        ("host", "FreeVirtualMemory"),
        ("host", "UsedVirtualMemory"),
        ("host", "PagedInMemory"),
        ("host", "PagedOutMemory"),
        ("host", "Time"),
        ("vm", "TotalCPUTime"),
        ("vm", "ResourceProcessorLimit"),
        ("vm", "PhysicalMemoryAllocatedToVirtualSystem"),
        ("vm", "ResourceMemoryLimit"),
    ),
    "vhostmd": (
        ("host", "TotalPhyCPUs"),
        ("host", "NumCPUs"),
        ("host", "TotalPhyMem"),
        ("host", "UsedMem"),
        ("host", "FreeMem"),
        ("host", "PagedInMemory"),
        ("host", "PagedOutMemory"),
        ("host", "PageInRate"),
        ("host", "PageFaultRate"),
        ("host", "TotalCPUTime"),
        ("vm", "TotalCPUTime"),
    ),
}

for _source in SOURCES:
    for _spec in _source.metrics:
        _key = (_spec.context, _spec.name)
        if _key in METRICS or _spec.name in BY_KIND[_source.kind]:
            raise RuntimeError(f"built-in metric {_spec.context} {_spec.name} defined twice")
        METRICS[_key] = (_source, _spec)
        BY_KIND[_source.kind][_spec.name] = (_source, _spec)
for _set, _keys in SETS.items():
    for _key in _keys:
        if _key not in METRICS:
            raise RuntimeError(f"built-in set {_set} names {_key[0]} {_key[1]}, which no "
                               "source defines")
    # The document can follow the set only if its libvirt host metrics lead.
    _from_vm_job = [_key[0] == "host" and METRICS[_key][0].kind == "vm"
                    for _key in _keys if _key[0] == "host"]
    if _from_vm_job != sorted(_from_vm_job, reverse=True):
        raise RuntimeError(f"built-in set {_set}: host metrics read through libvirt must "
                           "come first")


def _selected(ref: object) -> list[tuple[str, str]]:
    """(context, name) of every metric a <builtin> element selects, in set order."""
    set_name = getattr(ref, "set", None)
    name = getattr(ref, "name", None)
    context = getattr(ref, "context", None)
    if set_name is not None:
        keys = SETS.get(set_name, ())
    else:
        keys = [key for key in METRICS if key[1] == name]
    return [key for key in keys if context is None or key[0] == context]


def validate_ref(ref: object) -> str | None:
    set_name = getattr(ref, "set", None)
    name = getattr(ref, "name", None)
    context = getattr(ref, "context", None)
    if set_name is not None and set_name not in SETS:
        return f"unknown built-in set {set_name!r} (known: {', '.join(sorted(SETS))})"
    if name is not None and not any(key[1] == name for key in METRICS):
        return f"unknown built-in metric {name!r} (vhostmd --list-builtins lists them)"
    if not _selected(ref):
        what = f"set {set_name!r}" if set_name is not None else f"metric {name!r}"
        return f"built-in {what} has no {context} metrics"
    return None


def plan(refs: tuple) -> list[CollectorPlan]:
    taken: set[tuple[str, str]] = set()
    plans: list[CollectorPlan] = []
    labels: set[str] = set()
    vm_names: list[str] = []
    vm_order: int | None = None
    for ref in refs:
        host_names: list[str] = []
        for key in _selected(ref):
            if key in taken:
                continue  # shared definition, already published by an earlier element
            taken.add(key)
            source, spec = METRICS[key]
            if source.kind == "host":
                host_names.append(spec.name)
            else:
                vm_names.append(spec.name)
                vm_order = ref.line if vm_order is None else vm_order
        if host_names:
            label = ref.set if ref.set is not None else ref.name
            if label in labels or label == VM_JOB:
                label = f"{label}@{ref.line}"
            labels.add(label)
            plans.append(CollectorPlan(label, "host", tuple(host_names), ref.line))
    if vm_names:
        assert vm_order is not None
        plans.append(CollectorPlan(VM_JOB, "vm", tuple(vm_names), vm_order))
    return plans


def run_collector(job: Collect, libvirt: object) -> JobResult:
    """Run every source this job needs; never raises (problems become failures)."""
    known = BY_KIND[job.context]
    failures: list[Failure] = []
    host_values, vm_samples, new_state = _sample(job, known, libvirt, failures)
    out = FragmentBuilder()
    _render_host(job, known, host_values, out, failures)
    _render_vms(job, known, vm_samples, out, failures)
    return out.result(job.job_id, tuple(failures), new_state or None)


Known = dict[str, tuple[Source, MetricSpec]]


def _sample(job: Collect, known: Known, libvirt: object, failures: list[Failure]
            ) -> tuple[dict[str, str], list[Sample], dict[str, object]]:
    """Ask each source this job needs once: (host values, VM samples, the sources' state)."""
    kind = job.context
    wanted: dict[str, list[str]] = {}  # source name -> metric names
    sources: dict[str, Source] = {}
    for name in job.metric_names:
        entry = known.get(name)
        if entry is None:
            failures.append(Failure(name, kind, None, f"no built-in {kind} job metric {name!r}"))
            continue
        sources[entry[0].name] = entry[0]
        wanted.setdefault(entry[0].name, []).append(name)
    old_state = job.state if isinstance(job.state, dict) else {}
    new_state: dict[str, object] = {}
    host_values: dict[str, str] = {}
    vm_samples: list[Sample] = []
    for source_name, names in wanted.items():
        source = sources[source_name]
        if time.monotonic() >= job.deadline:
            failures.extend(Failure(n, known[n][1].context, None, "no time left in this cycle")
                            for n in names)
            continue
        request = Request(frozenset(names), job.domains, old_state.get(source_name), libvirt,
                          job.deadline)
        try:
            sample = source.collect(request)
        except SourceFailed as exc:
            reason = str(exc)
        except Exception as exc:  # a bug in one source must not take the others down
            log.exception("built-in source %s failed", source_name)
            reason = f"internal error in built-in source {source_name}: {exc!r}"
        else:
            reason = None
        if reason is not None:
            failures.extend(Failure(n, known[n][1].context, None, reason) for n in names)
            if source_name in old_state:
                new_state[source_name] = old_state[source_name]
            continue
        if sample.state is not None:
            new_state[source_name] = sample.state
        host_values.update(sample.host)
        if sample.vms:
            vm_samples.append(sample)
        failures.extend(Failure(n, known[n][1].context if n in known else kind, d, why)
                        for n, d, why in sample.failures)
    return host_values, vm_samples, new_state


def _render_host(job: Collect, known: Known, host_values: dict[str, str], out: FragmentBuilder,
                 failures: list[Failure]) -> None:
    # Document order: the plan's order (config, then set order), whatever the sources.
    for name in job.metric_names:
        spec = known[name][1] if name in known else None
        if spec is None or spec.context != "host" or name not in host_values:
            continue
        try:
            value = check_value(spec.type, host_values[name])
        except InvalidValue as exc:
            failures.append(Failure(name, "host", None, str(exc)))
            continue
        out.add_host(name, spec.type, value, spec.unit)


def _render_vms(job: Collect, known: Known, vm_samples: list[Sample], out: FragmentBuilder,
                failures: list[Failure]) -> None:
    vm_specs = tuple(known[n][1] for n in job.metric_names if n in known
                     and known[n][1].context == "vm")
    template, arguments = _vm_template(vm_specs)
    scaled = tuple((index, spec.scale) for index, spec in enumerate(vm_specs) if spec.scale != 1)
    for domain, row in sorted(_vm_rows(vm_samples, vm_specs), key=_by_id):
        try:
            # Non-negative ints (as libvirt gives nearly every value) are valid for
            # every built-in VM metric's type: one format call for the VM. None
            # (missing) or a text makes min() raise.
            plain = min(row, default=0) >= 0
        except TypeError:
            plain = False
        if plain:
            if scaled:
                row = list(row)
                for index, scale in scaled:  # int_text's scaled case, a call less per VM
                    row[index] = seconds_from_ticks(row[index], scale)
            out.add_vm_rendered(domain, template % arguments(
                (vm_attributes(domain.id, domain.uuid), *row)))
            continue
        for spec, raw in zip(vm_specs, row, strict=True):
            if raw is None:
                continue
            text = raw if isinstance(raw, str) else int_text(raw, spec.scale)
            try:
                value = check_value(spec.type, text)
            except InvalidValue as exc:
                failures.append(Failure(spec.name, "vm", domain, str(exc)))
                continue
            out.add_vm(domain, spec.name, spec.type, value, spec.unit)


def _by_id(entry: tuple[Domain, tuple]) -> int:
    return entry[0].id


def _vm_rows(samples: list[Sample], specs: tuple[MetricSpec, ...]
             ) -> list[tuple[Domain, tuple[int | str | None, ...]]]:
    """Every VM's values in the order of ``specs`` (None where no source gave one).

    The usual case, one source giving the columns in that order, passes its
    rows through untouched.
    """
    names = tuple(spec.name for spec in specs)
    if len(samples) == 1 and samples[0].vm_names == names:
        return samples[0].vms
    merged: dict[int, tuple[Domain, list[int | str | None]]] = {}
    for sample in samples:
        where = [(names.index(name), column) for column, name in enumerate(sample.vm_names)
                 if name in names]
        for domain, row in sample.vms:
            values = merged.setdefault(domain.id, (domain, [None] * len(names)))[1]
            for index, column in where:  # each metric has one source: nothing overlaps
                values[index] = row[column]
    return [(domain, tuple(values)) for domain, values in merged.values()]


_MARKERS = re.compile("(\0ATTRS\0|\0VALUE\0)")


@functools.lru_cache(maxsize=64)
def _vm_template(specs: tuple[MetricSpec, ...]
                 ) -> tuple[str, Callable[[tuple[object, ...]], tuple[object, ...]]]:
    """One VM's metrics as a %-template, and what turns (attributes, *values) into its args.

    The attributes repeat in every metric: the second part (an itemgetter)
    repeats them in C, and %-formatting takes half the time str.format takes
    for the same fields. Rendered by the one renderer (render_metric), with
    markers turned into fields, so the layout cannot drift from it.
    """
    parts = []
    fields = []
    for index, spec in enumerate(specs):
        element = render_metric(spec.name, spec.type, "vm", "\0VALUE\0", spec.unit, "\0ATTRS\0")
        for piece in _MARKERS.split(element.replace("%", "%%")):
            if piece in ("\0ATTRS\0", "\0VALUE\0"):
                parts.append("%s")
                fields.append(0 if piece == "\0ATTRS\0" else index + 1)
            else:
                parts.append(piece)
    return "".join(parts), tuple_getter(fields)


def describe_builtins() -> str:
    rows = [("NAME", "CONTEXT", "TYPE", "UNIT", "SETS", "FROM")]
    for (context, name), (_source, spec) in sorted(
            METRICS.items(), key=lambda item: (item[0][0], item[0][1])):
        rows.append((name, context, spec.type, spec.unit or "-",
                     ",".join(s for s, keys in SETS.items() if (context, name) in keys) or "-",
                     spec.origin))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "Built-in metrics. Select them inside <metrics> in the config:",
        '  <builtin set="sap"/>          the SAP-style set',
        '  <builtin set="vhostmd"/>      the original vhostmd default set',
        '  <builtin set="sap" context="host"/>   only the host (or vm) metrics of a set',
        '  <builtin name="FreeMem"/>     one metric (both contexts where it has two)',
        '  <builtin name="TotalCPUTime" context="vm"/>   one metric in one context',
        "Each (context, name) has one definition: the sets share host TotalCPUTime,",
        "PagedInMemory, PagedOutMemory and vm TotalCPUTime, so a config selecting both",
        "sets publishes each once, with the unit shown here. A metric selected twice is",
        "published once, at the first <builtin> that selects it.",
        "",
    ]
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(5)]
        lines.append("  ".join([*cells, row[5]]).rstrip())
    return "\n".join(lines)
