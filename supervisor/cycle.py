"""One metrics cycle: the jobs it fanned out, what came back, and the rendered result.

A cycle lists the domains, fans out host and VM jobs, gathers results until
it is complete or its deadline passes, then renders once. Metrics keep the
order of the config (host first, then each VM by id), whatever order the
workers finish in.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from typing import Any

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
    listed_at: float = 0.0  # when the listing began (time.time())


# Where a job's metrics go in the document: (config line, position in the
# config); unique even when several metrics share one line.
Order = tuple[int, int]
# What a job's metrics are, wherever their config line is: a shell metric's
# definition, or a built-in job's collector and metric names (see
# planning.Layout). A reload keeps the values of what it kept, and only those.
Identity = tuple
# A cycle's rendered metrics: by document position, then by VM id (None: host).
Fragments = dict[Order, dict[int | None, bytes]]
# The same, by what they are: values kept across cycles (and reloads).
Values = dict[Identity, dict[int | None, bytes]]
_METRIC = b"<metric "


class Attempted:
    """The failure keys a cycle tried (so a key that did not fail again has recovered).

    Built-in VM metrics are tried for every listed domain at once: they are
    kept as metric names plus the listed domains, not one key per VM each cycle.
    """

    def __init__(self) -> None:
        self.keys: set[tuple] = set()
        self.vm_builtins: set[str] = set()
        self._domains: tuple[Domain, ...] = ()
        self._listed: set[tuple[int, str]] | None = None

    def add(self, key: tuple) -> None:
        self.keys.add(key)

    def add_vm_builtins(self, names: Iterable[str], domains: tuple[Domain, ...]) -> None:
        self.vm_builtins.update(names)
        self._domains = domains  # the set is built only if a VM key is ever asked about
        self._listed = None

    def __contains__(self, key: object) -> bool:
        if key in self.keys:
            return True
        if not isinstance(key, tuple) or len(key) != 4 or key[0] != "vm":
            return False
        if key[1] not in self.vm_builtins:
            return False
        if self._listed is None:
            self._listed = {(d.id, d.name) for d in self._domains}
        return (key[2], key[3]) in self._listed


@dataclass
class Cycle:
    number: int
    started: float
    deadline: float
    job_deadline: float = 0.0
    outstanding: dict[int, tuple[Order, Job]] = field(default_factory=dict)
    fresh: Fragments = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    domains: tuple[Domain, ...] | None = None
    domains_job: int | None = None
    domains_error: str | None = None
    inactive: tuple[str, ...] | None = None  # defined, not running (ListDomains.inactive)
    listed_at: float = 0.0  # when that listing began (time.time())
    attempted: Attempted = field(default_factory=lambda: Attempted())
    shell_jobs: int = 0  # shell actions planned
    shell_done: int = 0  # ... and answered within this cycle
    # What the config this cycle was planned from puts at each position.
    layout: dict[Order, Identity] = field(default_factory=dict)
    # A reload came while it ran: its values count, but the document it would
    # give is the old config's; the next cycle, planned from the new one, is
    # the first published.
    replanned: bool = False

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
                self.listed_at = result.listed_at
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


def store_fragments(into: dict[Any, dict[int | None, bytes]], key: Order | Identity,
                    result: JobResult) -> None:
    slot = into.setdefault(key, {})
    if result.host:
        slot[None] = result.host
    slot.update(result.vms)  # one dict update for all VMs of a job, not a loop


def by_identity(fragments: Fragments, layout: dict[Order, Identity]) -> Values:
    """A cycle's fragments keyed by what they are (``layout``: the config it was planned from)."""
    return {layout[order]: slot for order, slot in fragments.items() if order in layout}


class LatestValues:
    """Each fragment's latest version, carried into documents while it is young.

    A metric not refreshed in a cycle (its job not reached, still running, or
    failed) keeps its last value in the document for at most ``max_age``
    seconds; a VM that is gone takes its values with it, and a metric that
    left the config (a reload) takes its own. Kept by what the metrics are
    (``Identity``), never by their place in a config: a reload that moves a
    metric to another line keeps its value, one that changes its action or
    removes it drops the old value at once.
    """

    def __init__(self) -> None:
        self.fragments: Values = {}
        self.stamps: dict[Identity, dict[int | None, float]] = {}

    def store(self, fresh: Values, now: float) -> None:
        for identity, slot in fresh.items():
            self.fragments.setdefault(identity, {}).update(slot)
            self.stamps.setdefault(identity, {}).update(dict.fromkeys(slot, now))

    def fill(self, fresh: Values, live: set[int] | None, now: float, max_age: float,
             wanted: Container[Identity]) -> int:
        """Add the young fragments ``fresh`` lacks; forget the old ones. How many added.

        ``live``: the running VMs' ids, or None when libvirt could not list
        them (then no VM is published, and none is forgotten). ``wanted``:
        what the config running now publishes; the rest is forgotten.
        """
        for identity in [i for i in self.fragments if i not in wanted]:
            del self.fragments[identity]
            del self.stamps[identity]
        carried = 0
        for identity, kept in self.fragments.items():
            stamps = self.stamps[identity]
            forget = [k for k, stamp in stamps.items() if now - stamp > max_age]
            if live is not None:
                forget += [k for k in kept.keys() - live if k is not None]
            for key in forget:
                kept.pop(key, None)
                stamps.pop(key, None)
            slot = fresh.setdefault(identity, {})
            for key in kept.keys() - slot.keys():
                if key is not None and live is None:
                    continue
                slot[key] = kept[key]
                carried += 1
        return carried


def render(fragments: Fragments, domains: tuple[Domain, ...], capacity: int | None,
           failures: int = 0, carried: int = 0) -> Rendered:
    """Join the fragments in document order (the workers rendered them).

    ``capacity``: the most document bytes the disk holds (None: no disk). A
    document that does not fit keeps the host metrics and as many whole VMs
    as fit, lowest domain ids first; virtio still serves every VM.
    """
    slots = [fragments[order] for order in sorted(fragments)]
    host = b"".join(slot[None] for slot in slots if None in slot)
    live = {d.id for d in domains}
    vm_slots = [slot for slot in slots if len(slot) > (None in slot)]
    vm_fragments: dict[int, bytes] = {}
    if len(vm_slots) == 1:  # the common case: one job (the built-ins) for every VM
        only = vm_slots[0]
        vm_fragments = {vm_id: only[vm_id] for vm_id in sorted(live & only.keys())}
    else:
        for vm_id in sorted(live):  # VMs not listed this cycle are gone: never published
            parts = [slot[vm_id] for slot in vm_slots if vm_id in slot]
            if parts:
                vm_fragments[vm_id] = b"".join(parts)
    document = assemble([host, *vm_fragments.values()])
    # One pass over the whole document (values are escaped: no "<metric " in them).
    published = document.count(_METRIC)
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
