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

from vhostmd.document import assemble
from vhostmd.wire import Domain, Failure, Job, JobResult

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
    host: dict[Order, bytes] = field(default_factory=dict)
    vms: dict[int, dict[Order, bytes]] = field(default_factory=dict)
    published: int = 0
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
            self.failures.append(Failure(job.describe(), job.context, None, result.error))
        if result.host:
            self.host[order] = result.host
        for vm_id, fragment in result.vms:
            self.vms.setdefault(vm_id, {})[order] = fragment
        self.published += result.count
        return job

    def abandon(self) -> Iterator[Job]:
        """Jobs with no result by the deadline (each becomes a failure)."""
        for _order, job in self.outstanding.values():
            yield job
        self.outstanding.clear()

    def render(self) -> Rendered:
        """Join the fragments in document order (the workers rendered them)."""
        host_fragment = b"".join(fragment for _, fragment in sorted(self.host.items()))
        domains = self.domains or ()
        live = {d.id for d in domains}
        vm_fragments: dict[int, bytes] = {}
        for vm_id in sorted(self.vms):
            if vm_id in live:  # else a stale result for a VM that is gone
                vm_fragments[vm_id] = b"".join(f for _, f in sorted(self.vms[vm_id].items()))
        return Rendered(
            document=assemble([host_fragment, *vm_fragments.values()]),
            host_fragment=host_fragment,
            vm_fragments=vm_fragments,
            domains=domains,
            published=self.published,
            left_out=len(self.failures),
        )


class CycleClock:
    """When cycles start: drift-free, the k-th at base + k x period.

    A cycle that overran its period re-anchors the clock at its end (the next
    one starts at once) instead of starting a burst of late cycles.
    """

    def __init__(self, period: int, now: float) -> None:
        self.period = period
        self.reanchor(now)

    def reanchor(self, start: float) -> None:
        self.base = start
        self.k = 0
        self.next = start

    def advance(self, now: float) -> float:
        """A cycle ended at ``now``: schedule the next; return how late it is (0: on time)."""
        self.k += 1
        self.next = self.base + self.k * self.period
        late = now - self.next
        if late > 0:
            self.reanchor(now)
            return late
        return 0.0


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
    return f"{what} of domain id {vm_id} ({name!r})"


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
