"""Running domains: CPU time, vCPUs and memory of every VM in one bulk libvirt call.

One ``virConnectGetAllDomainStats`` call per cycle returns every running
domain's stats groups. Drivers that lack a group (libvirt's test driver only
has "state") leave its keys out; for those domains one ``virDomainGetInfo``
call fills them in (it carries all four values). Drivers without bulk stats
at all get the per-domain path for every domain.

Also produces the host's MemoryAllocatedToVirtualServers: the sum over the
same records, so it costs no extra call.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vhostmd.wire import Domain
from vhostmd.workers.collectors.source import (
    MetricSpec,
    Request,
    Sample,
    Source,
    SourceFailed,
    tuple_getter,
)

log = logging.getLogger("vhostmd")

ALLOCATED = "MemoryAllocatedToVirtualServers"
# metric -> (stats key, stats group name, index in virDomainGetInfo's list)
VM_VALUES: dict[str, tuple[str, str, int]] = {
    "TotalCPUTime": ("cpu.time", "CPU_TOTAL", 4),
    "ResourceProcessorLimit": ("vcpu.current", "VCPU", 3),
    "PhysicalMemoryAllocatedToVirtualSystem": ("balloon.current", "BALLOON", 2),
    "ResourceMemoryLimit": ("balloon.maximum", "BALLOON", 1),
}
BALLOON_CURRENT = VM_VALUES["PhysicalMemoryAllocatedToVirtualSystem"]


def bulk_stats(conn: Any, groups: int) -> list[tuple[Any, dict[str, Any]]] | None:
    """All running domains' stats in one call; None if the driver cannot do it."""
    import libvirt

    flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
    # NOWAIT (libvirt >= 4.5): skip stats that would wait for a busy QEMU
    # monitor, so one stuck VM cannot stall the whole cycle.
    nowait = getattr(libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0)
    for attempt in (flags | nowait, flags) if nowait else (flags,):
        try:
            return conn.getAllDomainStats(groups, attempt)
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            if code == libvirt.VIR_ERR_INVALID_ARG and attempt != flags:
                continue  # a libvirt older than the NOWAIT flag
            if code == libvirt.VIR_ERR_NO_SUPPORT:
                return None
            raise
    return None


def _records(request: Request, needed: list[tuple[str, str, int]]) -> list[tuple[Any, dict]]:
    """(domain, stats) of every running domain, in one bulk call where the driver can.

    Stats are empty where it cannot (then the caller asks virDomainGetInfo).
    """
    import libvirt

    from vhostmd.workers.libvirt_conn import LibvirtUnavailable, error_message

    groups = libvirt.VIR_DOMAIN_STATS_STATE
    for _key, group, _index in needed:
        groups |= getattr(libvirt, f"VIR_DOMAIN_STATS_{group}")
    try:
        conn = request.libvirt.get()
        records = bulk_stats(conn, groups)
        if records is None:
            records = [(conn.lookupByUUIDString(d.uuid), {}) for d in request.domains or ()]
    except LibvirtUnavailable as exc:
        raise SourceFailed(str(exc)) from None
    except libvirt.libvirtError as exc:
        request.libvirt.reset()
        raise SourceFailed(f"libvirt domain stats failed: {error_message(exc)}") from None
    return records


def _info_or_failures(dom: Any, domain: Domain | None, raw: dict[str, Any] | None,
                      columns: tuple[str, ...], request: Request,
                      sample: Sample) -> list[Any] | None:
    """virDomainGetInfo's list for a VM the stats left short, or why not.

    None: nothing more to do for this VM (it stopped during the cycle, or the
    cycle's time is up: its missing values are failures). An empty list:
    the call failed (failures recorded): the VM keeps what the stats gave.
    """
    import libvirt

    from vhostmd.workers.libvirt_conn import error_message

    def missing(reason: str) -> None:
        if domain is not None:
            sample.failures.extend((name, domain, reason) for name in columns
                                   if raw is None or VM_VALUES[name][0] not in raw)

    if time.monotonic() >= request.deadline:
        # The per-domain fallback costs a call per VM: stop at the deadline.
        missing("no time left in this cycle for libvirt domain info")
        return None
    try:
        return dom.info()  # [state, maxMem, memory, nrVirtCpu, cpuTime]
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN,
                                    libvirt.VIR_ERR_OPERATION_INVALID):
            return None  # it stopped during the cycle
        missing(f"libvirt domain info failed: {error_message(exc)}")
        return []


