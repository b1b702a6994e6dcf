"""Host memory: physical and virtual (RAM + swap) memory from /proc/meminfo.

"Free" means MemAvailable (what can be given to new work without swapping,
page cache included), as `free` shows it in its "available" column; the
original's FreeMem read that same column.
"""

from __future__ import annotations

from vhostmd.workers.collectors.source import (
    MetricSpec,
    Request,
    Sample,
    Source,
    SourceFailed,
    read_key_values,
)

PROC_MEMINFO = "/proc/meminfo"


def read_meminfo(path: str = PROC_MEMINFO) -> dict[str, int]:
    """The /proc/meminfo fields we use, in KiB (MemAvailable estimated on old kernels)."""
    info = read_key_values(path)
    try:
        total = info["MemTotal"]
        available = info.get("MemAvailable")
        if available is None:  # kernels before 3.14
            available = info["MemFree"] + info.get("Buffers", 0) + info.get("Cached", 0)
    except KeyError as exc:
        raise SourceFailed(f"{path} has no {exc.args[0]}") from None
    return {
        "total": total,
        "available": min(available, total),
        "swap_total": info.get("SwapTotal", 0),
        "swap_free": info.get("SwapFree", 0),
    }


def memory_values(mem: dict[str, int]) -> dict[str, int]:
    free_virtual = mem["available"] + mem["swap_free"]
    return {
        "TotalPhyMem": mem["total"] // 1024,
        "UsedMem": (mem["total"] - mem["available"]) // 1024,
        "FreeMem": mem["available"] // 1024,
        "FreePhysicalMemory": mem["available"],
        "FreeVirtualMemory": free_virtual,
        "UsedVirtualMemory": max(0, mem["total"] + mem["swap_total"] - free_virtual),
    }


def collect(request: Request) -> Sample:
    try:
        mem = read_meminfo()
    except OSError as exc:
        raise SourceFailed(f"cannot read {PROC_MEMINFO}: {exc.strerror}") from None
    values = memory_values(mem)
    return Sample(host={name: str(values[name]) for name in request.wanted})


SOURCE = Source(
    name="host_memory",
    kind="host",
    metrics=(
        MetricSpec("TotalPhyMem", "uint64", "host", "MiB",
                   "/proc/meminfo MemTotal / 1024"),
        MetricSpec("UsedMem", "uint64", "host", "MiB",
                   "/proc/meminfo (MemTotal - MemAvailable) / 1024"),
        MetricSpec("FreeMem", "uint64", "host", "MiB",
                   "/proc/meminfo MemAvailable / 1024"),
        MetricSpec("FreePhysicalMemory", "uint64", "host", "KiB",
                   "/proc/meminfo MemAvailable"),
        MetricSpec("FreeVirtualMemory", "uint64", "host", "KiB",
                   "/proc/meminfo MemAvailable + SwapFree"),
        MetricSpec("UsedVirtualMemory", "uint64", "host", "KiB",
                   "/proc/meminfo (MemTotal + SwapTotal) - (MemAvailable + SwapFree)"),
    ),
    collect=collect,
)
