"""How big the document gets: does the configured disk hold N running VMs?
And does each per-VM disk (<vm_disks>) hold the host metrics and its VM's?

Guests read the disk in whole 64 KiB blocks, so only those count
(``mdisk.document_capacity``), and a size suggested is a whole number of them.

The estimate renders one host part and one VM part with the exact layout
(``vhostmd.document``) and values as wide as their type allows: 20 digits
for 64-bit integers, 10 for 32-bit ones, seconds with six decimals for
reals; a shell metric's string (or xml) value is taken as ``STRING_WIDTH``
characters, since only the action knows. VM ids are taken as 5 digits.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhostmd.document import assemble, render_metric, vm_attributes
from vhostmd.mdisk import BLOCK_SIZE, HEADER_SIZE, document_capacity
from vhostmd.supervisor.config import Config
from vhostmd.workers.collectors import BY_KIND
from vhostmd.workers.collectors import plan as plan_collectors

STRING_WIDTH = 32
_WIDTHS = {"int32": 11, "uint32": 10, "int64": 20, "uint64": 20,
           "real32": 17, "real64": 17, "string": STRING_WIDTH, "xml": STRING_WIDTH}
_UUID = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class SizeEstimate:
    host: int  # bytes of the host part
    per_vm: int  # bytes each running VM adds
    capacity: int  # bytes the disk holds for the document

    def total(self, vms: int) -> int:
        return len(assemble([])) + self.host + vms * self.per_vm

    def vms_that_fit(self) -> int:
        room = self.capacity - len(assemble([])) - self.host
        return max(0, room // self.per_vm) if self.per_vm else 0


def estimate(config: Config) -> SizeEstimate:
    host: list[str] = []
    vm: list[str] = []
    attrs = vm_attributes(99999, _UUID)

    def add(name: str, mtype: str, context: str, unit: str | None) -> None:
        value = "9" * _WIDTHS.get(mtype, STRING_WIDTH)
        if context == "host":
            host.append(render_metric(name, mtype, "host", value, unit))
        else:
            vm.append(render_metric(name, mtype, "vm", value, unit, attrs))

    for metric in config.metrics:
        if metric.type == "group":
            for variable in metric.variables:
                add(variable.name, variable.type, metric.context, None)
        else:
            add(metric.name, "string" if metric.type == "xml" else metric.type,
                metric.context, metric.unit)
    for plan in plan_collectors(config.builtins):
        for name in plan.metric_names:
            spec = BY_KIND[plan.context][name][1]
            add(spec.name, spec.type, spec.context, spec.unit)
    return SizeEstimate(len("".join(host).encode()), len("".join(vm).encode()),
                        document_capacity(config.disk_size))


def size_needed_k(total: int) -> int:
    """The smallest disk size (KiB, whole 64 KiB blocks) a ``total``-byte document fits."""
    blocks = -(-(total + HEADER_SIZE) // BLOCK_SIZE)
    return blocks * BLOCK_SIZE // 1024


def _partial(size: int) -> str:
    """What a --check line adds about a disk not made of whole 64 KiB blocks."""
    whole = document_capacity(size) + HEADER_SIZE
    return "" if whole == size else f" (guests read only its first {whole:,} bytes)"


def check_vms(config: Config, vms: int) -> tuple[bool, str]:
    """Whether the configured disk holds ``vms`` running VMs, and one line saying so."""
    size = estimate(config)
    total = size.total(vms)
    disk = f"the {config.disk_size:,}-byte disk{_partial(config.disk_size)}"
    detail = (f"about {total:,} bytes for {vms} VMs (host {size.host:,} + {size.per_vm:,} "
              f"per VM, string values taken as {STRING_WIDTH} characters)")
    if total <= size.capacity:
        return True, f"{disk} holds {vms} VMs: {detail}; room for about {size.vms_that_fit()} VMs"
    return False, (f"{disk} does NOT hold {vms} VMs: {detail}; it holds about "
                   f"{size.vms_that_fit()} VMs; use <size unit=\"k\">{size_needed_k(total)}"
                   "</size> or more")


def check_vm_disks(config: Config) -> tuple[bool, str]:
    """Whether each per-VM disk holds the host metrics and one VM's, and one line saying so."""
    size = estimate(config)
    total = size.total(1)
    disk = f"each {config.vm_disks_size:,}-byte per-VM disk{_partial(config.vm_disks_size)}"
    detail = (f"about {total:,} bytes (host {size.host:,} + its VM {size.per_vm:,}, string "
              f"values taken as {STRING_WIDTH} characters)")
    if total <= document_capacity(config.vm_disks_size):
        return True, f"{disk} holds {detail}"
    return False, (f"{disk} does NOT hold {detail}; "
                   f"use <vm_disks><size unit=\"k\">{size_needed_k(total)}</size> or more")
