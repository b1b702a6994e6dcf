#!/usr/bin/env python3
"""Cycle benchmark: built-in collectors vs the original's shell actions, 10..2000 VMs.

Runs a real vhostmd (the console script next to this Python) against libvirt
test-driver node files with N running domains and reports, per N:

- wall time of a cycle: from the cycle's start to its complete document being
  rendered and handed to the disk-writer (the daemon's own "cycle N: ..."
  debug line), median and p95 over the measured cycles;
- CPU seconds per cycle of all vhostmd processes together (supervisor, workers,
  disk-writer, and the shell pipelines the workers ran): user+system time of
  each process and of the children it reaped (psutil ``cpu_times``), over the
  measured window, divided by its cycles;
- total PSS of all vhostmd processes (psutil ``memory_full_info().pss``) at the end.

"builtin" runs the shipped etc/vhostmd.conf (both metric sets from built-in
collectors). "shell" runs a config whose only metric is the original's default
VM metric (`virsh CONNECT dominfo NAME | sed | awk | sed`), one pipeline per VM
per cycle; it is far slower, so it runs fewer cycles and, from 1000 VMs on,
one single cycle with a long period (marked in the table).

Usage: .venv/bin/python bench/bench_cycle.py [--domains 10,100,1000,2000]
       [--cycles 20] [--period 1] [--shell-domains 10,100,1000] [--no-shell]
Prints a markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import nodes  # noqa: E402  (tests/nodes.py: writes the test-driver node files)

VHOSTMD = str(Path(sys.executable).parent / "vhostmd")
SHIPPED_CONF = HERE.parent / "etc" / "vhostmd.conf"
CYCLE_LINE = re.compile(r"cycle (\d+): (\d+) metrics, (\d+) left out, ([0-9.]+) s")
# The original's default VM metric (upstream vhostmd.conf), verbatim.
SHELL_VM_METRIC = """
    <metric type="real64" context="vm" unit="s">
      <name>TotalCPUTime</name>
      <action>
        virsh CONNECT dominfo NAME | sed 's/: */:/' | \\
        awk -F: '/CPU time/ {print $2;}' | sed 's/s//'
      </action>
    </metric>"""
SHELL_SINGLE_CYCLE_FROM = 1000  # VMs: from here on the shell config runs one cycle
SHELL_SINGLE_PERIOD = 600


@dataclass
class CycleRecord:
    number: int
    metrics: int
    left_out: int
    seconds: float


@dataclass
class Result:
    mode: str
    domains: int
    period: int
    cycles: list[CycleRecord]
    cpu_seconds: float  # all vhostmd processes over the measured window
    cpu_by_role: dict[str, float]
    pss_by_role: dict[str, int]
    single: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def walls(self) -> list[float]:
        return [c.seconds for c in self.cycles]

    @property
    def pss_kib(self) -> int:
        return sum(self.pss_by_role.values())

    @property
    def cpu_per_cycle(self) -> float:
        return self.cpu_seconds / max(1, len(self.cycles))


class DaemonLog:
    """Reads the daemon's stderr in a thread; collects its cycle lines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.cycles: list[CycleRecord] = []
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line.rstrip())
                if match := CYCLE_LINE.search(line):
                    number, metrics, left_out, seconds = match.groups()
                    self.cycles.append(CycleRecord(int(number), int(metrics), int(left_out),
                                                   float(seconds)))
                self.changed.notify_all()

    def wait_cycles(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.cycles) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(self.lines[-15:])
                    raise RuntimeError(f"waited {timeout:.0f} s for cycle {count}, "
                                       f"saw {len(self.cycles)}:\n{tail}")
                self.changed.wait(min(left, 1.0))


def title(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline()).strip()
    except psutil.Error:
        return ""


def vhostmd_processes(root: int) -> dict[int, str]:
    """pid -> role of the supervisor and its vhostmd children (not the shells they run)."""
    try:
        tree = [root, *(p.pid for p in psutil.Process(root).children(recursive=True))]
    except psutil.Error:
        return {}
    found = {}
    for pid in tree:
        text = title(pid)
        if text.startswith("vhostmd:"):
            role = text.split(":", 1)[1].strip().split()[0]  # supervisor, worker, disk-writer
            found[pid] = role
    return found


