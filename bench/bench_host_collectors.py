#!/usr/bin/env python3
"""Host collectors: our /proc parsers against psutil, 100 cycles, same values?

Issue 11 asked whether the host collectors (workers/collectors/host_*.py)
should read through psutil. This times what one cycle reads, both ways:

- ours: /proc/stat (online CPUs, user+nice+system ticks), /proc/meminfo,
  /proc/vmstat, with the collectors' own parsers;
- psutil: cpu_count, cpu_times, virtual_memory, swap_memory; psutil has no
  pgpgin/pgpgout/pgfault, so /proc/vmstat is still read with our parser.

and compares the published values (TotalCPUTime is published with six exact
decimals from integer ticks; psutil gives floats).

Usage: .venv/bin/python bench/bench_host_collectors.py [--cycles 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import timeit

import psutil

from vhostmd.workers.collectors import host_cpu, host_memory, host_paging
from vhostmd.workers.collectors.source import seconds_from_ticks

HZ = os.sysconf("SC_CLK_TCK")


def ours() -> tuple[str, str, dict[str, int], dict[str, int]]:
    online, ticks = host_cpu.read_cpu_stat()
    memory = host_memory.memory_values(host_memory.read_meminfo())
    return str(online), seconds_from_ticks(ticks, HZ), memory, host_paging.read_vmstat()


def through_psutil() -> tuple[str, str, dict[str, int], dict[str, int]]:
    times = psutil.cpu_times()
    virtual, swap = psutil.virtual_memory(), psutil.swap_memory()
    memory = host_memory.memory_values({
        "total": virtual.total // 1024, "available": virtual.available // 1024,
        "swap_total": swap.total // 1024, "swap_free": swap.free // 1024})
    cpu_seconds = f"{times.user + times.nice + times.system:.6f}"
    return str(psutil.cpu_count()), cpu_seconds, memory, host_paging.read_vmstat()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds that only shows the bench still works "
                             "(tests/test_bench.py runs every bench so)")
    args = parser.parse_args()
    if args.quick:
        args.cycles, args.repeat = 3, 1
    for name, read in (("ours", ours), ("psutil", through_psutil)):
        best = min(timeit.repeat(read, number=args.cycles, repeat=args.repeat))
        print(f"{name:7} {best * 1000:7.2f} ms per {args.cycles} cycles "
              f"({best / args.cycles * 1e6:.0f} us per cycle, best of {args.repeat})")
    a, b = ours(), through_psutil()
    # Read a moment apart: counters may move; the fixed values must match.
    print("same CPU count:", a[0] == b[0], "| same TotalPhyMem:",
          a[2]["TotalPhyMem"] == b[2]["TotalPhyMem"],
          f"| TotalCPUTime ours {a[1]} psutil {b[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
