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

Then a real vhostmd runs the shipped configuration (both built-in sets) at a
1 s period on the same node, and the CPU time of all its processes
(psutil: user + system, children included) is divided by the cycles it ran.
PSS (psutil's memory_full_info) is read by role half a period after a cycle;
again with the shipped 5 s period (not with --quick).

The memory floor is the same process model doing nothing: a fresh Python
that imports the supervisor's modules, starts the forkserver with the
daemon's preload and forks as many children as the daemon runs, each
blocked on a multiprocessing queue. No document, no libvirt connection: what
the processes cost before any work. Then the same with one child holding
what the worker holds at rest, its libvirt connection to the node
(``floor_child.py``: on the test driver, the whole node is in it).

With --libvirtd (root), the daemon runs once more at 5 s with the node served
by a private libvirtd, as on a host: the worker holds a client only, and an
events child runs; its idle model has as many children.

Usage: .venv/bin/python bench/bench_floor.py [--domains 1000] [--seconds 20] [--cold-rounds 10]
       [--libvirtd]
Prints markdown tables and the machine it ran on.
"""

from __future__ import annotations

import argparse
import ast
import mmap
import re
import shutil
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


# The process model, idle: run in a fresh interpreter, prints the PSS in MiB of
# each process (supervisor, forkserver, children) as a Python dict. With a URI,
# the first child holds a libvirt connection to it, as the worker does.
IDLE_MODEL = """
import sys, time, psutil
import vhostmd.supervisor.cli  # what the supervisor imports
from vhostmd.runtime.child import CTX, start_forkserver
sys.path.insert(0, sys.argv[3])
from floor_child import hold_connection
start_forkserver()
queues = [CTX.Queue() for _ in range(int(sys.argv[1]))]
children = [CTX.Process(target=q.get, daemon=True) for q in queues]
if sys.argv[2]:
    children[0] = CTX.Process(target=hold_connection, args=(sys.argv[2], queues[0]), daemon=True)
for c in children:
    c.start()
time.sleep(1.5)  # each child unpickles its queue (and connects) and blocks on it
me = psutil.Process()
helpers = me.children()
pss = {"supervisor": me.memory_full_info().pss}
for p in me.children(recursive=True):
    role = "forkserver" if p in helpers else ("worker" if p.pid == children[0].pid else "child")
    pss[role] = pss.get(role, 0) + p.memory_full_info().pss
print({role: value / 2**20 for role, value in pss.items()})
for c in children:
    c.kill()
"""


def memory_floor(children: int, uri: str = "") -> dict[str, float]:
    """PSS in MiB, by process, of the process model with ``children`` idle children
    (see IDLE_MODEL); with ``uri``, the first holds a libvirt connection to it."""
    out = subprocess.run([sys.executable, "-c", IDLE_MODEL, str(children), uri, str(HERE)],
                         check=True, capture_output=True, text=True, timeout=60)
    return ast.literal_eval(out.stdout.strip())


def daemon(uri: str, tmp: Path, seconds: float, period: int,
           vsz: dict[str, float]) -> tuple[dict[str, float], int, dict[str, float], int]:
    """Run vhostmd at ``period`` for ``seconds``: CPU ms per cycle and PSS MiB by role.

    PSS is read half a period after a cycle ended, when the processes wait
    for the next one (at 5 s, after they gave freed heap back).
    """
    conf = SHIPPED.read_text().replace("/dev/shm/vhostmd0", str(tmp / "vhostmd0"))
    conf = conf.replace("<update_period>5</update_period>",
                        f"<update_period>{period}</update_period>")
    conf = conf.replace("<virtio>", f"<virtio><channel_path>{tmp}/channels</channel_path>")
    (tmp / "bench.conf").write_text(conf)
    log_path = tmp / "log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([VHOSTMD, "-d", "-v", "-f", str(tmp / "bench.conf"), "-c", uri,
                                 "-p", str(tmp / "pid")], stdout=log, stderr=subprocess.STDOUT)
        try:
            def cycles() -> int:
                return len(CYCLE_LINE.findall(log_path.read_text()))

            def wait_cycles(count: int, timeout: float) -> None:
                deadline = time.monotonic() + timeout
                while cycles() < count:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit(f"the daemon did not run cycles; see {log_path}")
                    time.sleep(0.1)

            wait_cycles(3, 60 + 3 * period)
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

            before, cycles_before = cpu(), cycles()
            time.sleep(seconds)
            after, cycles_after = cpu(), cycles()
            wait_cycles(cycles_after + 1, 3 * period + 30)
            time.sleep(period / 2)
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
    count = max(1, cycles_after - cycles_before)
    per_role = {name: (after.get(name, 0.0) - before.get(name, 0.0)) * 1000 / count
                for name in after}
    return per_role, count, pss, len(procs) - 2  # not the supervisor, forkserver


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cold-rounds", type=int, default=10,
                        help="rounds of the floor at the daemon's cadence, 1 s apart")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds that only shows the bench still works "
                             "(tests/test_bench.py runs every bench so; no run at 5 s)")
    parser.add_argument("--libvirtd", action="store_true",
                        help="also run at 5 s with the node served by a private libvirtd, as "
                             "on a host (root, libvirtd and virsh needed)")
    args = parser.parse_args()
    if args.quick:
        args.domains, args.seconds, args.cold_rounds = 20, 2.0, 1
    vsz: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vhostmd-floor-") as name:
        tmp = Path(name)
        uri, _ = nodes.write_node(tmp / "node.xml", args.domains)
        pieces, cold = floor(uri, tmp, args.cold_rounds)
        per_role, cycles, pss, children = daemon(uri, tmp, args.seconds, 1, vsz)
        shipped = {} if args.quick else daemon(uri, tmp, max(args.seconds, 20.0), 5, {})[2]
        idle = memory_floor(children)
        held = memory_floor(children, uri)
        served = through_libvirtd(tmp, args.domains) if args.libvirtd else None
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
    print_memory(per_role, pss, shipped, vsz, idle, held, children)
    if served is not None:
        pss_served, idle_served, children_served = served
        print("\nThrough a private libvirtd at 5 s (the node in libvirtd, not in the worker; "
              "an events child, as on a host):\n")
        print("| process | PSS MiB at 5 s | idle PSS MiB |")
        print("|---|---:|---:|")
        for role, mib in sorted(pss_served.items(), key=lambda item: -item[1]):
            floor_mib = idle_served.get(role, idle_served.get("child", 0.0)
                                        / max(1, children_served - 1))
            print(f"| {role} | {mib:.1f} | {floor_mib:.1f} |")
        print(f"| **total** | **{sum(pss_served.values()):.1f}** "
              f"| **{sum(idle_served.values()):.1f}** |")
    return 0


def through_libvirtd(tmp: Path, domains: int) -> tuple[dict[str, float], dict[str, float], int]:
    """PSS by role of vhostmd at 5 s on the node served by a private libvirtd, and of
    the idle model with as many children (the events child included)."""
    from test_faults import Libvirtd  # tests/: the fault tests' private libvirtd

    where = Path(tempfile.mkdtemp(prefix="vhbf"))  # short: a unix socket's path
    try:
        nodes.write_node(where / "node.xml", domains)
        server = Libvirtd(where)
        server.start()
        try:
            uri = f"test+unix://{where}/node.xml?socket={server.socket}"
            _, _, pss, children = daemon(uri, tmp, 20.0, 5, {})
        finally:
            server.stop()
    finally:
        shutil.rmtree(where, ignore_errors=True)
    return pss, memory_floor(children), children


def print_memory(per_role: dict[str, float], pss: dict[str, float], shipped: dict[str, float],
                 vsz: dict[str, float], idle: dict[str, float], held: dict[str, float],
                 children: int) -> None:
    """By process: the daemon's CPU and PSS at 1 s and 5 s, against the idle model's PSS.

    In the idle model the first child stands for the worker (holding, in the
    second model, the worker's libvirt connection), the others for the
    disk-writer and virtio.
    """
    def floor_of(model: dict[str, float], role: str) -> float:
        if role in ("supervisor", "forkserver", "worker"):
            return model.get(role, 0.0)
        return model.get("child", 0.0) / max(1, children - 1)

    print("PSS read half a period after a cycle. Idle: the process model doing nothing; "
          "+ connection: its worker holding the test driver's connection.\n")
    print("| process | CPU ms per cycle at 1 s | PSS MiB at 1 s | PSS MiB at 5 s "
          "| idle PSS MiB | idle + connection | VSZ MiB (largest) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for role, mib in sorted(pss.items(), key=lambda item: -item[1]):
        at5 = f"{shipped[role]:.1f}" if role in shipped else "-"
        print(f"| {role} | {per_role.get(role, 0.0):.1f} | {mib:.1f} | {at5} "
              f"| {floor_of(idle, role):.1f} | {floor_of(held, role):.1f} "
              f"| {vsz.get(role, 0.0):.0f} |")
    at5_total = f"**{sum(shipped.values()):.1f}**" if shipped else "-"
    print(f"| **total** | **{sum(per_role.values()):.1f}** | **{sum(pss.values()):.1f}** "
          f"| {at5_total} | **{sum(idle.values()):.1f}** | **{sum(held.values()):.1f}** | |\n")
    print(f"Memory floor: the same process model idle ({children} children, nothing "
          f"done): {sum(idle.values()):.1f} MiB PSS; with the worker's connection "
          f"{sum(held.values()):.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
