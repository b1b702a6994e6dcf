"""Benchmark the virtio process: 1024 guests asking at the same moment.

Run it from the checkout: ``.venv/bin/python bench/bench_virtio.py``.

It starts a real ``vhostmd -d`` against a libvirt test-driver node with N
running domains, plays QEMU for every one of them (a listening
``<id>-<name>/org.github.vhostmd.1`` socket each), waits until the daemon has
connected all N channels, and then measures:

- burst: every guest sends ``GET /metrics/XML`` in one tight loop, and the time
  from each guest's send to its complete response is recorded (several
  rounds); the burst throughput is N divided by the time from the first send
  to the last complete response;
- sustained: every guest sends its next request as soon as its previous
  response is complete, for a few seconds. The per-channel rate limit
  (RATE_PER_SECOND) caps this at N x that rate, which the table shows too;
- the virtio process's CPU seconds (over the measured phases) and its PSS and
  RSS (psutil ``memory_full_info``) at the end.

The update period is long on purpose, so that the measurement window sits
between two cycles (a cycle runs a shell per VM for the VmId metric): this
measures the virtio process, not the collectors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from vhostmd.protocol import CHANNEL_NAME, REQUEST, RESPONSE_END
from vhostmd.virtio.channel import RATE_BURST, RATE_PER_SECOND

VHOSTMD = str(Path(sys.executable).parent / "vhostmd")
UPDATE_PERIOD = 30

HOST_METRICS = "".join(
    f'<metric type="string" context="host"><name>{name}</name><action>echo {value}</action>'
    "</metric>\n"
    for name, value in [("HostName", "bench-host.example.org"), ("VirtualizationVendor", "libvirt"),
                        ("HostSystemInfo", "bench"), ("NumCPUs", "16"),
                        ("TotalPhyMem", "65536"), ("FreeMem", "32768")]
)
VM_METRICS = ('<metric type="uint32" context="vm"><name>VmId</name>'
              "<action>echo VMID</action></metric>")


def node_xml(count: int) -> str:
    domains = "".join(
        f"<domain type='test'><name>bench-vm-{i:04d}</name><uuid>{uuid.uuid4()}</uuid>"
        "<memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>\n"
        for i in range(1, count + 1)
    )
    return ("<node>\n<cpu><mhz>2000</mhz><model>i686</model><active>2</active><sockets>1</sockets>"
            "<cores>2</cores><threads>1</threads></cpu>\n<memory>8388608</memory>\n"
            f"{domains}</node>\n")


def config_xml(channel_path: Path, count: int) -> str:
    return f"""<?xml version="1.0"?>
<vhostmd>
  <globals>
    <virtio>
      <channel_path>{channel_path}</channel_path>
      <max_channels>{count}</max_channels>
    </virtio>
    <update_period>{UPDATE_PERIOD}</update_period>
    <path>/usr/sbin:/usr/bin:/sbin:/bin</path>
    <transport>virtio</transport>
  </globals>
  <metrics>
{HOST_METRICS}{VM_METRICS}
  </metrics>
