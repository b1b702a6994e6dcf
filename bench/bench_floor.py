#!/usr/bin/env python3
"""Cycle cost against its floor, and memory, at N VMs (default 1000), in one run.

The *floor* is what a cycle cannot avoid, measured piece by piece in this
process, on the same libvirt test-driver node the daemon then runs on:

- listing the running domains (id, name, UUID of each);
- the bulk stats call (with the per-domain info() the test driver needs);
- reading the /proc files the host built-ins read;
- rendering the document with a plain join (one f-string per metric);
- checksum and writing it into an mmap with the three msyncs of the protocol.

Each piece is measured twice: in a loop (the median of 20 calls back to
back, everything in the CPU's caches) and once a second like the daemon's
cycle at its 1 s period (the median of --cold-rounds rounds), when other
processes have run in between.

The memory floor is the same process model doing nothing: a fresh Python
that imports the supervisor's modules, starts the forkserver with the
daemon's preload and forks as many
children as the daemon runs, each blocked on a multiprocessing queue. No
document, no libvirt connection: what the processes cost before any work.

Then a real vhostmd runs the shipped configuration (both built-in sets) at a
1 s period on the same node, and the CPU time of all its processes
(psutil: user + system, children included) is divided by the cycles it ran.
PSS (psutil's memory_full_info) is summed over its processes, by role.

Usage: .venv/bin/python bench/bench_floor.py [--domains 1000] [--seconds 20] [--cold-rounds 10]
Prints markdown tables and the machine it ran on.
"""

from __future__ import annotations

import argparse
import mmap
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import libvirt
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import machine  # noqa: E402  (bench/machine.py)

from vhostmd import mdisk  # noqa: E402

import nodes  # noqa: E402

VHOSTMD = str(Path(sys.executable).parent / "vhostmd")
SHIPPED = HERE.parent / "etc" / "vhostmd.conf"
PROC_FILES = ("/proc/meminfo", "/proc/vmstat", "/proc/stat", "/proc/cpuinfo", "/proc/uptime")
CYCLE_LINE = re.compile(r"cycle (\d+): ")


def cpu_ms(fn: Callable[[], object], rounds: int = 20) -> float:
    """Median CPU milliseconds of one call (process time, not wall)."""
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def floor(uri: str, tmp: Path, cold_rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    conn = libvirt.openReadOnly(uri)
    groups = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
              | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU)

    def listing() -> list:
        return [(d.ID(), d.name(), d.UUIDString())
                for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]

    def stats() -> list:
        out = []
        for dom, record in conn.getAllDomainStats(
                groups, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE):
            if "cpu.time" not in record:  # the test driver has no such group
                record = dict(record, info=dom.info())
            out.append((dom.ID(), record))
        return out

    def proc() -> None:
        for path in PROC_FILES:
            with open(path, "rb") as f:
                f.read()

    domains = listing()
    metrics = [(name, "uint64", "vm", "123456789", d[0], d[2]) for d in domains
               for name in ("TotalCPUTime", "ResourceProcessorLimit",
                            "PhysicalMemoryAllocatedToVirtualSystem", "ResourceMemoryLimit")]

    def render() -> bytes:
        return ("<metrics>\n" + "".join(
            f"  <metric type='{t}' context='{c}' id='{i}' uuid='{u}'>\n"
            f"    <name>{n}</name>\n    <value>{v}</value>\n  </metric>\n"
            for n, t, c, v, i, u in metrics) + "</metrics>\n").encode()

    document = render()
    path = tmp / "floor-disk"
    path.write_bytes(bytes(1024 * 1024))
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 1024 * 1024)

    def write() -> None:
        m[4:8] = b"\0\0\0\1"
        m.flush()
        m[0:16] = mdisk.pack_header(1, mdisk.checksum_signed(document), len(document))
        m[16:16 + len(document)] = document
        m.flush()
        m[4:8] = b"\0\0\0\0"
        m.flush()

    calls = {"listing the domains": listing, "bulk stats": stats, "reading /proc": proc,
             "rendering with a plain join": render, "checksum + mmap write": write}
    hot = {piece: cpu_ms(fn) for piece, fn in calls.items()}
    # The same pieces once a second, as the daemon runs them: between two
    # cycles other processes run, and caches and branch predictors forget.
    samples: dict[str, list[float]] = {piece: [] for piece in calls}
    for _ in range(cold_rounds):
        time.sleep(1.0)
        for piece, fn in calls.items():
            samples[piece].append(cpu_ms(fn, rounds=1))
    cold = {piece: statistics.median(values) for piece, values in samples.items()}
    m.close()
    conn.close()
    return hot, cold


# The process model, idle: run in a fresh interpreter, prints its PSS in MiB.
IDLE_MODEL = """
import sys, psutil
import vhostmd.supervisor.cli  # what the supervisor imports
from vhostmd.runtime.child import CTX, start_forkserver
start_forkserver()
queues = [CTX.Queue() for _ in range(int(sys.argv[1]))]
children = [CTX.Process(target=q.get, daemon=True) for q in queues]
for c in children:
    c.start()
import time; time.sleep(1.5)  # each child unpickles its queue and blocks on it
me = psutil.Process()
print(sum(p.memory_full_info().pss for p in [me, *me.children(recursive=True)]) / 2**20)
for c in children:
    c.kill()
"""


