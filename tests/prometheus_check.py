"""Checks of ``vm-dump-metrics --format prometheus`` against ``--format json``.

The expected names, types and unit factors are written out here, metric by
metric, from the naming table in the docs (not computed with the code under
test): a change of the mapping has to change this table too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

KIB = 1024
MIB = 1024 * 1024

# Document name -> (series name without the context prefix, type, factor to the base unit,
# the unit the built-in publishes), per context.
Series = tuple[str, str, int, str | None]
HOST_SERIES: dict[str, Series] = {
    "FreeMem": ("free_mem_bytes", "gauge", MIB, "MiB"),
    "FreePhysicalMemory": ("free_physical_memory_bytes", "gauge", KIB, "KiB"),
    "FreeVirtualMemory": ("free_virtual_memory_bytes", "gauge", KIB, "KiB"),
    "MemoryAllocatedToVirtualServers": ("memory_allocated_to_virtual_servers_bytes", "gauge",
                                        KIB, "KiB"),
    "NumCPUs": ("num_cpus", "gauge", 1, None),
    "NumberOfPhysicalCPUs": ("number_of_physical_cpus", "gauge", 1, None),
    "PageFaultRate": ("page_fault_per_second", "gauge", 1, "1/s"),
    "PageInRate": ("page_in_bytes_per_second", "gauge", KIB, "KiB/s"),
    "PagedInMemory": ("paged_in_memory_bytes", "counter", KIB, "KiB"),
    "PagedOutMemory": ("paged_out_memory_bytes", "counter", KIB, "KiB"),
    "Time": ("time_seconds", "gauge", 1, "s"),
    "TotalCPUTime": ("total_cpu_time_seconds", "counter", 1, "s"),
    "TotalPhyCPUs": ("total_phy_cpus", "gauge", 1, None),
    "TotalPhyMem": ("total_phy_mem_bytes", "gauge", MIB, "MiB"),
    "UsedMem": ("used_mem_bytes", "gauge", MIB, "MiB"),
    "UsedVirtualMemory": ("used_virtual_memory_bytes", "gauge", KIB, "KiB"),
}
HOST_LABELS = {
    "HostName": "host_name",
    "HostSystemInfo": "host_system_info",
    "VirtProductInfo": "virt_product_info",
    "VirtualizationVendor": "virtualization_vendor",
}
VM_SERIES: dict[str, Series] = {
    "PhysicalMemoryAllocatedToVirtualSystem": (
        "physical_memory_allocated_to_virtual_system_bytes", "gauge", KIB, "KiB"),
    "ResourceMemoryLimit": ("resource_memory_limit_bytes", "gauge", KIB, "KiB"),
    "ResourceProcessorLimit": ("resource_processor_limit", "gauge", 1, None),
    "TotalCPUTime": ("total_cpu_time_seconds", "counter", 1, "s"),
}


@dataclass
class Exposition:
    text: str
    types: dict[str, str]  # family name (as the parser gives it) -> type
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]  # (name, labels) -> value
    comments: list[str]

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def labels_of(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for (sample, labels) in self.samples if sample == name]

    def type_of(self, series: str) -> str:
        for family, kind in self.types.items():
            if series in (family, f"{family}_total"):
                return kind
        raise KeyError(series)


def parse(text: str) -> Exposition:
    """prometheus_client's own parser; every sample unique."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"sample {key} twice"
            samples[key] = sample.value
    comments = [line for line in text.split("\n")
                if line.startswith("#") and not line.startswith(("# HELP ", "# TYPE "))]
    return Exposition(text, types, samples, comments)


def host_clock(objects: list[dict[str, Any]]) -> float | None:
    return next((o["value"] for o in objects if o["context"] == "host" and o["name"] == "Time"),
                None)


def assert_same_as_json(exposition: Exposition, objects: list[dict[str, Any]], *,
                        uuid: str | None, extra_host: dict[str, Series] | None = None,
                        extra_labels: dict[str, str] | None = None,
                        extra_vm: dict[str, Series] | None = None) -> None:
    """Every metric of the JSON list (host, and the VM ``uuid``'s) is in the exposition
    with the same value, in the expected name, type and unit; nothing else is."""
    host_series = {**HOST_SERIES, **(extra_host or {})}
    host_labels = {**HOST_LABELS, **(extra_labels or {})}
    vm_series = {**VM_SERIES, **(extra_vm or {})}
    expected: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    info: dict[str, str] = {}
    for metric in objects:
        if metric["context"] == "vm" and (metric["uuid"] or "").lower() != (uuid or "").lower():
            continue
        if metric["problem"] is not None:
            assert any(metric["name"] in line and "left out" in line
                       for line in exposition.comments), metric
            continue
        if metric["type"] == "string":
            if metric["context"] == "host":
                info[host_labels[metric["name"]]] = metric["value"]
            continue
        table = host_series if metric["context"] == "host" else vm_series
        suffix, kind, factor, unit = table[metric["name"]]
        assert metric["unit"] == unit, f"{metric}: the table is for unit {unit}"
        series = f"vhostmd_{metric['context']}_{suffix}"
        assert exposition.type_of(series) == kind, (series, exposition.types)
        name = f"{series}_total" if kind == "counter" else series
        labels = {"uuid": metric["uuid"]} if metric["context"] == "vm" else {}
        expected[(name, frozenset(labels.items()))] = float(metric["value"]) * factor
    got = {key: value for key, value in exposition.samples.items()
           if key[0].startswith(("vhostmd_host_", "vhostmd_vm_"))
           and key[0] not in ("vhostmd_host_info", "vhostmd_vm_info")}
    assert got == expected
    if info:
        assert exposition.labels_of("vhostmd_host_info") == [info]
        assert exposition.value("vhostmd_host_info", **info) == 1
    else:
        assert exposition.labels_of("vhostmd_host_info") == []
