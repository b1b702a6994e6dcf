"""Running cycles: plan, hand jobs to idle workers, gather, render, publish.

The arbiter's main loop calls ``step`` (start a cycle when the clock says so,
dispatch, finish a complete or overdue cycle) and routes the workers'
results and losses here. Which jobs a cycle has is ``planning``'s decision,
their order ``WorkOrder``'s; the document is ``cycle.render``'s; sending it
is the ``Publisher``'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from vhostmd.mdisk import document_capacity
from vhostmd.runtime.child import IdleTrim
from vhostmd.supervisor import planning
from vhostmd.supervisor.config import Config
from vhostmd.supervisor.cycle import (
    DOMAIN_LIST_FAILURE,
    Cycle,
    CycleClock,
    FailureLog,
    Identity,
    LatestValues,
    Rendered,
    by_identity,
    failure_key,
    render,
    store_fragments,
)
from vhostmd.supervisor.cycle import domain_list_failure as list_failure
from vhostmd.supervisor.instant import InstantCycles
from vhostmd.supervisor.pool import Child, ChildPool
from vhostmd.supervisor.publisher import Publisher
from vhostmd.wire import Collect, Failure, Job, JobResult, ListDomains, RunAction, needs_libvirt
from vhostmd.workers.collectors import CollectorPlan
from vhostmd.workers.collectors import plan as plan_collectors

log = logging.getLogger("vhostmd")


def default_action_timeout(period: int) -> float:
    """How long a shell action without its own timeout= may run: half a period, 1..30 s.

    Shorter than the cycle (0.8 x period), so hung actions cannot hold every
    worker through a whole cycle; an action may still outlive its cycle, and
    its value then goes into the next document.
    """
    return min(30.0, max(1.0, 0.5 * period))


def max_value_age(period: int, refresh: float = 0.0) -> float:
    """How long a metric not refreshed in a cycle keeps its last value.

    12 periods and at least 60 s; when shell actions need more than a period,
    at least two of their rounds (``refresh``: about how long one round over
    every VM takes), so a VM keeps its values until its turn comes again;
    never more than an hour.
    """
    return min(3600.0, max(60.0, 12.0 * period, 2.0 * refresh))


def refresh_interval(period: int, cycle: Cycle) -> float:
    """About how often each shell action runs when not all of them fit in a cycle."""
    return period * cycle.shell_jobs / max(1, cycle.shell_done)


class CycleRunner:
    """One cycle at a time, and the work that outlives it (late results, kept values)."""

    def __init__(self, config: Callable[[], Config], pool: ChildPool, publisher: Publisher,
                 clock: Callable[[], float], on_cycle_end: Callable[[], None]) -> None:
        self.config = config
        self.pool = pool
        self.publisher = publisher
        self.clock = clock
        self.on_cycle_end = on_cycle_end
        self.failures = FailureLog()
        self.cycle: Cycle | None = None
        self.cycle_number = 0
        self.new_job_id = planning.job_ids().__next__
        self.pending: list[Job] = []  # planned, not handed to a worker yet (in order)
        # Handed to a worker, no result yet: with what its metrics are (None: the listing).
        self.inflight: dict[int, tuple[Identity | None, Job]] = {}
        self.work_order = planning.WorkOrder()
        self.trim = IdleTrim(clock)  # freed heap back between cycles of a long period
        # The last listing job and the child it went to (see Collect.domains_from).
        self.listed_by: tuple[int, object] = (0, None)
        self.latest = LatestValues()
        self.disk_short = 0  # VMs left out of the disk last cycle (logged once per episode)
        self.behind = False  # shell work exceeds the period (logged once per episode)
        self.collector_state: dict[tuple[str, str], object] = {}
        self._plans: list[CollectorPlan] = []
        self._plans_for: Config | None = None
        self._layout = planning.Layout({}, {})
        self._layout_for: Config | None = None
        self.cycle_clock = CycleClock(config().update_period, clock())
        self.instant = InstantCycles()  # extra cycles on libvirt lifecycle events
        self.last_cycle_wall = 0.0
        self.refresh = 0.0  # about how long a round of every shell action takes (smoothed)
        self.stats: dict[str, float] = {
            "cycles": 0, "last_cycle_seconds": 0.0, "published": 0, "left_out": 0,
            "carried": 0, "vms_not_on_disk": 0, "shell_jobs": 0, "shell_done": 0}

    @property
    def next_wakeup(self) -> float:
        if self.cycle is not None:
            return self.cycle.deadline
        return self.instant.wake(self.cycle_clock.next)

    def step(self) -> None:
        now = self.clock()
        if self.cycle is None and now >= self.cycle_clock.next:
            self.start_cycle(now)
        elif self.cycle is None and self.instant.due(now, self.cycle_clock.next):
            self.start_cycle(now, extra=True)
        self.dispatch()
        if self.cycle is not None and (self.cycle.complete or now >= self.cycle.deadline):
            self.finish_cycle()
        if self.cycle is None:
            self.trim.poll()  # late by at most a beat interval: the loop wakes that often

    def drop_cycle(self, restart_at: float) -> None:
        """After an internal error: no cycle, nothing pending, the next at ``restart_at``."""
        self.cycle = None
        self.pending.clear()
        self.cycle_clock.reanchor(restart_at)

    def reconfigured(self, now: float) -> None:
        """A reload: the next document published is the new config's, and soon.

        A cycle under way was planned from the old config: it runs to its
        end (its listing and values still count) but publishes nothing, and
        the next cycle starts as soon as it ends; otherwise one starts now.
        """
        self.cycle_clock.period = self.config().update_period
        if self.cycle is not None:
            self.cycle.replanned = True
        else:
            self.cycle_clock.reanchor(now)

    def handle_result(self, result: JobResult) -> None:
        entry = self.inflight.pop(result.job_id, None)
        if entry is None:
            return
        identity, job = entry
        now = self.clock()
        if isinstance(job, RunAction):
            self.work_order.answered(job, now, result.timed_out)
        if result.state is not None and isinstance(job, Collect):
            self.collector_state[(job.collector, job.context)] = result.state
        cycle = self.cycle
        if cycle is not None and cycle.accept(result) is not None:
            if isinstance(job, ListDomains):
                self.plan_vms(cycle)
            return
        # A result after its cycle ended (an action may outlive a cycle): its
        # values go into the next document (if the config still has them),
        # its failures into this cycle's log.
        if identity is not None:
            fresh: dict = {}
            store_fragments(fresh, identity, result)
            self.latest.store(fresh, now)
        if cycle is not None:
            cycle.failures.extend(result.failures)
            if isinstance(job, RunAction):
                domain = job.domain
                cycle.attempted.add((job.context, job.metric.name,
                                     domain.id if domain else None,
                                     domain.name if domain else None))

    def plan_vms(self, cycle: Cycle) -> None:
        if cycle.domains_error is not None:
            cycle.failures.append(list_failure(cycle.domains_error))
            return
        self.work_order.forget_gone({d.id for d in cycle.domains or ()})
        jobs = planning.plan_vms(cycle, self.config(), self.collector_plans(), self.new_job_id,
                                 self.collector_state)
        self.pending = self.work_order.sort([*self.pending, *jobs], self.config().workers)

    def on_lost(self, child: Child, why: str) -> None:
        job = child.busy_with
        child.busy_with = None
        if job is None:
            return
        # Its result will never come: count it as failed (and slow) now.
        reason = f"{child.role} {why}"
        if isinstance(job, RunAction):
            failure = Failure(job.metric.name, job.metric.context, job.domain, reason)
            self.handle_result(JobResult(job.job_id, failures=(failure,), timed_out=True))
        else:
            self.handle_result(JobResult(job.job_id, error=reason, timed_out=True))

    def collector_plans(self) -> list[CollectorPlan]:
        config = self.config()
        if self._plans_for is not config:
            self._plans = plan_collectors(config.builtins)
            self._plans_for = config
        return self._plans

    def layout(self) -> planning.Layout:
        """What the config running now publishes, and where (rebuilt after a reload)."""
        config = self.config()
        if self._layout_for is not config:
            self._layout = planning.Layout.of(config, self.collector_plans())
            self._layout_for = config
        return self._layout

    def start_cycle(self, now: float, extra: bool = False) -> None:
        period = self.config().update_period
        self.cycle_number += 1
        deadline = now + max(0.5, 0.8 * period)
        if extra:  # asked for by a libvirt event: ends by the next regular start
            deadline = self.instant.deadline(deadline, self.cycle_clock.next)
        self.instant.started(self.cycle_number, now, extra)
        cycle = Cycle(self.cycle_number, now, deadline, layout=self.layout().identity)
        # Jobs end a little before the cycle does, so a timed-out job is
        # reported as such instead of as a missing result.
        cycle.job_deadline = deadline - max(0.05, min(0.25, 0.05 * period))
        cycle.attempted.add(failure_key(DOMAIN_LIST_FAILURE))
        self.cycle = cycle
        listing_pending = any(isinstance(job, ListDomains) for _o, job in self.inflight.values())
        jobs = planning.plan_start(cycle, self.config(), self.collector_plans(), self.new_job_id,
                                   self.collector_state, listing_pending)
        self.pending = self.work_order.sort(jobs, self.config().workers)

    def dispatch(self) -> None:
        """Hand pending jobs to idle workers, one job per worker at a time.

        libvirt jobs prefer the lowest worker seats and the others the highest,
        so the domain listing and the bulk VM stats of a cycle usually meet the
        same worker and its open connection. With more than one worker, shell
        actions never take the first: a cycle's listing and built-ins always
        find it free, however long actions run.
        """
        cycle = self.cycle
        if not self.pending or cycle is None:
            return
        idle = [seat for seat in range(self.config().workers)
                if (c := self.pool.get(seat)) is not None and c.busy_with is None]
        action_timeout = default_action_timeout(self.config().update_period)
        while idle and self.pending:
            job = self.pending[0]
            if needs_libvirt(job):
                seat = idle[0]
            elif isinstance(job, RunAction) and self.config().workers > 1 and idle[-1] == 0:
                break  # only the first worker is free: keep it for libvirt and built-ins
            else:
                seat = idle[-1]
            idle.remove(seat)
            self.pending.pop(0)
            order = cycle.outstanding[job.job_id][0]
            if isinstance(job, RunAction):
                # An action may outlive its cycle: it runs for its own timeout.
                timeout = job.metric.timeout or action_timeout
                job = replace(job, deadline=self.clock() + timeout)
            child = self.pool.children[seat]
            if isinstance(job, ListDomains):
                self.listed_by = (job.job_id, child)
            elif (isinstance(job, Collect) and job.domains
                  and self.listed_by == (cycle.domains_job, child)):
                # This worker listed these domains: it kept them.
                job = replace(job, domains=(), domains_from=cycle.domains_job)
            self.inflight[job.job_id] = (cycle.layout.get(order), job)
            child.busy_with = job
            child.send(job)

    def finish_cycle(self) -> None:
        cycle = self.cycle
        assert cycle is not None
        self.cycle = None
        self.pending.clear()  # not reached: planned again next cycle, and first
        for job in cycle.abandon():
            if isinstance(job, ListDomains) and job.job_id in self.inflight:
                cycle.domains_error = "listing domains did not finish before the cycle deadline"
                cycle.failures.append(list_failure(cycle.domains_error))
            # Anything else still running reports later; its values count then.
        now = self.clock()
        period = self.config().update_period
        fresh = by_identity(cycle.fresh, cycle.layout)
        self.latest.store(fresh, now)
        self.failures.update(cycle.failures, cycle.attempted)
        if cycle.replanned:
            # Planned from the config a reload replaced: the next cycle, at
            # once, is the new config's first document.
            self.cycle_clock.reanchor(self.clock())
            log.debug("cycle %d: planned before the reload, not published", cycle.number)
            return
        live = {d.id for d in cycle.domains} if cycle.domains is not None else None
        if cycle.shell_jobs:
            sample = refresh_interval(period, cycle)
            self.refresh = sample if not self.refresh else 0.7 * self.refresh + 0.3 * sample
        layout = self.layout()
        carried = self.latest.fill(fresh, live, now, max_value_age(period, self.refresh),
                                   layout.order)
        # Only what the config running now names, where it puts it.
        fragments = {layout.order[what]: fragment for what, fragment in fresh.items()
                     if what in layout.order}
        capacity = document_capacity(self.config().disk_size) if self.config().vbd else None
        rendered = render(fragments, cycle.domains or (), capacity, len(cycle.failures),
                          carried)
        rendered.inactive = cycle.inactive
        rendered.listed_at = cycle.listed_at
        self.note_disk_fit(rendered)
        self.note_shell_work(cycle)
        self.publisher.publish(rendered)
        took = self.clock() - cycle.started
        self.stats.update(cycles=self.stats["cycles"] + 1, last_cycle_seconds=took,
                          published=rendered.published, left_out=rendered.left_out,
                          carried=rendered.carried, vms_not_on_disk=rendered.vms_not_on_disk,
                          shell_jobs=cycle.shell_jobs, shell_done=cycle.shell_done)
        self.last_cycle_wall = time.time()
        self.on_cycle_end()
        self.trim.worked()
        log.debug("cycle %d: %d metrics, %d left out, %.3f s, %d kept from earlier cycles",
                  cycle.number, rendered.published, rendered.left_out, took, rendered.carried)
        # An extra cycle (libvirt event) leaves the regular schedule as it is.
        late = 0.0
        if not self.instant.is_extra(cycle.number):
            late = self.cycle_clock.advance(self.clock())
        if late:
            log.warning("cycle %d overran the %d s update period (%.2f s late)",
                        cycle.number, self.config().update_period, late)

    def note_disk_fit(self, rendered: Rendered) -> None:
        short = rendered.vms_not_on_disk
        if short and not self.disk_short:
            log.warning("the metrics disk %s (%d bytes) cannot hold every VM: %d of %d VMs "
                        "(the highest domain ids) are left out of it while this lasts "
                        "(virtio still serves them); raise <size> in <disk>",
                        self.config().disk_path, self.config().disk_size, short,
                        len(rendered.vm_fragments))
        elif self.disk_short and not short:
            log.info("the metrics disk holds every VM again")
        self.disk_short = short

    def note_shell_work(self, cycle: Cycle) -> None:
        behind = cycle.shell_done < cycle.shell_jobs
        if behind and not self.behind:
            log.warning("shell actions need more than the %d s update period: %d of %d ran "
                        "in this cycle; the rest run first in the next, so each is refreshed "
                        "about every %.0f s (a value is kept for up to two rounds, now %.0f s)",
                        self.config().update_period, cycle.shell_done, cycle.shell_jobs,
                        refresh_interval(self.config().update_period, cycle),
                        max_value_age(self.config().update_period,
                                      refresh_interval(self.config().update_period, cycle)))
        elif self.behind and not behind:
            log.info("shell actions fit the update period again")
        self.behind = behind

