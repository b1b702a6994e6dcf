"""How soon a real QEMU guest that starts is served, and one that stops is dropped.

Used by ``tests/test_qemu.py`` (a few rounds, with a bound) and by
``bench/bench_events.py --qemu`` (more rounds, a table). A round, with a
vhostmd at update_period 5 serving ``qemu:///system`` and a guest that is not
running:

1. wait until just after a *regular* cycle published: the first new document
   at least :data:`QUIET` s after the last domain change we made (the extra
   cycles that change caused are over by then), so the next scheduled cycle
   is a whole period away and a daemon without lifecycle events would take
   about that long to notice a change;
2. ``virsh create`` (or ``virsh start`` of a defined guest) and time, from
   just before it, (a) the VM's metrics on the metrics disk as the host reads
   it and (b) the daemon's connection to the VM's channel socket (``ss``: the
   daemon's virtio process is the socket's one client), polled side by side;
3. wait again until just after a regular cycle, ``virsh destroy``, and time
   until the VM's metrics leave the disk.

The guest is not waited for: what is timed is libvirt starting QEMU and the
daemon reacting, which is what a guest's first read depends on.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vhostmd import mdisk
from vhostmd.document import parse_document

from daemon_harness import read_disk, wait_for
from qemu_rig import Guest

# Extra cycles a domain change causes run within about a second of it (at most
# one per 0.5 s, per event); a document published this long after the last
# change is a regular cycle's.
QUIET = 2.0
POLL = 0.005  # how often the disk and the channel are looked at (s)


@dataclass
class Round:
    """Seconds, each from just before the virsh command."""

    create: float  # how long virsh create/start itself took (QEMU started and resumed)
    disk: float  # virsh create/start -> the VM's metrics on the disk
    channel: float  # virsh create/start -> the daemon connected to the VM's channel
    destroy: float  # how long virsh destroy itself took (QEMU gone)
    gone: float  # virsh destroy -> the VM's metrics off the disk

    def daemon_share(self) -> dict[str, float]:
        """What the daemon took once virsh returned (libvirt sends the lifecycle
        event before that): disk, channel and gone, less the virsh command's time."""
        return {"disk": self.disk - self.create, "channel": self.channel - self.create,
                "gone": self.gone - self.destroy}


ROWS = (("create", "virsh create (libvirt starting QEMU)"),
        ("disk", "create -> metrics on the disk"),
        ("channel", "create -> channel connected by the daemon"),
        ("destroy", "virsh destroy (libvirt stopping QEMU)"),
        ("gone", "destroy -> metrics off the disk"))


def _document(disk: Path) -> bytes | None:
    try:
        return read_disk(disk, timeout=1.0)
    except (OSError, mdisk.DiskError, ValueError):
        return None


def vm_uuids(disk: Path) -> set[str] | None:
    """UUIDs of the VMs on the disk now (None while no document can be read)."""
    content = _document(disk)
    if content is None:
        return None
    return {m.uuid for m in parse_document(content) if m.context == "vm" and m.uuid}


def after_a_regular_cycle(disk: Path, last_change: float, period: float) -> float:
    """Return just after the first document published :data:`QUIET` s or more after
    ``last_change`` (time.monotonic()); when it was seen."""
    seen = [_document(disk)]

    def fresh() -> bool:
        now = _document(disk)
        if now is None or now == seen[0]:
            return False
        seen[0] = now
        return time.monotonic() - last_change >= QUIET

    wait_for(fresh, QUIET + 2 * period + 10, "a regular cycle's document", interval=POLL)
    return time.monotonic()


def _timed(since: float, predicate: Callable[[], object], timeout: float, what: str) -> float:
    wait_for(predicate, timeout, what, interval=POLL)
    return time.monotonic() - since


def lifecycle_round(guest: Guest, disk: Path, served_by: Callable[[dict[int, str]], bool],
                    last_change: float, period: float, timeout: float) -> tuple[Round, float]:
    """One round (see the module docstring): its times, and when it made its last change.

    ``served_by`` says whether the channel's clients (pid -> command line) are the
    daemon's; ``timeout`` bounds each wait for the daemon.
    """
    after_a_regular_cycle(disk, last_change, period)
    start = time.monotonic()
    guest.start()
    created = time.monotonic() - start

    def on_disk() -> float:
        return _timed(start, lambda: guest.uuid in (vm_uuids(disk) or ()), timeout,
                      f"{guest.name} on the disk")

    def connected() -> float:
        path = guest.channel_path()  # where libvirt put this run's socket
        return _timed(start, lambda: (clients := guest.channel_clients(path)) and served_by(
            clients), timeout, f"the daemon on {guest.name}'s channel")

    with ThreadPoolExecutor(2) as pool:
        disk_wait, channel_wait = pool.submit(on_disk), pool.submit(connected)
        disk_seconds, channel_seconds = disk_wait.result(), channel_wait.result()
    after_a_regular_cycle(disk, time.monotonic(), period)
    stop = time.monotonic()
    guest.destroy()
    destroyed = time.monotonic() - stop
    def off_disk() -> bool:
        uuids = vm_uuids(disk)
        return uuids is not None and guest.uuid not in uuids

    gone = _timed(stop, off_disk, timeout, f"{guest.name} off the disk")
    return Round(created, disk_seconds, channel_seconds, destroyed, gone), time.monotonic()


def table(rounds: list[Round]) -> str:
    """min / median / max of each measure, as a Markdown table."""
    lines = ["| | min | median | max |", "|---|---:|---:|---:|"]
    for key, label in ROWS:
        values = [getattr(r, key) for r in rounds]
        lines.append(f"| {label} | {min(values):.3f} s | {statistics.median(values):.3f} s "
                     f"| {max(values):.3f} s |")
    return "\n".join(lines)
