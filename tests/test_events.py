"""libvirt lifecycle events against a real daemon and a private libvirtd.

The libvirtd serves the test driver; a domain created or destroyed with
virsh on its read-write socket raises a lifecycle event on the daemon's
read-only event connection. At update_period 5, the daemon must publish a
new VM (disk and virtio channel) and drop a stopped one within a second: a
cycle started by the event, not by the schedule. Each domain change is made
right after a regular cycle, so a daemon without events would take about 5 s.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostmd.supervisor.cycle import CycleClock
from vhostmd.supervisor.instant import MIN_GAP, InstantCycles

from daemon_harness import Daemon, config_xml, metric_xml, ready_metrics, virtio_xml, wait_for
from test_faults import Libvirtd, libvirtd  # noqa: F401 - the fixture
from test_virtio import FakeQemu

PERIOD = 5
LATENCY = 1.0  # what the issue asks: served / gone within 1 s
HOST_VALUE = "host-says-hello"
METRICS = "\n".join([
    metric_xml("HostGreeting", f"echo {HOST_VALUE}"),
    metric_xml("Nanos", "date +%s%N", mtype="uint64"),
    metric_xml("VmId", "echo VMID", mtype="uint32", context="vm"),
])


def domain_xml(name: str) -> str:
    return (f"<domain type='test'><name>{name}</name><memory>8192</memory>"
            "<os><type>hvm</type></os></domain>")


def virsh(server: Libvirtd, *args: str) -> str:
    rw = f"test+unix:///default?socket={server.dir / 'libvirt-sock'}"
    done = subprocess.run(["virsh", "-c", rw, *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def create(server: Libvirtd, name: str, where: Path) -> None:
    path = where / f"{name}.xml"
    path.write_text(domain_xml(name))
    virsh(server, "create", str(path))


def vm_ids(disk: Path) -> set[int] | None:
    """Domain ids with a VmId on the disk now (None while no document is readable)."""
    metrics = ready_metrics(disk)
    return None if metrics is None else {int(m.value) for m in metrics if m.name == "VmId"}


def nanos(disk: Path) -> str | None:
    return next((m.value for m in ready_metrics(disk) or () if m.name == "Nanos"), None)


def after_a_regular_cycle(disk: Path) -> None:
    """Return just after a cycle published (the next scheduled one is seconds away)."""
    first = nanos(disk)
    wait_for(lambda: nanos(disk) != first, PERIOD + 2, "a fresh document", interval=0.005)


def timed(predicate: object, timeout: float, what: str) -> float:
    """Seconds until ``predicate()`` holds (polled every 5 ms), failing after ``timeout``."""
    start = time.monotonic()
    wait_for(predicate, timeout, what, interval=0.005)  # type: ignore[arg-type]
    return time.monotonic() - start


@pytest.fixture
def channels() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="vhch"))  # short: unix socket paths are limited
    yield where
    shutil.rmtree(where, ignore_errors=True)


def test_started_and_stopped_domains_follow_within_a_second(
        tmp_path: Path, libvirtd: Libvirtd, channels: Path) -> None:  # noqa: F811
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, METRICS, period=PERIOD, transports=("vbd", "virtio"),
                      globals_extra=virtio_xml(channels))
    # The test driver starts with domain 1 ("test"); the next domain created gets id 2.
    # QEMU creates the channel socket before libvirt says the domain started.
    fake = FakeQemu(channels / "2-evt")
    try:
        with Daemon(tmp_path, conf, uri=libvirtd.uri) as daemon:
            wait_for(lambda: vm_ids(disk) == {1}, 10, "domain 1 on the disk")
            daemon.wait_log("lifecycle events from")
            after_a_regular_cycle(disk)
            start = time.monotonic()
            create(libvirtd, "evt", tmp_path)
            on_disk = timed(lambda: vm_ids(disk) == {1, 2}, PERIOD + 2, "domain 2 on the disk")
            assert on_disk < LATENCY, f"new domain on the disk after {on_disk:.3f} s"
            fake.accept(PERIOD + 2)
            served = time.monotonic() - start
            check_own_metrics_for(fake, 2)
            assert served < LATENCY, f"channel connected after {served:.3f} s"

            after_a_regular_cycle(disk)
            virsh(libvirtd, "destroy", "evt")
            gone = timed(lambda: vm_ids(disk) == {1}, PERIOD + 2, "domain 2 gone")
            assert gone < LATENCY, f"stopped domain still on the disk after {gone:.3f} s"
            assert daemon.stop() == 0
            assert "Traceback" not in daemon.log()
    finally:
        fake.close()


def check_own_metrics_for(fake: FakeQemu, vm_id: int) -> None:
    response = fake.request()
    vm = re.findall(rb"context='vm' id='(\d+)'", response)
    assert vm and {int(x) for x in vm} == {vm_id}
    assert f"<value>{HOST_VALUE}</value>".encode() in response


def test_events_survive_a_libvirtd_restart(tmp_path: Path, libvirtd: Libvirtd) -> None:  # noqa: F811
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, METRICS, period=PERIOD)
    with Daemon(tmp_path, conf, uri=libvirtd.uri) as daemon:
        wait_for(lambda: vm_ids(disk) == {1}, 10, "domain 1 on the disk")
        daemon.wait_log("lifecycle events from")
        libvirtd.stop()
        daemon.wait_log("lost (libvirt closed the connection)", 5)
        # Listing goes on (and fails): VM metrics leave at the next cycle.
        wait_for(lambda: vm_ids(disk) == set(), PERIOD + 3, "VM metrics left out")
        libvirtd.start()
        daemon.wait_log(": back", 15)
        wait_for(lambda: vm_ids(disk) == {1}, PERIOD + 3, "domain 1 back")
        after_a_regular_cycle(disk)
        create(libvirtd, "again", tmp_path)
        on_disk = timed(lambda: vm_ids(disk) == {1, 2}, PERIOD + 2, "domain 2 on the disk")
        assert on_disk < LATENCY, f"new domain on the disk after {on_disk:.3f} s"
        assert daemon.stop() == 0


def test_event_storm_is_rate_limited(tmp_path: Path, libvirtd: Libvirtd) -> None:  # noqa: F811
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, METRICS, period=PERIOD)
    with Daemon(tmp_path, conf, uri=libvirtd.uri) as daemon:
        wait_for(lambda: vm_ids(disk) == {1}, 10, "domain 1 on the disk")
        daemon.wait_log("lifecycle events from")
        after_a_regular_cycle(disk)
        before = cycle_lines(daemon)
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < 2.0:  # two events per round, as fast as virsh goes
            create(libvirtd, f"storm{i}", tmp_path)
            virsh(libvirtd, "destroy", f"storm{i}")
            i += 1
        elapsed = time.monotonic() - start
        wait_for(lambda: cycle_lines(daemon) - before >= 4, 2, "cycles for the storm")
        cycles = cycle_lines(daemon) - before
        # Events drive cycles (the next scheduled one is still seconds away), but at most
        # one starts per MIN_GAP, however many events come.
        assert 2 * i > 4 * cycles, (i, cycles)
        assert cycles <= elapsed / MIN_GAP + 2, (cycles, elapsed)
        wait_for(lambda: vm_ids(disk) == {1}, 2, "the storm's domains gone")
        assert daemon.stop() == 0


def cycle_lines(daemon: Daemon) -> int:
    return len(re.findall(r"DEBUG: cycle \d+:", daemon.log()))


def test_extra_cycles_never_move_the_schedule() -> None:
    """The arbiter's rule, driven by a clock: regular starts stay at base + k x period."""
    period, base = 5, 100.0
    clock = CycleClock(period, base)
    instant = InstantCycles()
    now, number, regular_starts, extra_starts = base, 0, [], []
    events = [100.2, 100.3, 101.0, 104.7, 104.9, 107.0, 107.1, 107.2, 107.25, 109.8]
    while now < base + 4 * period:
        while events and events[0] <= now:
            events.pop(0)
            instant.request()
        if now >= clock.next:
            number += 1
            instant.started(number, now, extra=False)
            regular_starts.append(round(now, 2))
            clock.advance(now + 0.05)  # each cycle takes 50 ms
        elif instant.due(now, clock.next):
            number += 1
            instant.started(number, now, extra=True)
            extra_starts.append(round(now, 2))
            assert instant.deadline(now + 0.8 * period, clock.next) <= clock.next
        now = round(now + 0.01, 2)
    assert regular_starts == [100.0, 105.0, 110.0, 115.0]
    # 100.2 is served at once, 100.3 and 101.0 each after the gap; 104.7/104.9 are
    # served by the 105.0 regular start; the 107.x burst costs two cycles (at once,
    # then after the gap); 109.8 rides on the 110.0 regular start.
    assert extra_starts == [100.2, 100.7, 101.2, 107.0, 107.5]
    assert all(b - a >= MIN_GAP for a, b in itertools.pairwise(extra_starts))
