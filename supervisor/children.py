"""Which children a configuration wants, and how closely they are watched.

Each child has a seat: a number that says what it is and that its
replacement takes over (its restarts and crash-loop back-off are counted per
seat). Workers take 0..workers-1; the disk-writer, the virtio process and the
events process have fixed seats after the largest worker pool.
"""

from __future__ import annotations

from vhostmd.disk.handle import DiskHandle
from vhostmd.disk.vmdir import VmDir
from vhostmd.runtime.published import SharedSlots
from vhostmd.supervisor.config import MAX_WORKERS, Config
from vhostmd.supervisor.pool import ChildSpec

DISK_SEAT = MAX_WORKERS
VIRTIO_SEAT = MAX_WORKERS + 1
EVENTS_SEAT = MAX_WORKERS + 2


def hang_timeout(period: int) -> float:
    """A child whose heartbeat is older than this is hung."""
    return min(max(1.0, 1.5 * period), 30.0)


def beat_interval(period: int) -> float:
    # Several beats per hang timeout, but no more than needed: every wake-up
    # of an idle daemon costs CPU on a host that runs VMs.
    return min(1.0, max(0.25, hang_timeout(period) / 6))


def events_unavailable(uri: str | None) -> str | None:
    """Why an events child could never hear of a change with ``uri`` (None: it can).

    libvirt's test driver opened in-process (``test:///...``, no transport)
    keeps its domains per connection: another process's connection, the
    events child's included, never sees them start or stop. The child would
    only hold a second copy of every domain (17 MiB at 1000 VMs) for nothing.
    Through a libvirtd (``test+unix://``) the driver's state is shared, and
    events work.
    """
    if uri is not None and uri.lower().startswith("test:///"):
        return ("libvirt's in-process test driver (test:///) has no events across "
                "connections; VMs are found by the listing each cycle")
    return None


def wanted_children(config: Config, uri: str | None, disk: DiskHandle | None = None,
                    vm_dir: VmDir | None = None,
                    slots: SharedSlots | None = None) -> dict[int, ChildSpec]:
    """What should run for ``config``: the workers, the disk-writer, the virtio process,
    and the events process (libvirt lifecycle events, see ``vhostmd.workers.events``;
    not where it could never hear one, see ``events_unavailable``).

    The disk-writer maps ``disk`` and the per-VM disks in ``vm_dir``, which the
    supervisor opened and locked; it is the only child that gets their descriptors.
    The disk-writer and virtio map ``slots``, where each cycle's result is.
    """
    specs = {
        i: ChildSpec(f"worker {i + 1}", i, "vhostmd.workers.worker:worker_main",
                     {"index": i + 1, "uri": uri}, ("worker",), result_region=True)
        for i in range(config.workers)
    }
    shared = disk if config.vbd else None
    vms = vm_dir if config.vm_disks_path is not None else None
    if shared is not None or vms is not None:
        key: tuple = ("disk",)
        if shared is not None:
            key += (shared.path, shared.size, shared.fd)
        if vms is not None:
            key += ("vms", vms.path, vms.size, vms.fd)
        specs[DISK_SEAT] = ChildSpec(
            "disk-writer", DISK_SEAT, "vhostmd.disk.writer:disk_writer_main",
            {"handle": shared, "vm_dir": vms, "slots": slots}, key)
    if config.virtio:
        specs[VIRTIO_SEAT] = ChildSpec(
            "virtio", VIRTIO_SEAT, "vhostmd.virtio.manager:virtio_main",
            {"channel_paths": config.channel_paths, "max_channels": config.max_channels,
             "expiration_time": config.expiration_time, "slots": slots},
            ("virtio", config.channel_paths, config.max_channels, config.expiration_time))
    if events_unavailable(uri) is not None:
        return specs
    specs[EVENTS_SEAT] = ChildSpec("events", EVENTS_SEAT, "vhostmd.workers.events:events_main",
                                   {"uri": uri}, ("events", uri))
    return specs
