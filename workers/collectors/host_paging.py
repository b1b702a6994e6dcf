"""Host paging: KiB paged in/out since boot and the page-in and page-fault rates.

Counters come from /proc/vmstat (pgpgin/pgpgout count KiB, whatever their
names say; `vmstat -s` prints them as "K paged in/out"). Rates are computed
from two samples in consecutive cycles, carried in the collector state; the
first sample after start (or after a counter went backwards) averages since
boot instead, so the metric is never missing.
"""

from __future__ import annotations

import time

from vhostmd.workers.collectors.source import (
    MetricSpec,
    Request,
    Sample,
    Source,
    SourceFailed,
    read_key_values,
)

PROC_VMSTAT = "/proc/vmstat"
COUNTERS = ("pgpgin", "pgpgout", "pgfault")
RATES = {"PageInRate": "pgpgin", "PageFaultRate": "pgfault"}


def read_vmstat(path: str = PROC_VMSTAT) -> dict[str, int]:
    info = read_key_values(path)
    missing = [name for name in COUNTERS if name not in info]
    if missing:
        raise SourceFailed(f"{path} has no {', '.join(missing)}")
    return {name: info[name] for name in COUNTERS}


def per_second(now: int, before: int, seconds: float) -> int:
    return int((now - before) / seconds + 0.5)


def collect(request: Request) -> Sample:
    try:
        counters = read_vmstat()
    except OSError as exc:
        raise SourceFailed(f"cannot read {PROC_VMSTAT}: {exc.strerror}") from None
    # CLOCK_BOOTTIME: the counters' own clock (since boot, suspend included),
    # the same in every worker process.
    now = time.clock_gettime(time.CLOCK_BOOTTIME)
    sample = Sample(state={"at": now, **counters})
    if "PagedInMemory" in request.wanted:
        sample.host["PagedInMemory"] = str(counters["pgpgin"])
    if "PagedOutMemory" in request.wanted:
        sample.host["PagedOutMemory"] = str(counters["pgpgout"])
    previous = request.state if isinstance(request.state, dict) else {}
    elapsed = now - previous.get("at", now)
    for name, counter in RATES.items():
        if name not in request.wanted:
            continue
        before = previous.get(counter)
        if before is not None and elapsed > 0.05 and counters[counter] >= before:
            rate = per_second(counters[counter], before, elapsed)
        else:  # first sample, or the counter was reset
            rate = per_second(counters[counter], 0, max(now, 1.0))
        sample.host[name] = str(rate)
    return sample


SOURCE = Source(
    name="host_paging",
    kind="host",
    metrics=(
        MetricSpec("PagedInMemory", "uint64", "host", "KiB",
                   "/proc/vmstat pgpgin (KiB paged in since boot)"),
        MetricSpec("PagedOutMemory", "uint64", "host", "KiB",
                   "/proc/vmstat pgpgout (KiB paged out since boot)"),
        MetricSpec("PageInRate", "uint64", "host", "KiB/s",
                   "/proc/vmstat pgpgin per second between the last two cycles "
                   "(sar -B pgpgin/s); since boot on the first cycle"),
        MetricSpec("PageFaultRate", "uint64", "host", "1/s",
                   "/proc/vmstat pgfault (minor + major faults) per second between the "
                   "last two cycles (sar -B fault/s); since boot on the first cycle"),
    ),
    collect=collect,
)
