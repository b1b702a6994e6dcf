"""The disk-writer process: owns the mappings of the shared disk and the per-VM disks.

Each document the supervisor sends is written with the busy/msync protocol of
``vhostmd.disk.mapped`` and acknowledged, so the supervisor sends the next.
"""

from __future__ import annotations

import logging

from vhostmd.disk.handle import DiskHandle, DiskRefused
from vhostmd.disk.mapped import DiskShrunk, DiskTooSmall, MetricsDisk
from vhostmd.disk.vmdir import VmDir
from vhostmd.disk.vmwriter import VmDisks
from vhostmd.runtime.child import ChildContext, serve
from vhostmd.runtime.published import Placement, SharedSlots

log = logging.getLogger("vhostmd")

__all__ = ["DiskShrunk", "DiskTooSmall", "MetricsDisk", "disk_writer_main"]


def disk_writer_main(ctx: ChildContext, handle: DiskHandle | None,
                     vm_dir: VmDir | None = None, *, slots: SharedSlots) -> None:
    """Child main: write each document the supervisor sends, acknowledge each.

    A message is ``(seq, placement, vms)``: where the shared disk's document
    is in ``slots`` (see runtime/published.py), and for per-VM disks
    (``vm_dir``) ``(host fragment, {uuid: VM fragment}, UUIDs of the defined
    domains not running, or None, when the listing began)``; see
    disk/vmwriter.py.
    """
    path = handle.path if handle is not None else f"{vm_dir.path}/" if vm_dir else "?"
    ctx.title(f"disk-writer {path}")
    disk: MetricsDisk | None = None
    vm_disks = None
    try:
        if handle is not None:
            disk = MetricsDisk(handle)
        if vm_dir is not None:

            vm_disks = VmDisks(vm_dir)
    except DiskRefused as exc:
        ctx.send(("disk-failed", str(exc)))
        raise SystemExit(1) from None
    except OSError as exc:
        ctx.send(("disk-failed", f"cannot map metrics disk {path}: {exc.strerror or exc}"))
        raise SystemExit(1) from None
    ctx.send(("disk-ready", path))
    idle = f"disk-writer {path}"
    vm_error: list[str] = []

    def write_vms(vms: tuple) -> None:
        assert vm_disks is not None
        try:
            vm_disks.publish(*vms)
        except OSError as exc:  # the directory itself (each file's problems are logged)
            if vm_error != [str(exc)]:
                log.error("VM disk directory %s: %s", vm_disks.dir.path, exc)
            vm_error[:] = [str(exc)]
        else:
            vm_error.clear()

    def write_one(message: tuple[int, Placement, tuple | None]) -> None:
        seq, placement, vms = message
        # A copy out of the slot at once: the supervisor may reuse it after our ack.
        content = slots.read(placement, 0, placement.document_end)
        ctx.title(f"{idle} writing")
        ack: tuple = ("disk-written", seq, None, None)
        if disk is not None:
            try:
                disk.write(content)
            except DiskTooSmall as exc:
                ack = ("disk-written", seq, "too-large", str(exc))
            except DiskShrunk as exc:
                ack = ("disk-written", seq, "truncated", str(exc))
            except OSError as exc:
                ack = ("disk-written", seq, f"os-error {exc.errno}", str(exc))
        if vm_disks is not None and vms is not None:
            write_vms(vms)
        ctx.send(ack)

    serve(ctx, write_one, idle)
