#!/usr/bin/env python3
"""Starvation benchmark: per-VM shell work far longer than the update period.

Runs a real vhostmd (the console script next to this Python) on a libvirt
test-driver node with N running domains (default 1000) and one shell metric
per VM that does what the original's default VM metric does (one `virsh
dominfo` per VM) and then prints the time it ran:

    virsh CONNECT dominfo NAME >/dev/null && date +%s

so each value on the disk says how old it is. At 1000 VMs one round of this
work takes far longer than a 5 s period. The benchmark reads the disk once a
second, as a guest would, and reports:

- how many VMs have a value on the disk, over time;
- the age of the oldest and the median value on the disk (now - value);
- how long until every VM had a value, and how often each was refreshed.

Usage: .venv/bin/python bench/bench_starvation.py [--domains 1000] [--period 5]
       [--seconds 120] [--workers 4]
Prints a markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import machine  # noqa: E402  (bench/machine.py)  (tests/nodes.py writes the test-driver node files)

from vhostmd import mdisk  # noqa: E402
from vhostmd.document import parse_document  # noqa: E402

import nodes  # noqa: E402

VHOSTMD = str(Path(sys.executable).parent / "vhostmd")

CONFIG = """<?xml version="1.0"?>
<vhostmd>
  <globals>
    <disk><name>bench</name><path>{disk}</path><size unit="m">1</size></disk>
    <update_period>{period}</update_period>
    <path>/usr/sbin:/usr/bin:/sbin:/bin</path>
    <workers>{workers}</workers>
    <transport>vbd</transport>
  </globals>
  <metrics>
    <metric type="uint64" context="vm" unit="s">
      <name>RanAt</name>
      <action>virsh CONNECT dominfo NAME &gt;/dev/null &amp;&amp; date +%s</action>
    </metric>
  </metrics>
</vhostmd>
"""


def read_values(disk: Path) -> dict[int, int]:
    with open(disk, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        content = mdisk.read_document(lambda o, n: os.pread(f.fileno(), n, o), size)
    return {m.vm_id: int(m.value) for m in parse_document(content)
            if m.name == "RanAt" and m.vm_id is not None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--period", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds that only shows the bench still works "
                             "(tests/test_bench.py runs every bench so)")
    args = parser.parse_args()
    if args.quick:
        args.domains, args.period, args.seconds, args.workers = 10, 1, 3, 2
    with tempfile.TemporaryDirectory(prefix="vhostmd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        uri, _domains = nodes.write_node(tmp / "node.xml", args.domains)
        disk = tmp / "vhostmd0"
        conf = tmp / "bench.conf"
        conf.write_text(CONFIG.format(disk=disk, period=args.period, workers=args.workers))
        log = open(tmp / "log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([VHOSTMD, "-d", "-f", str(conf), "-c", uri, "-p",
                                 str(tmp / "pid")], stdout=log, stderr=subprocess.STDOUT)
        started = time.time()
        samples: list[tuple[float, int, float, float]] = []  # t, vms, oldest, median
        refreshed: dict[int, set[int]] = {}
        all_at: float | None = None
        try:
            while time.time() - started < args.seconds:
                time.sleep(1.0)
                try:
                    values = read_values(disk)
                except (OSError, mdisk.DiskError, ValueError):
                    continue
                now = time.time()
                for vm_id, ran_at in values.items():
                    refreshed.setdefault(vm_id, set()).add(ran_at)
                if values:
                    ages = [now - v for v in values.values()]
                    samples.append((now - started, len(values), max(ages),
                                    statistics.median(ages)))
                if all_at is None and len(refreshed) == args.domains:
                    all_at = now - started
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
        warning = next((line for line in (tmp / "log").read_text().splitlines()
                        if "shell actions need more than" in line), "")
    steady = [s for s in samples if s[0] >= args.seconds / 2] or samples
    print(f"Machine: {machine.describe()}; {time.strftime('%Y-%m-%d')}")
    print(f"{args.domains} VMs, period {args.period} s, {args.workers} workers, "
          f"{args.seconds} s measured\n")
    print("| measure | result |")
    print("|---|---|")
    print(f"| every VM had a value after | {all_at:.0f} s |" if all_at is not None
          else f"| every VM had a value after | not within {args.seconds} s "
               f"({len(refreshed)} of {args.domains}) |")
    if steady:
        print(f"| VMs with a value on the disk (second half) | "
              f"{min(s[1] for s in steady)}..{max(s[1] for s in steady)} |")
        print(f"| oldest value on the disk (second half, worst) | "
              f"{max(s[2] for s in steady):.0f} s |")
        print(f"| median value age (second half) | "
              f"{statistics.median(s[3] for s in steady):.0f} s |")
    counts = [len(v) for v in refreshed.values()]
    if counts:
        print(f"| refreshes per VM in {args.seconds} s (min / median / max) | "
              f"{min(counts)} / {statistics.median(counts):.0f} / {max(counts)} |")
    if warning:
        print(f"\nThe daemon's log: `{warning.split(': ', 2)[-1]}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
