"""One metrics cycle: the jobs it fanned out, what came back, and the rendered result.

A cycle lists the domains, fans out host and VM jobs, gathers results until
it is complete or its deadline passes, then renders once. Metrics keep the
order of the config (host first, then each VM by id), whatever order the
workers finish in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from vhostmd.document import assemble
from vhostmd.logtext import loggable
from vhostmd.wire import Domain, Failure, Job, JobResult, RunAction

log = logging.getLogger("vhostmd")


@dataclass
class Rendered:
    """What one cycle publishes: the disk document and the virtio fragments."""

    document: bytes
    host_fragment: bytes
    vm_fragments: dict[int, bytes]
    domains: tuple[Domain, ...]
    published: int  # metrics in the fragments (virtio serves them all)
    left_out: int  # failures this cycle
    carried: int = 0  # fragments kept from an earlier cycle (not refreshed in this one)
    vms_not_on_disk: int = 0  # VMs that did not fit the disk
    # UUIDs of the defined domains not running (per-VM disks); None: not listed.
    inactive: tuple[str, ...] | None = None


# Where a job's metrics go in the document: (config line, position in the
# config); unique even when several metrics share one line.
Order = tuple[int, int]
# One fragment's place: its order, and the VM it belongs to (None: host).
Place = tuple[Order, int | None]
_METRIC = b"<metric "


class Attempted:
    """The failure keys a cycle tried (so a key that did not fail again has recovered).

    Built-in VM metrics are tried for every listed domain at once: they are
    kept as metric names plus the listed domains, not one key per VM each cycle.
    """

    def __init__(self) -> None:
        self.keys: set[tuple] = set()
        self.vm_builtins: set[str] = set()
        self.domains: set[tuple[int, str]] = set()

    def add(self, key: tuple) -> None:
        self.keys.add(key)

    def add_vm_builtins(self, names: Iterable[str], domains: Iterable[Domain]) -> None:
        self.vm_builtins.update(names)
        self.domains.update((d.id, d.name) for d in domains)

    def __contains__(self, key: object) -> bool:
        if key in self.keys:
            return True
        if not isinstance(key, tuple) or len(key) != 4 or key[0] != "vm":
            return False
        return key[1] in self.vm_builtins and (key[2], key[3]) in self.domains


@dataclass
class Cycle:
    number: int
    started: float
    deadline: float
    job_deadline: float = 0.0
    outstanding: dict[int, tuple[Order, Job]] = field(default_factory=dict)
    fresh: dict[Place, bytes] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    domains: tuple[Domain, ...] | None = None
    domains_job: int | None = None
    domains_error: str | None = None
    inactive: tuple[str, ...] | None = None  # defined, not running (ListDomains.inactive)
    attempted: Attempted = field(default_factory=lambda: Attempted())
    shell_jobs: int = 0  # shell actions planned
    shell_done: int = 0  # ... and answered within this cycle

    def expect(self, order: Order, job: Job) -> None:
        """Register a job whose metrics go to position ``order`` in the document."""
        self.outstanding[job.job_id] = (order, job)
        if isinstance(job, RunAction):
            self.shell_jobs += 1

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
                self.inactive = result.inactive
            return job
        if isinstance(job, RunAction):
            self.shell_done += 1
            domain = job.domain
            self.attempted.add((job.context, job.metric.name, domain.id if domain else None,
                                domain.name if domain else None))
        self.failures.extend(result.failures)
        if result.error is not None:
            self.failures.append(Failure(job.describe(), job.context, None, result.error))
        store_fragments(self.fresh, order, result)
        return job

    def abandon(self) -> list[Job]:
        """Jobs with no result by the deadline."""
        jobs = [job for _order, job in self.outstanding.values()]
        self.outstanding.clear()
        return jobs


def store_fragments(into: dict[Place, bytes], order: Order, result: JobResult) -> None:
    if result.host:
        into[(order, None)] = result.host
    for vm_id, fragment in result.vms:
        into[(order, vm_id)] = fragment


class LatestValues:
    """Each fragment's latest version, carried into documents while it is young.

    A metric not refreshed in a cycle (its job not reached, still running, or
    failed) keeps its last value in the document for at most ``max_age``
    seconds; a VM that is gone takes its values with it.
    """

    def __init__(self) -> None:
        self.entries: dict[Place, tuple[bytes, float]] = {}

    def store(self, fragments: dict[Place, bytes], now: float) -> None:
        for place, fragment in fragments.items():
            self.entries[place] = (fragment, now)

    def fill(self, fragments: dict[Place, bytes], live: set[int] | None, now: float,
             max_age: float) -> int:
        """Add the young fragments ``fragments`` lacks; forget the old ones. How many added.

        ``live``: the running VMs' ids, or None when libvirt could not list
        them (then no VM is published, and none is forgotten).
        """
        carried = 0
        for place, (fragment, stamp) in list(self.entries.items()):
            vm_id = place[1]
            if vm_id is not None and live is None:
                continue
            gone = vm_id is not None and live is not None and vm_id not in live
            if gone or now - stamp > max_age:
                del self.entries[place]
            elif place not in fragments:
                fragments[place] = fragment
                carried += 1
        return carried


def render(fragments: dict[Place, bytes], domains: tuple[Domain, ...], capacity: int | None,
           failures: int = 0, carried: int = 0) -> Rendered:
    """Join the fragments in document order (the workers rendered them).

    ``capacity``: the most document bytes the disk holds (None: no disk). A
    document that does not fit keeps the host metrics and as many whole VMs
    as fit, lowest domain ids first; virtio still serves every VM.
    """
    live = {d.id for d in domains}
    host_parts: list[tuple[Order, bytes]] = []
    by_vm: dict[int, list[tuple[Order, bytes]]] = {}
    for (order, vm_id), fragment in fragments.items():
        if vm_id is None:
            host_parts.append((order, fragment))
        elif vm_id in live:  # else a late result for a VM that is gone
            by_vm.setdefault(vm_id, []).append((order, fragment))
    host = b"".join(f for _, f in sorted(host_parts))
    vm_fragments = {vm_id: b"".join(f for _, f in sorted(by_vm[vm_id])) for vm_id in sorted(by_vm)}
    published = host.count(_METRIC) + sum(f.count(_METRIC) for f in vm_fragments.values())
    document = assemble([host, *vm_fragments.values()])
    not_on_disk = 0
    if capacity is not None and len(document) > capacity:
        room = capacity - (len(document) - sum(map(len, vm_fragments.values())))
        parts = [host]
        for fragment in vm_fragments.values():
            if len(fragment) > room:
                break
            parts.append(fragment)
            room -= len(fragment)
        not_on_disk = len(vm_fragments) - (len(parts) - 1)
        document = assemble(parts)
    return Rendered(document, host, vm_fragments, domains, published, failures, carried,
                    not_on_disk)


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
    return f"{what} of domain id {vm_id} ({loggable(name or '')})"


class FailureLog:
    """Logs a failing metric once when it starts failing and once when it recovers."""

    def __init__(self) -> None:
        self.failing: dict[tuple[str, str, int | None, str | None], str] = {}

    def update(self, failures: list[Failure], attempted: Attempted) -> None:
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
