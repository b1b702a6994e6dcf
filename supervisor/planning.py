"""Cycle planning: which jobs a cycle runs, in which document position. Pure functions.

Nothing here starts a process, reads a clock or talks to a child: given the
config, the collector plans, the domains and a job-id counter, they return
the jobs and register them with the cycle. Tests call them directly.

Which job runs first is ``WorkOrder``'s decision: the domain listing and the
built-ins, then shell actions, the least recently answered first and those
that timed out last time after the others. So when the work does not fit
the period, every VM is refreshed in turn (what one cycle did not reach
goes first in the next), and a few hung actions cannot starve quick ones.

Document order: host metrics first (config order; a <builtin> element sits
where it is in the config), then each VM by domain id with its metrics in
config order. ``Order`` is (config line, position) and is unique per job.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

from vhostmd.supervisor.config import Config
from vhostmd.supervisor.cycle import Cycle, Identity, Order, domain_list_failure
from vhostmd.wire import (
    Collect,
    Domain,
    Failure,
    Job,
    ListDomains,
    MetricDef,
    RunAction,
    is_plain_name,
)
from vhostmd.workers.collectors import CollectorPlan
from vhostmd.workers.collectors import plan as plan_collectors

NewId = Callable[[], int]


def job_ids(start: int = 0) -> Iterator[int]:
    n = start
    while True:
        n += 1
        yield n


def shell_order(metric: MetricDef, index: int) -> Order:
    """Where a shell metric goes in the document (``index``: its place in config.metrics)."""
    return (metric.line, index)


def builtin_order(plan: CollectorPlan, position: int) -> Order:
    # Unique per plan: a host job and the vm job may share a <builtin> line.
    return (plan.order, -1 - position)


@dataclass(frozen=True)
class Layout:
    """What a config publishes at each document position, and where each thing goes.

    A shell metric is its whole definition but its line (name, type, context,
    unit, action, timeout); a built-in job, its collector and metric names.
    Identical definitions are told apart by their rank among each other.
    """

    identity: dict[Order, Identity]
    order: dict[Identity, Order]

    @classmethod
    def of(cls, config: Config, plans: Sequence[CollectorPlan]) -> Layout:
        identity: dict[Order, Identity] = {}
        seen: Counter[MetricDef] = Counter()
        for index, metric in enumerate(config.metrics):
            definition = replace(metric, line=0)
            identity[shell_order(metric, index)] = ("shell", definition, seen[definition])
            seen[definition] += 1
        for position, plan in enumerate(plans):
            identity[builtin_order(plan, position)] = ("builtin", plan.context, plan.collector,
                                                       plan.metric_names)
        return cls(identity, {what: order for order, what in identity.items()})


def count_metrics(config: Config) -> int:
    """The metrics a config names: its shell metrics and the built-ins it selects.

    What ``vhostmd --check`` says and the reload's log line counts.
    """
    return len(config.metrics) + sum(len(p.metric_names) for p in plan_collectors(config.builtins))


def plan_start(cycle: Cycle, config: Config, plans: Sequence[CollectorPlan], new_id: NewId,
               collector_state: dict[tuple[str, str], object],
               listing_pending: bool) -> list[Job]:
    """The jobs a cycle starts with: the domain listing, host actions, host built-ins.

    ``listing_pending``: libvirt has not answered the previous listing yet;
    asking again would only tie up another worker until the hung one is
    replaced, so this cycle goes without VM metrics.
    """
    jobs: list[Job] = []
    cycle.domains_job = new_id()
    if listing_pending:
        cycle.domains_error = "libvirt did not answer the previous domain listing"
        cycle.failures.append(domain_list_failure(cycle.domains_error))
    else:
        listing = ListDomains(cycle.domains_job, cycle.job_deadline,
                              inactive=config.vm_disks_path is not None)
        cycle.expect((-1, -1), listing)
        jobs.append(listing)
    for index, metric in enumerate(config.metrics):
        if metric.context == "host":
            job = RunAction(new_id(), cycle.job_deadline, metric, None, config.exec_path)
            cycle.expect(shell_order(metric, index), job)
            jobs.append(job)
    for position, plan in enumerate(plans):
        if plan.context == "host":
            jobs.append(_collect(cycle, plan, position, None, new_id, collector_state))
    return jobs


def plan_vms(cycle: Cycle, config: Config, plans: Sequence[CollectorPlan], new_id: NewId,
             collector_state: dict[tuple[str, str], object]) -> list[Job]:
    """The jobs for the listed domains: the built-in vm job, then shell actions per VM."""
    if cycle.domains_error is not None:
        return []
    domains = cycle.domains or ()
    jobs: list[Job] = []
    for position, plan in enumerate(plans):
        if plan.context == "vm":  # also with no VMs: it computes host totals too
            jobs.append(_collect(cycle, plan, position, domains, new_id, collector_state))
    vm_metrics = [(i, m) for i, m in enumerate(config.metrics) if m.context == "vm"]
    if not vm_metrics:
        return jobs
    for domain in domains:
        if not is_plain_name(domain.name):
            # One warning per VM (not per metric): its name never reaches a shell.
            cycle.attempted.add(("vm", "shell metrics", domain.id, domain.name))
            cycle.failures.append(Failure(
                "shell metrics", "vm", domain,
                "VM name is not plain ([A-Za-z0-9._+:@-]), so no shell action runs for it"))
            continue
        for index, metric in vm_metrics:
            job = RunAction(new_id(), cycle.job_deadline, metric, domain, config.exec_path)
            cycle.expect(shell_order(metric, index), job)
            jobs.append(job)
    return jobs


def _collect(cycle: Cycle, plan: CollectorPlan, position: int,
             domains: tuple[Domain, ...] | None, new_id: NewId,
             collector_state: dict[tuple[str, str], object]) -> Collect:
    job = Collect(new_id(), cycle.job_deadline, plan.collector, plan.metric_names, domains,
                  collector_state.get((plan.collector, plan.context)))
    cycle.expect(builtin_order(plan, position), job)
    cycle.attempted.add((plan.context, f"builtin {plan.collector}", None, None))
    # Built-ins report failures per metric (and per VM): recoveries are
    # noticed only if those keys count as tried.
    for name in plan.metric_names:
        cycle.attempted.add(("host", name, None, None))
    if domains is not None:
        cycle.attempted.add_vm_builtins(plan.metric_names, domains)
    return job


# A shell job's identity across cycles: (config line, metric name, domain id).
JobKey = tuple[int, str, int | None]


def job_key(job: RunAction) -> JobKey:
    return (job.metric.line, job.metric.name, job.domain.id if job.domain else None)


class WorkOrder:
    """The order workers take jobs in, from what happened to each job before."""

    def __init__(self) -> None:
        self.answered_at: dict[JobKey, float] = {}
        self.timed_out: set[JobKey] = set()

    def rank(self, job: Job, one_worker: bool = False) -> tuple:
        if isinstance(job, ListDomains):
            return (0,)
        if isinstance(job, Collect):
            # One worker does everything in turn: the host built-ins (/proc,
            # no libvirt) go first, so a libvirt call that hangs holds back
            # no host metric. With more workers the listing goes first: the
            # VM jobs wait for it, the host built-ins run beside it.
            return (-1,) if one_worker and job.context == "host" else (1,)
        key = job_key(job)
        return (2, key in self.timed_out, self.answered_at.get(key, -math.inf))

    def sort(self, jobs: Iterable[Job], workers: int = 2) -> list[Job]:
        # stable: config and id order among equals
        return sorted(jobs, key=lambda job: self.rank(job, workers == 1))

    def answered(self, job: RunAction, now: float, timed_out: bool) -> None:
        key = job_key(job)
        self.answered_at[key] = now
        if timed_out:
            self.timed_out.add(key)
        else:
            self.timed_out.discard(key)

    def forget_gone(self, live: set[int]) -> None:
        """Drop what is known about VMs that are gone (keeps memory bounded)."""
        for key in [k for k in self.answered_at if k[2] is not None and k[2] not in live]:
            del self.answered_at[key]
            self.timed_out.discard(key)
