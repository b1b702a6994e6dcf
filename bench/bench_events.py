"""Measure how fast a VM that starts is served, and one that stops is dropped.

Run it from the checkout, as root: ``.venv/bin/python bench/bench_events.py``.

It starts a private libvirtd serving libvirt's test driver (as the fault tests
do) and a real ``vhostmd -d`` on it at update_period 5 (the default), with a
disk, virtio, a host shell metric (``date +%s%N``, to see each new document)
and a VM shell metric. Each round waits until just after a cycle (the worst
moment without events: the next scheduled cycle is ~5 s away), then:

- runs ``virsh create`` for a new test-driver domain, having first put a
  listening socket where QEMU would put its channel (``<id>-<name>/``), and
  times from just before ``virsh create`` to (a) the domain's metrics readable
  on the disk, (b) the daemon's connection to the channel socket, (c) the
  first response to a guest request on it;
- runs ``virsh destroy`` and times until the domain's metrics leave the disk.

The test driver runs no guest: this measures the daemon's reaction to the
lifecycle event, not QEMU's start-up.

``--qemu`` runs the same rounds with real QEMU guests instead (the
real-hypervisor rig of tests/qemu_rig.py: libvirtd with the QEMU driver,
``qemu:///system``, TCG where KVM is not usable): ``vhostmd -d`` with the
shipped etc/vhostmd.conf (only the disk path changed), and each round
``virsh create`` of a busybox guest with the shared metrics disk and the
``org.github.vhostmd.1`` channel, timed to its metrics on the disk and to the
daemon's connection on its channel socket (``ss``), then ``virsh destroy``,
timed to its metrics leaving the disk (tests/qemu_lifecycle.py, also used by
tests/test_qemu.py). It also prints how long virsh create and destroy
themselves took, and the load average around the rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_events import nanos, vm_ids  # the same readings as the tests

from daemon_harness import (
    Daemon,
    config_xml,
    disk_metrics,
    metric_xml,
    virtio_xml,
    wait_for,
)
from test_faults import Libvirtd
from test_virtio import FakeQemu

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine

METRICS = metric_xml("Nanos", "date +%s%N", mtype="uint64") + metric_xml(
    "VmId", "echo VMID", mtype="uint32", context="vm")


def main_qemu(rounds: int) -> int:
    import qemu_lifecycle
    import qemu_rig

    reason = qemu_rig.why_no_qemu()
    if reason:
        print(f"bench_events --qemu: cannot run real guests here: {reason}", file=sys.stderr)
        return 1
    results: list[qemu_lifecycle.Round] = []
    loads: list[float] = []
    with qemu_rig.qemu_host() as host:
        disk = host.work / "vhostmd0"
        daemon = Daemon(host.work, qemu_rig.shipped_config(disk), uri=qemu_rig.URI)
        try:
            daemon.start()
            wait_for(lambda: has_document(disk), 60, "the daemon's first document")
            daemon.wait_log("lifecycle events from", 60)
            guest = host.guest(qemu_rig.GuestSpec("vhostmd-bench-events"), disk)
            ours = daemon.titles

            def served_by(clients: dict[int, str]) -> bool:
                titles = ours()
                return all(pid in titles and "vhostmd: virtio" in cmd
                           for pid, cmd in clients.items())

            last = time.monotonic()
            for n in range(rounds):
                loads.append(os.getloadavg()[0])
                measured, last = qemu_lifecycle.lifecycle_round(guest, disk, served_by, last,
                                                                5, 40)
                results.append(measured)
                print(f"round {n + 1}: " + ", ".join(
                    f"{key} {getattr(measured, key):.3f} s" for key, _ in qemu_lifecycle.ROWS),
                    file=sys.stderr, flush=True)
            loads.append(os.getloadavg()[0])
            hypervisor = qemu_rig.virsh("version")
        finally:
            daemon.__exit__(None, None, None)
        accel = "KVM" if host.domain_type == "kvm" else "TCG"
    running = re.search(r"Running hypervisor: (.+)", hypervisor)
    library = re.search(r"Using library: (.+)", hypervisor)
    print(f"real QEMU guests ({accel}, {running.group(1) if running else '?'}, "
          f"{library.group(1) if library else '?'}), update_period 5 s, {rounds} rounds, "
          "each right after a regular cycle (seconds from just before virsh create/destroy)")
    print(f"machine: {machine.describe()}; 1-min load average during the rounds "
          f"{min(loads):.2f} to {max(loads):.2f}")
    print(qemu_lifecycle.table(results))
    shares = [r.daemon_share() for r in results]
    print("the daemon's share (after virsh returned), max: " + ", ".join(
        f"{key} {max(s[key] for s in shares):.3f} s" for key in ("disk", "channel", "gone")))
    return 0


def has_document(disk: Path) -> bool:
    try:
        return bool(disk_metrics(disk))
    except Exception:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--qemu", action="store_true",
                        help="real QEMU guests under qemu:///system (the tests' rig)")
    parser.add_argument("--period", type=int, default=5,
                        help="update_period in s (default 5, the shipped one; not with --qemu)")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds that only shows the bench still works "
                             "(tests/test_bench.py runs every bench so)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.period = 1, 1
    if args.qemu:
        return main_qemu(args.rounds)
    root = Path(tempfile.mkdtemp(prefix="vhbe"))
    server = Libvirtd(root)
    server.start()
    rw = f"test+unix:///default?socket={root / 'libvirt-sock'}"
    channels = root / "ch"
    disk = root / "vhostmd0"
    conf = config_xml(disk, METRICS, period=args.period, transports=("vbd", "virtio"),
                      globals_extra=virtio_xml(channels))
    daemon = Daemon(root, conf, uri=server.uri)
    results: dict[str, list[float]] = {"disk": [], "connect": [], "served": [], "gone": []}
    try:
        daemon.start()
        wait_for(lambda: vm_ids(disk) == {1}, 15, "domain 1")
        daemon.wait_log("lifecycle events from")
        for n in range(args.rounds):
            vm_id = n + 2  # the test driver numbers domains in order; "test" is 1
            fake = FakeQemu(channels / f"{vm_id}-bench{n}")
            xml = root / f"bench{n}.xml"
            xml.write_text(f"<domain type='test'><name>bench{n}</name><memory>8192</memory>"
                           "<os><type>hvm</type></os></domain>")
            first = nanos(disk)
            wait_for(lambda first=first: nanos(disk) != first, 7, "a cycle", interval=0.002)
            start = time.monotonic()
            subprocess.run(["virsh", "-q", "-c", rw, "create", str(xml)], check=True,
                           capture_output=True)
            wait_for(lambda vm_id=vm_id: vm_id in (vm_ids(disk) or ()), 7, "on disk",
                     interval=0.002)
            results["disk"].append(time.monotonic() - start)
            fake.accept(7)
            results["connect"].append(time.monotonic() - start)
            response = fake.request()
            assert re.search(rf"id='{vm_id}'".encode(), response), response
            results["served"].append(time.monotonic() - start)
            first = nanos(disk)
            wait_for(lambda first=first: nanos(disk) != first, 7, "a cycle", interval=0.002)
            start = time.monotonic()
            subprocess.run(["virsh", "-q", "-c", rw, "destroy", f"bench{n}"], check=True,
                           capture_output=True)
            wait_for(lambda vm_id=vm_id: vm_id not in (vm_ids(disk) or {vm_id}), 7, "gone",
                     interval=0.002)
            results["gone"].append(time.monotonic() - start)
            fake.close()
    finally:
        daemon.__exit__(None, None, None)
        server.stop()
    print(f"update_period {args.period} s, {args.rounds} rounds, each right after a cycle "
          "(seconds from just before virsh create/destroy)")
    print(f"{'':34} {'min':>6} {'median':>7} {'max':>6}")
    for key, label in (("disk", "create -> metrics on the disk"),
                       ("connect", "create -> channel connected"),
                       ("served", "create -> channel answered"),
                       ("gone", "destroy -> metrics off the disk")):
        values = results[key]
        print(f"{label:34} {min(values):6.3f} {statistics.median(values):7.3f} "
              f"{max(values):6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
