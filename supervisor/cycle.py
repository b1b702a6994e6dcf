"""One metrics cycle: the jobs it fanned out, what came back, and the rendered result.

A cycle lists the domains, fans out host and VM jobs, gathers results until
it is complete or its deadline passes, then renders once. Metrics keep the
order of the config (host first, then each VM by id), whatever order the
workers finish in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from vhostmd.document import DOCUMENT_CLOSE, DOCUMENT_OPEN, Metric
from vhostmd.logtext import loggable
from vhostmd.workers.jobs import Domain, Failure, Job, JobResult

log = logging.getLogger("vhostmd")


@dataclass
class Rendered:
    """What one cycle publishes: the disk document and the virtio fragments."""

    document: bytes
    host_fragment: bytes
    vm_fragments: dict[int, bytes]
    domains: tuple[Domain, ...]
    published: int
    left_out: int


# Where a job's metrics go in the document: (config line, position in the
# config); unique even when several metrics share one line.
Order = tuple[int, int]


@dataclass
class Cycle:
    number: int
    started: float
    deadline: float
    job_deadline: float = 0.0
    outstanding: dict[int, tuple[Order, Job]] = field(default_factory=dict)
    host: dict[Order, tuple[Metric, ...]] = field(default_factory=dict)
    vms: dict[int, dict[Order, tuple[Metric, ...]]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    domains: tuple[Domain, ...] | None = None
    domains_job: int | None = None
    domains_error: str | None = None
    attempted: set[tuple] = field(default_factory=set)  # failure keys tried this cycle

    def expect(self, order: Order, job: Job) -> None:
        """Register a job whose metrics go to position ``order`` in the document."""
        self.outstanding[job.job_id] = (order, job)

    @property
    def complete(self) -> bool:
        return not self.outstanding and (self.domains is not None or self.domains_error is not None)

    def accept(self, result: JobResult) -> Job | None:
        """Take a worker's result; returns the job it answered (None if not ours)."""
        entry = self.outstanding.pop(result.job_id, None)
        if entry is None:
            return None
        order, job = entry
        if result.job_id == self.domains_job:
            if result.error is not None:
                self.domains_error = result.error
            else:
                self.domains = result.domains or ()
            return job
        self.failures.extend(result.failures)
        if result.error is not None:
            context = "vm" if getattr(job, "domains", None) else "host"
            self.failures.append(Failure(job.describe(), context, None, result.error))
        host: list[Metric] = []
        by_vm: dict[int, list[Metric]] = {}
        for metric in result.metrics:
            if metric.vm_id is None:
                host.append(metric)
            else:
                by_vm.setdefault(metric.vm_id, []).append(metric)
        if host:
            self.host[order] = tuple(host)
        for vm_id, metrics in by_vm.items():
            self.vms.setdefault(vm_id, {})[order] = tuple(metrics)
        return job

    def abandon(self) -> Iterator[Job]:
        """Jobs with no result by the deadline (each becomes a failure)."""
        for _order, job in self.outstanding.values():
            yield job
        self.outstanding.clear()

    def render(self) -> Rendered:
        host_fragment = "".join(m.render() for _, ms in sorted(self.host.items()) for m in ms)
        domains = self.domains or ()
        live = {d.id for d in domains}
        vm_fragments: dict[int, bytes] = {}
        published = sum(len(ms) for ms in self.host.values())
        parts = [DOCUMENT_OPEN, host_fragment]
        for vm_id in sorted(self.vms):
            if vm_id not in live:  # a stale result for a VM that is gone
                continue
            metrics = [m for _, ms in sorted(self.vms[vm_id].items()) for m in ms]
            published += len(metrics)
            text = "".join(m.render() for m in metrics)
            parts.append(text)
            vm_fragments[vm_id] = text.encode()
        parts.append(DOCUMENT_CLOSE)
        return Rendered(
            document="".join(parts).encode(),
            host_fragment=host_fragment.encode(),
            vm_fragments=vm_fragments,
            domains=domains,
            published=published,
            left_out=len(self.failures),
        )


def failure_key(failure: Failure) -> tuple[str, str, int | None, str | None]:
    domain = failure.domain
    return (failure.context, failure.metric, domain.id if domain else None,
            domain.name if domain else None)


# Not a metric: the domain list, without which no VM metric can be collected.
DOMAIN_LIST_FAILURE = Failure("the domain list", "libvirt", None, "")


def domain_list_failure(reason: str) -> Failure:
    return Failure(DOMAIN_LIST_FAILURE.metric, DOMAIN_LIST_FAILURE.context, None,
                   f"{reason}; VM metrics are left out")


def describe_target(context: str, metric: str, vm_id: int | None, name: str | None) -> str:
    if context not in ("host", "vm"):
        return f"{context}: {metric}"
    # Metric names have no spaces; "shell metrics" and "builtin X" are groups of them.
    what = metric if " " in metric else f"{context} metric {metric}"
    if vm_id is None:
        return what
    return f"{what} of domain id {vm_id} ({loggable(name or '')})"


class FailureLog:
    """Logs a failing metric once when it starts failing and once when it recovers."""

    def __init__(self) -> None:
        self.failing: dict[tuple[str, str, int | None, str | None], str] = {}

    def update(self, failures: list[Failure], attempted: set[tuple]) -> None:
        """``attempted``: keys of everything tried this cycle (to notice recoveries)."""
        now: dict[tuple[str, str, int | None, str | None], Failure] = {}
        for failure in failures:
            now.setdefault(failure_key(failure), failure)
        for key, failure in now.items():
            if key not in self.failing:
                log.warning("%s left out: %s", describe_target(*key), failure.reason)
        for key in list(self.failing):
            if key in now:
                continue
            if key in attempted:
                log.info("%s recovered", describe_target(*key))
            del self.failing[key]  # recovered, or its VM is gone
        for key, failure in now.items():
            self.failing[key] = failure.reason