def memory_floor(children: int) -> float:
    """PSS in MiB of the process model with ``children`` idle children (see IDLE_MODEL)."""
    out = subprocess.run([sys.executable, "-c", IDLE_MODEL, str(children)], check=True,
                         capture_output=True, text=True, timeout=60)
    return float(out.stdout.strip())


def daemon(uri: str, tmp: Path, seconds: float,
           vsz: dict[str, float]) -> tuple[dict[str, float], int, dict[str, float], int]:
    conf = SHIPPED.read_text().replace("/dev/shm/vhostmd0", str(tmp / "vhostmd0"))
    conf = conf.replace("<update_period>5</update_period>", "<update_period>1</update_period>")
    conf = conf.replace("<virtio>", f"<virtio><channel_path>{tmp}/channels</channel_path>")
    (tmp / "bench.conf").write_text(conf)
    log_path = tmp / "log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([VHOSTMD, "-d", "-v", "-f", str(tmp / "bench.conf"), "-c", uri,
                                 "-p", str(tmp / "pid")], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while len(CYCLE_LINE.findall(log_path.read_text())) < 3:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the daemon did not run cycles; see {log_path}")
                time.sleep(0.2)
            root = psutil.Process(proc.pid)
            procs = [root, *root.children(recursive=True)]

            def role(p: psutil.Process) -> str:
                title = " ".join(p.cmdline())
                if ": " in title:
                    return title.split(": ", 1)[1].split(" ")[0]
                return title[:20]

            def cpu() -> dict[str, float]:
                by_role: dict[str, float] = {}
                for p in procs:
                    try:
                        t = p.cpu_times()
                        name = role(p)
                    except psutil.Error:
                        continue
                    spent = t.user + t.system + t.children_user + t.children_system
                    by_role[name] = by_role.get(name, 0.0) + spent
                return by_role

            before, cycles_before = cpu(), len(CYCLE_LINE.findall(log_path.read_text()))
            time.sleep(seconds)
            after, cycles_after = cpu(), len(CYCLE_LINE.findall(log_path.read_text()))
            pss: dict[str, float] = {}
            for p in procs:
                try:
                    name = role(p)
                    memory = p.memory_full_info()
                except psutil.Error:
                    continue
                pss[name] = pss.get(name, 0.0) + memory.pss / 2**20
                # What ps and top show as VSZ: the largest process of the role.
                vsz[name] = max(vsz.get(name, 0.0), memory.vms / 2**20)
        finally:
            proc.terminate()
            proc.wait(30)
    cycles = max(1, cycles_after - cycles_before)
    per_role = {name: (after.get(name, 0.0) - before.get(name, 0.0)) * 1000 / cycles
                for name in after}
    return per_role, cycles, pss, len(procs) - 3  # not the supervisor, forkserver, tracker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cold-rounds", type=int, default=10,
                        help="rounds of the floor at the daemon's cadence, 1 s apart")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds that only shows the bench still works "
                             "(tests/test_bench.py runs every bench so)")
    args = parser.parse_args()
    if args.quick:
        args.domains, args.seconds, args.cold_rounds = 20, 2.0, 1
    with tempfile.TemporaryDirectory(prefix="vhostmd-floor-") as name:
        tmp = Path(name)
        uri, _ = nodes.write_node(tmp / "node.xml", args.domains)
        pieces, cold = floor(uri, tmp, args.cold_rounds)
        vsz: dict[str, float] = {}
        per_role, cycles, pss, children = daemon(uri, tmp, args.seconds, vsz)
    idle_pss = memory_floor(children)
    total = sum(pieces.values())
    cold_total = sum(cold.values())
    per_cycle = sum(per_role.values())
    print(f"Machine: {machine.describe()}; {time.strftime('%Y-%m-%d')}\n")
    print(f"{args.domains} VMs, shipped configuration (both built-in sets), period 1 s\n")
    print("| piece of the floor | CPU ms, in a loop | CPU ms, once a second |")
    print("|---|---:|---:|")
    for piece, ms in pieces.items():
        print(f"| {piece} | {ms:.1f} | {cold[piece]:.1f} |")
    print(f"| **floor** | **{total:.1f}** | **{cold_total:.1f}** |")
    print(f"| **vhostmd, all processes, per cycle ({cycles} cycles)** | **{per_cycle:.1f}** "
          f"({per_cycle / total:.1f}x) | **{per_cycle:.1f}** ({per_cycle / cold_total:.1f}x) |\n")
    print("| process | CPU ms per cycle | PSS MiB | VSZ MiB (largest) |")
    print("|---|---:|---:|---:|")
    for role, mib in sorted(pss.items(), key=lambda item: -item[1]):
        print(f"| {role} | {per_role.get(role, 0.0):.1f} | {mib:.1f} | {vsz.get(role, 0.0):.0f} |")
    print(f"| **total** | **{per_cycle:.1f}** | **{sum(pss.values()):.1f}** | |\n")
    print(f"Memory floor: the same process model idle ({children} children, nothing "
          f"done): {idle_pss:.1f} MiB PSS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