def collect(request: Request) -> Sample:
    columns = tuple(name for name in VM_VALUES if name in request.wanted)
    sample = Sample(vm_names=columns)
    want_allocated = ALLOCATED in request.wanted
    domains = request.domains or ()
    if not domains:
        if want_allocated:
            sample.host[ALLOCATED] = "0"
        return sample

    needed = [VM_VALUES[name] for name in columns]
    if want_allocated:
        needed.append(BALLOON_CURRENT)
    records = _records(request, needed)

    # libvirt ids only grow while libvirtd runs: a VM restarted since the
    # cycle listed it has a new id, so matching by id alone is exact.
    by_id = {d.id: d for d in domains}
    keys = tuple(VM_VALUES[name][0] for name in columns)
    needed_keys = {key for key, _g, _i in needed}
    # A record's values in column order, from the stats or from virDomainGetInfo's
    # list; the usual cases (all in the stats, or none: the test driver) take
    # one C call per VM instead of Python per value.
    from_stats = tuple_getter(keys)
    from_info = tuple_getter(tuple(VM_VALUES[name][2] for name in columns))
    balloon_key, _group, balloon_index = BALLOON_CURRENT
    allocated = 0
    rows = sample.vms
    for dom, stats in records:
        domain: Domain | None = by_id.get(dom.ID())
        if domain is None and not want_allocated:
            continue
        if needed_keys.isdisjoint(stats):
            raw = None  # nothing in the stats: all from virDomainGetInfo
        elif needed_keys.issubset(stats):
            if want_allocated:
                allocated += stats[balloon_key]
            if domain is not None:
                rows.append((domain, from_stats(stats)))
            continue
        else:
            raw = {key: stats[key] for key in needed_keys if key in stats}
        info = _info_or_failures(dom, domain, raw, columns, request, sample)
        if info is None:
            continue
        if not info:
            raw = raw or {}  # the call failed: what the stats gave, if anything
        elif raw is None:
            if want_allocated:
                allocated += info[balloon_index]
            if domain is not None:
                rows.append((domain, from_info(info)))
            continue
        else:
            for key, _group, index in needed:
                raw.setdefault(key, info[index])
        # Some values from the stats, the others from the info (or missing).
        if want_allocated and balloon_key in raw:
            allocated += raw[balloon_key]
        if domain is not None:
            rows.append((domain, tuple(raw.get(key) for key in keys)))
    if want_allocated:
        sample.host[ALLOCATED] = str(allocated)
    return sample


SOURCE = Source(
    name="libvirt_domains",
    kind="vm",
    metrics=(
        MetricSpec("TotalCPUTime", "real64", "vm", "s",
                   "libvirt bulk stats cpu.time (ns) / 1e9; else virDomainGetInfo cpuTime "
                   "(virsh dominfo: CPU time)", scale=1_000_000_000),
        MetricSpec("ResourceProcessorLimit", "uint32", "vm", None,
                   "libvirt bulk stats vcpu.current (vCPUs online); else virDomainGetInfo "
                   "nrVirtCpu (virsh dominfo: CPU(s))"),
        MetricSpec("PhysicalMemoryAllocatedToVirtualSystem", "uint64", "vm", "KiB",
                   "libvirt bulk stats balloon.current; else virDomainGetInfo memory "
                   "(virsh dominfo: Used memory)"),
        MetricSpec("ResourceMemoryLimit", "uint64", "vm", "KiB",
                   "libvirt bulk stats balloon.maximum; else virDomainGetInfo maxMem "
                   "(virsh dominfo: Max memory)"),
        MetricSpec(ALLOCATED, "uint64", "host", "KiB",
                   "sum of balloon.current (virsh dominfo: Used memory) over all running "
                   "domains, from the same bulk call"),
    ),
    collect=collect,
)
