"""The supervisor's main loop: signals, the cycle clock, and its children.

Modelled on gunicorn's arbiter: signal handlers only queue the signal and
wake the loop through a self-pipe; the loop handles signals (handle_term,
handle_hup), takes the children's messages, runs the cycle (plan, dispatch,
gather, publish), and lets the pool converge on the wanted children. The
supervisor itself never calls libvirt, a shell or /proc, and never imports
what its children run: everything external runs in a child under a deadline.

The parts live beside it: ``pool`` (children), ``planning`` (which jobs),
``cycle`` (gathering one cycle's results), ``publisher`` (to the disk-writer
and virtio), ``status`` (the status file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import wait

from vhostmd.disk.handle import DiskHandle, DiskRefused, switch_disk
from vhostmd.disk.vmdir import VmDir
from vhostmd.mdisk import HEADER_SIZE
from vhostmd.runtime.child import release_free_memory
from vhostmd.supervisor import planning
from vhostmd.supervisor.children import (
    DISK_SLOT,
    VIRTIO_SLOT,
    beat_interval,
    hang_timeout,
    wanted_children,
)
from vhostmd.supervisor.config import Config, ConfigError, load_config
from vhostmd.supervisor.cycle import (
    DOMAIN_LIST_FAILURE,
    Cycle,
    CycleClock,
    FailureLog,
    LatestValues,
    Order,
    Rendered,
    failure_key,
    render,
    store_fragments,
)
from vhostmd.supervisor.cycle import domain_list_failure as list_failure
from vhostmd.supervisor.pool import Child, ChildPool, Unreadable
from vhostmd.supervisor.publisher import Publisher
from vhostmd.supervisor.status import StatusFile, build_status
from vhostmd.supervisor.vmdisks import reload_vm_dir
from vhostmd.wire import Collect, Failure, Job, JobResult, ListDomains, RunAction, needs_libvirt
from vhostmd.workers.collectors import CollectorPlan
from vhostmd.workers.collectors import plan as plan_collectors

log = logging.getLogger("vhostmd")

STOP_GRACE = 3.0


def default_action_timeout(period: int) -> float:
    """How long a shell action without its own timeout= may run: half a period, 1..30 s.

    Shorter than the cycle (0.8 x period), so hung actions cannot hold every
    worker through a whole cycle; an action may still outlive its cycle, and
    its value then goes into the next document.
    """
    return min(30.0, max(1.0, 0.5 * period))


def max_value_age(period: int) -> float:
    """How long a metric not refreshed in a cycle keeps its last value: 12 periods, >= 60 s."""
    return max(60.0, 12.0 * period)


def refresh_interval(period: int, cycle: Cycle) -> float:
    """About how often each shell action runs when not all of them fit in a cycle."""
    return period * cycle.shell_jobs / max(1, cycle.shell_done)


class Supervisor:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(self, config: Config, *, uri: str | None, config_path: str,
                 status_file: StatusFile | None = None, disk: DiskHandle | None = None,
                 dropped_to: str | None = None, log_level: int = logging.INFO,
                 clock: Callable[[], float] = time.monotonic,
                 vm_dir: VmDir | None = None) -> None:
        self.config = config
        self.uri = uri
        self.config_path = config_path
        self.status_file = status_file
        # The open, locked metrics disk (None without vbd): only the disk-writer
        # child gets its descriptor. dropped_to: the -u user, once root is gone.
        self.disk = disk
        self.vm_dir = vm_dir  # the open, locked directory of per-VM disks (<vm_disks>)
        self.dropped_to = dropped_to
        self.status_error: str | None = None
        self.clock = clock
        self.started_wall = time.time()
        self.last_cycle_wall = 0.0
        self.virtio_status: tuple[int, int, int] | None = None
        self.events: queue.SimpleQueue[tuple[Child, object]] = queue.SimpleQueue()
        self.signal_queue: deque[int] = deque()
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pool = ChildPool(level=log_level, beat_interval=beat_interval(config.update_period),
                              on_message=self.on_message, on_lost=self.on_lost,
                              on_started=self.on_started, clock=clock)
        self.publisher = Publisher(lambda: self.pool.get(DISK_SLOT),
                                   lambda: self.pool.get(VIRTIO_SLOT),
                                   lambda: self.vm_dir is not None)
        self.failures = FailureLog()
        self.cycle: Cycle | None = None
        self.cycle_number = 0
        self.new_job_id = planning.job_ids().__next__
        self.pending: list[Job] = []  # planned, not handed to a worker yet (in order)
        self.inflight: dict[int, tuple[Order, Job]] = {}  # handed to a worker, no result yet
        self.work_order = planning.WorkOrder()
        self.latest = LatestValues()
        self.disk_short = 0  # VMs left out of the disk last cycle (logged once per episode)
        self.behind = False  # shell work exceeds the period (logged once per episode)
        self.collector_state: dict[tuple[str, str], object] = {}
        self._plans: list[CollectorPlan] = []
        self._plans_for: Config | None = None
        self.cycle_clock = CycleClock(config.update_period, clock())
        self.stats: dict[str, float] = {
            "cycles": 0, "last_cycle_seconds": 0.0, "published": 0, "left_out": 0,
            "carried": 0, "vms_not_on_disk": 0, "shell_jobs": 0, "shell_done": 0}

    # -- signals -------------------------------------------------------------

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, self._queue_signal)

    def _queue_signal(self, signum: int, _frame: object) -> None:
        if signum != signal.SIGCHLD:
            self.signal_queue.append(signum)

    def handle_signals(self) -> None:
        while self.signal_queue:
            signum = self.signal_queue.popleft()
            if signum == signal.SIGHUP:
                self.handle_hup()
            else:
                self.handle_term(signum)

    def handle_term(self, signum: int) -> None:
        if not self.stopping:
            log.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping = True

    def handle_hup(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload rejected, keeping the running config: %s", exc)
            return
        for warning in new.warnings:
            log.warning("%s", warning)
        old = self.config
        new = self.reload_disk(new)
        self.vm_dir, new = reload_vm_dir(self.vm_dir, new, dropped_to=self.dropped_to)
        self.config = new
        if new.update_period != old.update_period:
            now = self.clock()
            self.cycle_clock.period = new.update_period
            self.cycle_clock.reanchor(now if self.cycle is None else now + new.update_period)
            self.pool.beat_interval = beat_interval(new.update_period)
        log.info("reloaded %s: %d metrics, period %d s", self.config_path,
                 len(new.metrics) + sum(len(p.metric_names) for p in self.collector_plans()),
                 new.update_period)

    def reload_disk(self, new: Config) -> Config:
        """Open the disk a reload names before switching to it.

        The running writer keeps publishing to the old disk until the new one
        is open and locked; a new disk that cannot be used (full filesystem,
        symlink, foreign owner, or a new path after -u dropped root) rejects
        that part of the reload with one line, and the rest applies.
        """
        current = self.disk
        try:
            disk = switch_disk(current, new.disk_path if new.vbd else None, new.disk_size,
                               dropped_to=self.dropped_to)
        except DiskRefused as exc:
            if current is None:
                log.error("reload: %s; not writing a metrics disk", exc)
                return dataclasses.replace(
                    new, transports=tuple(t for t in new.transports if t != "vbd"))
            log.error("reload: %s; still writing %s (%d bytes)", exc, current.path, current.size)
            return dataclasses.replace(new, disk_path=current.path, disk_size=current.size)
        if current is not None and (disk is None or disk.fd != current.fd):
            current.close()  # the old writer, killed at the next converge, keeps its own copy
        self.disk = disk
        return new

    # -- main loop -------------------------------------------------------------

    def run(self) -> int:
        self.install_signals()
        self.start_children()
        while not self.stopping:
            try:
                self.step()
            except Exception:
                self.recover()
            if not self.stopping:
                self.sleep()
        self.shutdown()
        return 0

    def start_children(self, timeout: float = 10.0) -> None:
        """Start the children and give the workers time to be ready for the first cycle.

        A child's first start waits for the forkserver to import everything
        (about a second on a slow machine); a first cycle started before would
        miss its deadline for nothing.
        """
        self.pool.converge(wanted_children(self.config, self.uri, self.disk, self.vm_dir),
                           hang_timeout(self.config.update_period))
        until = self.clock() + timeout
        workers = list(range(self.config.workers))
        while not self.stopping and not self.pool.all_ready(workers) and self.clock() < until:
            self.handle_signals()
            self.handle_events()
            self.sleep_until(until)
        self.cycle_clock.reanchor(self.clock())

    def recover(self) -> None:
        # A bug must not take every guest's metrics down with the supervisor:
        # log it, drop the cycle, and go on.
        log.exception("internal error in the supervisor loop; skipping this cycle")
        self.cycle = None
        self.pending.clear()
        self.cycle_clock.reanchor(self.clock() + self.config.update_period)

    def step(self) -> None:
        self.handle_signals()
        if self.stopping:
            return
        self.handle_events()
        now = self.clock()
        if self.cycle is None and now >= self.cycle_clock.next:
            self.start_cycle(now)
        self.dispatch()
        if self.cycle is not None and (self.cycle.complete or now >= self.cycle.deadline):
            self.finish_cycle()
        self.pool.converge(wanted_children(self.config, self.uri, self.disk, self.vm_dir),
                           hang_timeout(self.config.update_period))

    def sleep(self) -> None:
        self.sleep_until(self.cycle_clock.next if self.cycle is None else self.cycle.deadline)

    def sleep_until(self, until: float) -> None:
        """Wait for a signal, a message, a child's exit, ``until`` or the next beat."""
        timeout = max(0.0, min(until - self.clock(), self.pool.beat_interval))
        if self.events.empty():
            wait([self.wake_r, *self.pool.sentinels()], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass

    # -- children's messages -------------------------------------------------

    def on_message(self, child: Child, message: object) -> None:
        """Called in a reader thread: queue for the main loop and wake it."""
        self.events.put((child, message))
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"m")

    def handle_events(self) -> None:
        # Only what is queued now: a chatty child must not keep the loop here.
        for _ in range(self.events.qsize()):
            try:
                child, message = self.events.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, logging.LogRecord):
                log.handle(message)  # a child's log line, written where ours go
            elif not self.pool.is_current(child):
                # From a child already replaced: only its last words still matter.
                if isinstance(message, tuple) and message and message[0] == "disk-failed":
                    log.error("%s", message[1])
            elif isinstance(message, Unreadable):
                self.pool.replace(child, f"sent an unreadable message ({message.why}); killed")
            elif isinstance(message, JobResult):
                child.busy_with = None
                self.handle_result(message)
            elif isinstance(message, tuple) and message:
                self.handle_child_message(child, message)

    def handle_result(self, result: JobResult) -> None:
        entry = self.inflight.pop(result.job_id, None)
        if entry is None:
            return
        order, job = entry
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
        # values go into the next document, its failures into this cycle's log.
        fresh: dict = {}
        store_fragments(fresh, order, result)
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
        jobs = planning.plan_vms(cycle, self.config, self.collector_plans(), self.new_job_id,
                                 self.collector_state)
        self.pending = self.work_order.sort([*self.pending, *jobs])

    def handle_child_message(self, child: Child, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            child.ready = True
        elif kind == "disk-ready":
            self.publisher.writer_ready()
        elif kind == "disk-written":
            _, _seq, error_kind, error = message
            self.publisher.written(error_kind, error)
        elif kind == "disk-failed":
            log.error("%s", message[1])
        elif kind == "virtio-status":
            self.virtio_status = tuple(message[1:4])  # type: ignore[assignment]

    def on_started(self, child: Child) -> None:
        if child.slot == DISK_SLOT:
            self.publisher.writer_started()
        elif child.slot == VIRTIO_SLOT:
            # A restarted virtio process serves guests without waiting a cycle.
            self.publisher.send_fragments()

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

    # -- cycles --------------------------------------------------------------

    def collector_plans(self) -> list[CollectorPlan]:
        if self._plans_for is not self.config:
            self._plans = plan_collectors(self.config.builtins)
            self._plans_for = self.config
        return self._plans

    def start_cycle(self, now: float) -> None:
        period = self.config.update_period
        self.cycle_number += 1
        deadline = now + max(0.5, 0.8 * period)
        cycle = Cycle(self.cycle_number, now, deadline)
        # Jobs end a little before the cycle does, so a timed-out job is
        # reported as such instead of as a missing result.
        cycle.job_deadline = deadline - max(0.05, min(0.25, 0.05 * period))
        cycle.attempted.add(failure_key(DOMAIN_LIST_FAILURE))
        self.cycle = cycle
        listing_pending = any(isinstance(job, ListDomains) for _o, job in self.inflight.values())
        jobs = planning.plan_start(cycle, self.config, self.collector_plans(), self.new_job_id,
                                   self.collector_state, listing_pending)
        self.pending = self.work_order.sort(jobs)

    def dispatch(self) -> None:
        """Hand pending jobs to idle workers, one job per worker at a time.

        libvirt jobs prefer the lowest worker slots and the others the highest,
        so the domain listing and the bulk VM stats of a cycle usually meet the
        same worker and its open connection. With more than one worker, shell
        actions never take the first: a cycle's listing and built-ins always
        find it free, however long actions run.
        """
        cycle = self.cycle
        if not self.pending or cycle is None:
            return
        idle = [slot for slot in range(self.config.workers)
                if (c := self.pool.get(slot)) is not None and c.busy_with is None]
        action_timeout = default_action_timeout(self.config.update_period)
        while idle and self.pending:
            job = self.pending[0]
            if needs_libvirt(job):
                slot = idle[0]
            elif isinstance(job, RunAction) and self.config.workers > 1 and idle[-1] == 0:
                break  # only the first worker is free: keep it for libvirt and built-ins
            else:
                slot = idle[-1]
            idle.remove(slot)
            self.pending.pop(0)
            order = cycle.outstanding[job.job_id][0]
            if isinstance(job, RunAction):
                # An action may outlive its cycle: it runs for its own timeout.
                timeout = job.metric.timeout or action_timeout
                job = replace(job, deadline=self.clock() + timeout)
            self.inflight[job.job_id] = (order, job)
            child = self.pool.children[slot]
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
        period = self.config.update_period
        self.latest.store(cycle.fresh, now)
        live = {d.id for d in cycle.domains} if cycle.domains is not None else None
        carried = self.latest.fill(cycle.fresh, live, now, max_value_age(period))
        capacity = self.config.disk_size - HEADER_SIZE if self.config.vbd else None
        rendered = render(cycle.fresh, cycle.domains or (), capacity, len(cycle.failures),
                          carried)
        rendered.inactive = cycle.inactive
        self.failures.update(cycle.failures, cycle.attempted)
        self.note_disk_fit(rendered)
        self.note_shell_work(cycle)
        self.publisher.publish(rendered)
        took = self.clock() - cycle.started
        self.stats.update(cycles=self.stats["cycles"] + 1, last_cycle_seconds=took,
                          published=rendered.published, left_out=rendered.left_out,
                          carried=rendered.carried, vms_not_on_disk=rendered.vms_not_on_disk,
                          shell_jobs=cycle.shell_jobs, shell_done=cycle.shell_done)
        self.last_cycle_wall = time.time()
        self.write_status()
        release_free_memory()
        log.debug("cycle %d: %d metrics, %d left out, %.3f s, %d kept from earlier cycles",
                  cycle.number, rendered.published, rendered.left_out, took, rendered.carried)
        late = self.cycle_clock.advance(self.clock())
        if late:
            log.warning("cycle %d overran the %d s update period (%.2f s late)",
                        cycle.number, self.config.update_period, late)

    def note_disk_fit(self, rendered: Rendered) -> None:
        short = rendered.vms_not_on_disk
        if short and not self.disk_short:
            log.warning("the metrics disk %s (%d bytes) cannot hold every VM: %d of %d VMs "
                        "(the highest domain ids) are left out of it while this lasts "
                        "(virtio still serves them); raise <size> in <disk>",
                        self.config.disk_path, self.config.disk_size, short,
                        len(rendered.vm_fragments))
        elif self.disk_short and not short:
            log.info("the metrics disk holds every VM again")
        self.disk_short = short

    def note_shell_work(self, cycle: Cycle) -> None:
        behind = cycle.shell_done < cycle.shell_jobs
        if behind and not self.behind:
            log.warning("shell actions need more than the %d s update period: %d of %d ran "
                        "in this cycle; the rest run first in the next, so each is refreshed "
                        "about every %.0f s (a value is kept for at most %.0f s)",
                        self.config.update_period, cycle.shell_done, cycle.shell_jobs,
                        refresh_interval(self.config.update_period, cycle),
                        max_value_age(self.config.update_period))
        elif self.behind and not behind:
            log.info("shell actions fit the update period again")
        self.behind = behind

    # -- status and shutdown -----------------------------------------------------

    def write_status(self) -> None:
        if self.status_file is None:
            return
        try:
            if not self.status_file.write(build_status(self)):
                log.debug("status file %s locked by a reader; not rewritten this cycle",
                          self.status_file.path)
        except OSError as exc:
            if self.status_error != exc.strerror:
                log.warning("cannot write status file %s: %s", self.status_file.path,
                            exc.strerror)
            self.status_error = exc.strerror
        else:
            self.status_error = None

    def shutdown(self) -> None:
        self.pool.shutdown(STOP_GRACE)
        if self.status_file is not None:
            self.status_file.remove()
        log.info("stopped")