def cpu_seconds(pid: int) -> float:
    """utime+stime of the process and of its children it has reaped (the shells)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system + times.children_user + times.children_system


def cpu_by_role(root: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    for pid, role in vhostmd_processes(root).items():
        totals[role] = totals.get(role, 0.0) + cpu_seconds(pid)
    return totals


def pss_by_role(root: int) -> dict[str, int]:
    """KiB of PSS per process role (workers summed)."""
    totals: dict[str, int] = {}
    for pid, role in vhostmd_processes(root).items():
        with contextlib.suppress(psutil.Error):
            pss = psutil.Process(pid).memory_full_info().pss
            totals[role] = totals.get(role, 0) + pss // 1024
    return totals


def disk_size_k(domains: int, mode: str) -> int:
    # A VM's metrics take ~700 bytes in the document with both sets, ~180 with
    # the one shell metric; the shipped 256 KiB disk holds ~360 VMs of both sets.
    per_vm = 1 if mode == "builtin" else 0.25
    return max(256, int(64 + per_vm * domains))


def builtin_config(disk: Path, period: int, size_k: int) -> str:
    text = SHIPPED_CONF.read_text()
    text = text.replace("<path>/dev/shm/vhostmd0</path>", f"<path>{disk}</path>")
    text = text.replace('<size unit="k">256</size>', f'<size unit="k">{size_k}</size>')
    return text.replace("<update_period>5</update_period>",
                        f"<update_period>{period}</update_period>")


def shell_config(disk: Path, period: int, size_k: int) -> str:
    text = builtin_config(disk, period, size_k)
    start = text.index("  <metrics>")
    end = text.index("</metrics>") + len("</metrics>")
    return text[:start] + "  <metrics>" + SHELL_VM_METRIC + "\n  </metrics>" + text[end:]


def run_one(mode: str, domains: int, *, cycles: int, warmup: int, period: int,
            workdir: Path, single: bool = False) -> Result:
    run_dir = workdir / f"{mode}-{domains}"
    run_dir.mkdir()
    uri, _ = nodes.write_node(run_dir / "node.xml", domains)
    disk = run_dir / "vhostmd0"
    size_k = disk_size_k(domains, mode)
    conf = run_dir / "vhostmd.conf"
    make = builtin_config if mode == "builtin" else shell_config
    conf.write_text(make(disk, period, size_k))
    cmd = [VHOSTMD, "-d", "-v", "-f", str(conf), "-p", str(run_dir / "pid"), "-c", uri]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=run_dir)
    log = DaemonLog(proc)
    try:
        if single:
            # One cycle from start: CPU counts everything up to its end.
            before = {"all": 0.0}
            log.wait_cycles(1, SHELL_SINGLE_PERIOD)
            measured = log.cycles[:1]
        else:
            log.wait_cycles(warmup, 60 + 5 * period)
            before = cpu_by_role(proc.pid)
            log.wait_cycles(warmup + cycles, 60 + period * (cycles + 2))
            measured = log.cycles[warmup:warmup + cycles]
        after = cpu_by_role(proc.pid)
        pss = pss_by_role(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
        log.thread.join(5)
    by_role = {role: after[role] - before.get(role, 0.0) for role in after}
    result = Result(mode, domains, period, measured, sum(by_role.values()),
                    by_role, pss, single)
    if status != 0:
        result.notes.append(f"exit status {status}")
    expected = max(c.metrics for c in measured)
    incomplete = [c for c in measured if c.left_out or c.metrics < expected]
    if incomplete:
        result.notes.append(f"{len(incomplete)} cycles incomplete (left out: "
                            f"{max(c.left_out for c in incomplete)})")
    overflow = [line for line in log.lines if "too large" in line or "does not fit" in line]
    if overflow:
        result.notes.append("document larger than the disk")
    return result


def idle_cpu_rate(workdir: Path, seconds: float) -> float:
    """CPU seconds per second of an idle daemon (between cycles), 10 VMs."""
    run_dir = workdir / "idle"
    run_dir.mkdir()
    uri, _ = nodes.write_node(run_dir / "node.xml", 10)
    conf = run_dir / "vhostmd.conf"
    conf.write_text(builtin_config(run_dir / "vhostmd0", 3600, 256))
    proc = subprocess.Popen([VHOSTMD, "-d", "-v", "-f", str(conf), "-p", str(run_dir / "pid"),
                             "-c", uri],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=run_dir)
    log = DaemonLog(proc)
    try:
        log.wait_cycles(1, 60)
        start_cpu, start = sum(cpu_by_role(proc.pid).values()), time.monotonic()
        # Sampling an idle daemon: the measurement needs wall time to pass.
        time.sleep(seconds)
        rate = (sum(cpu_by_role(proc.pid).values()) - start_cpu) / (time.monotonic() - start)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.thread.join(5)
    return rate


def machine() -> list[str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = psutil.virtual_memory().total // 1024
    try:
        import libvirt

        packed = libvirt.getVersion()
        libvirt_version = f"{packed // 1_000_000}.{packed // 1000 % 1000}.{packed % 1000}"
    except Exception as exc:  # the table is still useful without it
        libvirt_version = f"unknown ({exc})"
    return [
        f"- CPUs: {len(os.sched_getaffinity(0))} available (nproc), model: {model}",
        f"- Memory: {mem_kib / 1024 / 1024:.1f} GiB",
        f"- Kernel: {platform.release()}, Python {platform.python_version()}, "
        f"libvirt {libvirt_version} (test driver, in-process)",
    ]


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def p95(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def table(results: list[Result], idle_rate: float) -> list[str]:
    lines = [
        "| config | VMs | metrics/cycle | cycles | period s | cycle median ms | cycle p95 ms "
        "| CPU ms/cycle | % of a core at 5 s period | PSS total MiB | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        walls = r.walls
        # Busy CPU of a cycle plus idle CPU (heartbeats, polling) over 5 s.
        busy = max(0.0, r.cpu_per_cycle - (0 if r.single else idle_rate * r.period))
        at_5s = (busy + idle_rate * 5) / 5 * 100
        notes = list(r.notes)
        if r.single:
            notes.insert(0, "single cycle (CPU includes start-up)")
            if walls[0] > 0.8 * 5:
                notes.append("exceeds a 5 s period")
        lines.append(
            f"| {r.mode} | {r.domains} | {r.cycles[-1].metrics} | {len(walls)} | {r.period} "
            f"| {fmt_ms(statistics.median(walls))} | {fmt_ms(p95(walls))} "
            f"| {fmt_ms(r.cpu_per_cycle)} | {at_5s:.2f} | {r.pss_kib / 1024:.1f} "
            f"| {'; '.join(notes)} |")
    return lines


def role_table(results: list[Result]) -> list[str]:
    roles = sorted({role for r in results for role in r.cpu_by_role})
    lines = ["| config | VMs | "
             + " | ".join(f"{role} CPU ms/cycle" for role in roles) + " | "
             + " | ".join(f"{role} PSS MiB" for role in roles) + " |",
             "|---|---:|" + "---:|" * 2 * len(roles)]
    for r in results:
        cells = [fmt_ms(r.cpu_by_role.get(role, 0.0) / max(1, len(r.cycles))) for role in roles]
        cells += [f"{r.pss_by_role.get(role, 0) / 1024:.1f}" for role in roles]
        lines.append(f"| {r.mode} | {r.domains} | " + " | ".join(cells) + " |")
    return lines


def counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", type=counts, default=[10, 100, 1000, 2000],
                   help="VM counts for the built-in config (default 10,100,1000,2000)")
    p.add_argument("--cycles", type=int, default=20, help="measured cycles (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="cycles skipped first (default 3)")
    p.add_argument("--period", type=int, default=1, help="update_period in s (default 1)")
    p.add_argument("--shell-domains", type=counts, default=[10, 100, 1000],
                   help="VM counts for the shell config (default 10,100,1000)")
    p.add_argument("--shell-cycles", type=int, default=5,
                   help="measured cycles of the shell config (default 5)")
    p.add_argument("--no-shell", action="store_true", help="skip the shell config")
    p.add_argument("--quick", action="store_true",
                   help="a run of a few seconds that only shows the bench still works "
                        "(tests/test_bench.py runs every bench so)")
    args = p.parse_args()
    idle_seconds = 5.0
    if args.quick:
        args.domains, args.cycles, args.warmup = [10], 2, 1
        args.shell_domains, args.shell_cycles = [3], 1
        idle_seconds = 0.5

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="vhostmd-bench-") as tmp:
        workdir = Path(tmp)
        print("measuring idle CPU ...", file=sys.stderr)
        idle_rate = idle_cpu_rate(workdir, idle_seconds)
        for n in args.domains:
            print(f"builtin, {n} VMs ...", file=sys.stderr)
            results.append(run_one("builtin", n, cycles=args.cycles, warmup=args.warmup,
                                   period=args.period, workdir=workdir))
        for n in [] if args.no_shell else args.shell_domains:
            print(f"shell, {n} VMs ...", file=sys.stderr)
            if n >= SHELL_SINGLE_CYCLE_FROM:
                results.append(run_one("shell", n, cycles=1, warmup=0,
                                       period=SHELL_SINGLE_PERIOD, workdir=workdir,
                                       single=True))
            else:
                # One pipeline per VM: give a cycle time to finish (~40 ms a VM).
                period = max(args.period, 1 if n <= 10 else 5 * -(-n // 100))
                results.append(run_one("shell", n, cycles=args.shell_cycles,
                                       warmup=1, period=period, workdir=workdir))

    out = ["### Cycle benchmark (bench/bench_cycle.py)", "", *machine(), "",
           *table(results, idle_rate), "",
           f"Idle daemon (between cycles): {idle_rate * 1000:.2f} ms CPU per second. "
           "'% of a core at 5 s period' = (CPU of a cycle - idle CPU of the measured "
           "period + idle CPU of 5 s) / 5 s. Cycle time: start of the cycle to its "
           "document rendered and handed to the disk-writer (the daemon's debug line).",
           "", "By process role (workers summed):", "", *role_table(results)]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