</vhostmd>
"""


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        sys.exit(f"bench_virtio: needs {needed} open files, the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def descendants_of(pid: int) -> dict[int, str]:
    """Every process under ``pid``: children come from the forkserver, not the supervisor."""
    found = {}
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                found[child.pid] = " ".join(child.cmdline()).strip()
    return found


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def memory_kib(pid: int) -> dict[str, int]:
    memory = psutil.Process(pid).memory_full_info()
    return {"Rss": memory.rss // 1024, "Pss": memory.pss // 1024}


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def machine_info() -> list[tuple[str, str]]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = psutil.virtual_memory().total // 1024
    return [
        ("nproc", str(os.cpu_count())),
        ("CPU", model),
        ("memory", f"{mem_kib / 1024 / 1024:.1f} GiB"),
        ("Python", platform.python_version()),
        ("kernel", platform.release()),
    ]


class Guests:
    """N fake-QEMU listeners, then the N connections the daemon made: all guests at once."""

    def __init__(self, channel_path: Path, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.listeners: dict[int, socket.socket] = {}
        for vm_id in range(1, count + 1):
            directory = channel_path / f"{vm_id}-bench-vm-{vm_id:04d}"
            directory.mkdir(parents=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(directory / CHANNEL_NAME))
            listener.listen(1)
            listener.setblocking(False)
            self.listeners[vm_id] = listener
            self.selector.register(listener, selectors.EVENT_READ, ("listen", vm_id))
        self.conns: dict[int, socket.socket] = {}
        self.buffers: dict[int, bytearray] = {}
        self.response_bytes = 0

    def accept_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.conns) < len(self.listeners):
            left = deadline - time.monotonic()
            if left <= 0:
                sys.exit(f"bench_virtio: only {len(self.conns)} of {len(self.listeners)} "
                         "channels connected")
            for key, _ in self.selector.select(min(left, 1.0)):
                kind, vm_id = key.data
                if kind != "listen":
                    continue
                conn, _ = self.listeners[vm_id].accept()
                conn.setblocking(False)
                self.selector.unregister(self.listeners[vm_id])
                self.conns[vm_id] = conn
                self.buffers[vm_id] = bytearray()
                self.selector.register(conn, selectors.EVENT_READ, ("conn", vm_id))

    def read_until_complete(self, pending: set[int], on_complete, deadline: float) -> None:
        """Read responses until every guest in ``pending`` has one; call on_complete(vm_id, t)."""
        while pending:
            if time.monotonic() > deadline:
                sys.exit(f"bench_virtio: {len(pending)} guests got no complete response")
            for key, _ in self.selector.select(1.0):
                _, vm_id = key.data
                chunk = self.conns[vm_id].recv(65536)
                if not chunk:
                    sys.exit(f"bench_virtio: the daemon hung up on VM {vm_id}")
                buffer = self.buffers[vm_id]
                buffer += chunk
                if buffer.endswith(RESPONSE_END):
                    now = time.perf_counter()
                    check = f"id='{vm_id}'".encode()
                    if check not in buffer or buffer.count(RESPONSE_END) != 1:
                        sys.exit(f"bench_virtio: a wrong response for VM {vm_id}")
                    self.response_bytes = len(buffer)
                    buffer.clear()
                    pending.discard(vm_id)
                    on_complete(vm_id, now)

    def burst(self) -> tuple[list[float], float]:
        """All guests send at once: (latencies in s, first send to last response in s)."""
        sent: dict[int, float] = {}
        latencies: list[float] = []
        first = time.perf_counter()
        for vm_id, conn in self.conns.items():
            sent[vm_id] = time.perf_counter()
            conn.send(REQUEST)
        last = first

        def done(vm_id: int, now: float) -> None:
            nonlocal last
            latencies.append(now - sent[vm_id])
            last = now

        self.read_until_complete(set(self.conns), done, time.monotonic() + 30)
        return latencies, last - first

    def sustain(self, seconds: float, warmup: float = 1.0) -> float:
        """Every guest asks again as soon as it has its answer: responses per second.

        Counted after ``warmup`` seconds, once the tokens left over from the
        rate limit's burst allowance are spent and only its refill rate counts.
        """
        counted = 0
        start = time.perf_counter()
        count_from = start + warmup
        end = count_from + seconds
        pending = set(self.conns)
        for conn in self.conns.values():
            conn.send(REQUEST)

        def done(vm_id: int, now: float) -> None:
            nonlocal counted
            if count_from <= now < end:
                counted += 1
            if now < end:
                self.conns[vm_id].send(REQUEST)
                pending.add(vm_id)

        self.read_until_complete(pending, done, time.monotonic() + warmup + seconds + 30)
        return counted / seconds

    def close(self) -> None:
        for sock in [*self.conns.values(), *self.listeners.values()]:
            sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5, help="simultaneous bursts to time")
    parser.add_argument("--sustain", type=float, default=5.0, help="seconds of sustained load")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds that only shows the bench still works "
                             "(tests/test_bench.py runs every bench so)")
    args = parser.parse_args()
    if args.quick:
        args.channels, args.rounds, args.sustain = 16, 2, 0.5
    if args.rounds >= RATE_BURST:
        parser.error(f"--rounds must stay below the rate-limit burst ({RATE_BURST})")
    count = args.channels
    raise_fd_limit(3 * count + 256)  # listeners + connections here, channels in the daemon

    root = Path(tempfile.mkdtemp(prefix="vhbench"))
    daemon: subprocess.Popen | None = None
    guests: Guests | None = None
    try:
        channel_path = root / "ch"
        node = root / "node.xml"
        node.write_text(node_xml(count))
        conf = root / "vhostmd.conf"
        conf.write_text(config_xml(channel_path, count))
        guests = Guests(channel_path, count)
        started = time.monotonic()
        daemon = subprocess.Popen(
            [VHOSTMD, "-d", "-f", str(conf), "-p", str(root / "pid"), "-c", f"test://{node}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(root / "vhostmd.log", "wb"),  # noqa: SIM115 (lives as long as the daemon)
        )
        guests.accept_all(timeout=60)
        connected_after = time.monotonic() - started
        virtio = next((pid for pid, title in descendants_of(daemon.pid).items()
                       if title.startswith("vhostmd: virtio")), None)
        if virtio is None:
            sys.exit("bench_virtio: no virtio process found")
        guests.burst()  # warm-up: every channel answered once, responses built
        cpu_before = cpu_seconds(virtio)
        measured_from = time.perf_counter()
        latencies: list[float] = []
        walls: list[float] = []
        for _ in range(args.rounds):
            round_latencies, wall = guests.burst()
            latencies.extend(round_latencies)
            walls.append(wall)
        sustained = guests.sustain(args.sustain)
        cpu = cpu_seconds(virtio) - cpu_before
        measured = time.perf_counter() - measured_from
        memory = memory_kib(virtio)
        title = descendants_of(daemon.pid).get(virtio, "?")
    finally:
        if guests is not None:
            guests.close()
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(root, ignore_errors=True)

    latencies.sort()
    ms = 1000.0
    rows = [
        ("channels connected", f"{count} (all connected {connected_after:.1f} s after start)"),
        ("virtio process title", title),
        ("response size", f"{guests.response_bytes} bytes"),
        (f"burst of {count} simultaneous requests, p50",
         f"{percentile(latencies, 0.50) * ms:.1f} ms"),
        ("burst p99", f"{percentile(latencies, 0.99) * ms:.1f} ms"),
        ("burst max", f"{latencies[-1] * ms:.1f} ms"),
        ("burst: first send to last response (median of rounds)",
         f"{sorted(walls)[len(walls) // 2] * ms:.1f} ms "
         f"({count / sorted(walls)[len(walls) // 2]:.0f} requests/s)"),
        (f"sustained, every guest looping for {args.sustain:g} s",
         f"{sustained:.0f} requests/s "
         f"(rate-limit ceiling {count * RATE_PER_SECOND:.0f}/s)"),
        ("virtio CPU over the measured phases",
         f"{cpu:.2f} s in {measured:.1f} s wall ({args.rounds} bursts + sustained)"),
        ("virtio PSS / RSS", f"{memory.get('Pss', 0) / 1024:.1f} MiB / "
                             f"{memory.get('Rss', 0) / 1024:.1f} MiB"),
    ]
    out = ["| measure | result |", "|---|---|"]
    out += [f"| {name} | {value} |" for name, value in rows]
    out += ["", "| machine | |", "|---|---|"]
    out += [f"| {name} | {value} |" for name, value in machine_info()]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
