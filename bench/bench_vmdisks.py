#!/usr/bin/env python3
"""Per-VM metrics disks at N VMs (default 1024): what they cost the daemon.

Runs a real vhostmd on a libvirt test-driver node of N running domains with
the shipped configuration (both built-in sets) at a 2 s period, twice: with
the shared disk only, and with the shared disk plus ``<vm_disks>`` (64 KiB
each) in a directory on /dev/shm. For each run: CPU per cycle of all the
daemon's processes and of the disk-writer alone (utime + stime from /proc,
the same accounting as bench_cycle.py), PSS by role (smaps_rollup), the
disk-writer's open descriptors, and what the VM disk directory takes on
/dev/shm (allocated blocks).

Usage: .venv/bin/python bench/bench_vmdisks.py [--domains 1024] [--cycles 10]
Prints a markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_cycle import (  # noqa: E402
    VHOSTMD,
    DaemonLog,
    builtin_config,
    cpu_by_role,
    machine,
    pss_by_role,
    vhostmd_processes,
)

import nodes  # noqa: E402

PERIOD = 2
SHARED_K = 1024  # the shipped configs' shared disk: about 1370 VMs of both sets


@dataclass
class Run:
    mode: str
    cpu_per_cycle: float
    writer_cpu_per_cycle: float
    pss: dict[str, int]
    writer_fds: int
    vm_files: int
    vm_dir_bytes: int


def with_vm_disks(conf: str, vms: Path) -> str:
    element = f'<vm_disks><path>{vms}</path><size unit="k">64</size></vm_disks>'
    return conf.replace("<globals>", f"<globals>\n    {element}", 1)


def run(mode: str, uri: str, work: Path, *, warmup: int, cycles: int, period: int) -> Run:
    run_dir = work / mode
    run_dir.mkdir()
    vms = run_dir / "vms"
    conf = builtin_config(run_dir / "vhostmd0", period, SHARED_K)
    if mode != "shared disk only":
        conf = with_vm_disks(conf, vms)
    (run_dir / "vhostmd.conf").write_text(conf)
    proc = subprocess.Popen([VHOSTMD, "-d", "-v", "-f", str(run_dir / "vhostmd.conf"),
                             "-p", str(run_dir / "pid"), "-c", uri],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    log = DaemonLog(proc)
    try:
        log.wait_cycles(warmup, 120)
        before = cpu_by_role(proc.pid)
        log.wait_cycles(warmup + cycles, 60 + period * (cycles + 2))
        after = cpu_by_role(proc.pid)
        pss = pss_by_role(proc.pid)
        writer = next(pid for pid, role in vhostmd_processes(proc.pid).items()
                      if role == "disk-writer")
        fds = len(os.listdir(f"/proc/{writer}/fd"))
        files = list(vms.iterdir()) if vms.exists() else []
        used = sum(f.stat().st_blocks * 512 for f in files)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.thread.join(5)
    spent = {role: after[role] - before.get(role, 0.0) for role in after}
    return Run(mode, sum(spent.values()) / cycles, spent.get("disk-writer", 0.0) / cycles,
               pss, fds, len(files), used)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=1024)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--period", type=int, default=PERIOD,
                        help=f"update_period in s (default {PERIOD})")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds that only shows the bench still works "
                             "(tests/test_bench.py runs every bench so)")
    args = parser.parse_args()
    if args.quick:
        args.domains, args.cycles, args.warmup, args.period = 8, 2, 1, 1
    with tempfile.TemporaryDirectory(prefix="vhostmd-bench-", dir="/dev/shm") as tmp:
        work = Path(tmp)
        uri, _ = nodes.write_node(work / "node.xml", args.domains)
        runs = [run(mode, uri, work, warmup=args.warmup, cycles=args.cycles, period=args.period)
                for mode in ("shared disk only", "shared disk + vm_disks")]
    print(f"{args.domains} running VMs, both built-in sets, period {args.period} s, "
          f"{args.cycles} cycles measured after {args.warmup}\n")
    print("| | CPU ms / cycle (all) | disk-writer CPU ms / cycle | PSS disk-writer KiB "
          "| PSS all KiB | disk-writer fds | VM disk files | VM disks on /dev/shm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r.mode} | {r.cpu_per_cycle * 1000:.0f} | {r.writer_cpu_per_cycle * 1000:.1f} "
              f"| {r.pss.get('disk-writer', 0)} | {sum(r.pss.values())} | {r.writer_fds} "
              f"| {r.vm_files} | {r.vm_dir_bytes / 1024 / 1024:.1f} MiB |")
    print()
    print("\n".join(machine()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
