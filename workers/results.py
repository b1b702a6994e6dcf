"""A job's metrics, rendered where they are produced.

Workers send the supervisor bytes in the document's exact layout (one
fragment for the host, one per VM) instead of one object per metric: the
supervisor then only joins them, and nothing is pickled per value.
"""

from __future__ import annotations

from vhostmd.document import Metric, render_metric, vm_attributes
from vhostmd.wire import Domain, Failure, JobResult


class FragmentBuilder:
    """Collects rendered metrics of one job, host and per VM, in document order."""

    def __init__(self) -> None:
        self.host: list[str] = []
        self.vms: dict[int, tuple[str, list[str]]] = {}  # id -> (id/uuid attributes, parts)

    def add_host(self, name: str, mtype: str, value: str, unit: str | None) -> None:
        self.host.append(render_metric(name, mtype, "host", value, unit))

    def add_vm(self, domain: Domain, name: str, mtype: str, value: str,
               unit: str | None) -> None:
        entry = self.vms.get(domain.id)
        if entry is None:
            entry = self.vms[domain.id] = (vm_attributes(domain.id, domain.uuid), [])
        entry[1].append(render_metric(name, mtype, "vm", value, unit, entry[0]))

    def add_vm_rendered(self, domain: Domain, text: str) -> None:
        """All of one VM's metrics of this job, already rendered."""
        entry = self.vms.get(domain.id)
        if entry is None:
            entry = self.vms[domain.id] = ("", [])
        entry[1].append(text)

    def add(self, metric: Metric) -> None:
        if metric.vm_id is None:
            self.host.append(metric.render())
        else:
            self.vms.setdefault(metric.vm_id, ("", []))[1].append(metric.render())

    def result(self, job_id: int, failures: tuple[Failure, ...] = (),
               state: object = None) -> JobResult:
        return JobResult(
            job_id,
            host="".join(self.host).encode(),
            vms=tuple([(vm_id, "".join(parts).encode())  # a list builds faster than a generator
                       for vm_id, (_attrs, parts) in sorted(self.vms.items())]),
            failures=failures,
            state=state,
        )
