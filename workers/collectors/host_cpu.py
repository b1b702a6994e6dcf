"""Host CPUs: how many are online and the CPU time they spent (/proc/stat)."""

from __future__ import annotations

import os

from vhostmd.workers.collectors.source import (
    MetricSpec,
    Request,
    Sample,
    Source,
    SourceFailed,
    seconds_from_ticks,
)

PROC_STAT = "/proc/stat"
CPU_COUNT_NAMES = ("NumberOfPhysicalCPUs", "TotalPhyCPUs", "NumCPUs")


def read_cpu_stat(path: str = PROC_STAT) -> tuple[int, int]:
    """(online CPUs, user+nice+system ticks summed over all CPUs) from /proc/stat."""
    online = 0
    busy_ticks: int | None = None
    with open(path, encoding="ascii") as f:
        for line in f:
            if not line.startswith("cpu"):
                break  # the cpu lines come first
            fields = line.split()
            if fields[0] == "cpu":
                busy_ticks = int(fields[1]) + int(fields[2]) + int(fields[3])
            else:
                online += 1
    if busy_ticks is None or online == 0:
        raise SourceFailed(f"{path} has no cpu lines")
    return online, busy_ticks


def collect(request: Request) -> Sample:
    try:
        online, busy_ticks = read_cpu_stat()
    except (OSError, ValueError, IndexError) as exc:
        raise SourceFailed(f"cannot read {PROC_STAT}: {exc}") from None
    sample = Sample()
    for name in CPU_COUNT_NAMES:
        if name in request.wanted:
            sample.host[name] = str(online)
    if "TotalCPUTime" in request.wanted:
        sample.host["TotalCPUTime"] = seconds_from_ticks(busy_ticks, os.sysconf("SC_CLK_TCK"))
    return sample


_COUNT = "online CPUs: the cpuN lines of /proc/stat (= virsh nodeinfo CPU(s) on the host)"

SOURCE = Source(
    name="host_cpu",
    kind="host",
    metrics=(
        MetricSpec("NumberOfPhysicalCPUs", "uint32", "host", None, _COUNT),
        MetricSpec("TotalPhyCPUs", "uint32", "host", None, _COUNT),
        MetricSpec("NumCPUs", "uint32", "host", None, _COUNT),
        MetricSpec("TotalCPUTime", "real64", "host", "s",
                   "/proc/stat cpu line: (user + nice + system) / USER_HZ, all CPUs "
                   "(the original's definition)"),
    ),
    collect=collect,
)
