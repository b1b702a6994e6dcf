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
import logging
import os
import queue
import signal
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait

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
    failure_key,
)
from vhostmd.supervisor.cycle import domain_list_failure as list_failure
from vhostmd.supervisor.pool import Child, ChildPool, Unreadable
from vhostmd.supervisor.publisher import Publisher
from vhostmd.supervisor.status import build_status, remove_status, write_status
from vhostmd.wire import Failure, Job, JobResult, ListDomains, RunAction, needs_libvirt
from vhostmd.workers.collectors import CollectorPlan
from vhostmd.workers.collectors import plan as plan_collectors

log = logging.getLogger("vhostmd")

STOP_GRACE = 3.0


class Supervisor:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(self, config: Config, *, uri: str | None, config_path: str,
                 status_path: str | None = None, log_level: int = logging.INFO,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.uri = uri
        self.config_path = config_path
        self.status_path = status_path
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
                                   lambda: self.pool.get(VIRTIO_SLOT))
        self.failures = FailureLog()
        self.cycle: Cycle | None = None
        self.cycle_number = 0
        self.new_job_id = planning.job_ids().__next__
        self.pending: deque[Job] = deque()
        self.collector_state: dict[tuple[str, str], object] = {}
        self._plans: list[CollectorPlan] = []
        self._plans_for: Config | None = None
        self.cycle_clock = CycleClock(config.update_period, clock())
        self.stats = {"cycles": 0, "last_cycle_seconds": 0.0, "published": 0, "left_out": 0}

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
        self.config = new
        if new.update_period != old.update_period:
            now = self.clock()
            self.cycle_clock.period = new.update_period
            self.cycle_clock.reanchor(now if self.cycle is None else now + new.update_period)
            self.pool.beat_interval = beat_interval(new.update_period)
        log.info("reloaded %s: %d metrics, period %d s", self.config_path,
                 len(new.metrics) + sum(len(p.metric_names) for p in self.collector_plans()),
                 new.update_period)

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
        self.pool.converge(wanted_children(self.config, self.uri),
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
        self.pool.converge(wanted_children(self.config, self.uri),
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
        if self.cycle is None:
            return
        job = self.cycle.accept(result)
        if job is None:
            return
        if result.state is not None and hasattr(job, "collector"):
            self.collector_state[(job.collector, job.context)] = result.state
        if isinstance(job, ListDomains):
            self.pending.extend(planning.plan_vms(self.cycle, self.config,
                                                  self.collector_plans(), self.new_job_id,
                                                  self.collector_state))
            if self.cycle.domains_error is not None:
                self.cycle.failures.append(list_failure(self.cycle.domains_error))

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
        if self.cycle is None or job is None:
            return
        # Its result will never come: leave it out of this cycle now.
        reason = f"{child.role} {why}"
        if isinstance(job, RunAction):
            failure = Failure(job.metric.name, job.metric.context, job.domain, reason)
            self.handle_result(JobResult(job.job_id, failures=(failure,)))
        else:
            self.handle_result(JobResult(job.job_id, error=reason))

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
        # Jobs end a little before the cycle does, so a timed-out action is
        # reported as such instead of as a missing result.
        cycle.job_deadline = deadline - max(0.05, min(0.25, 0.05 * period))
        cycle.attempted.add(failure_key(DOMAIN_LIST_FAILURE))
        self.cycle = cycle
        listing_pending = any(isinstance(self.pool.children[s].busy_with, ListDomains)
                              for s in self.pool.children)
        self.pending.extend(planning.plan_start(cycle, self.config, self.collector_plans(),
                                                self.new_job_id, self.collector_state,
                                                listing_pending))

    def dispatch(self) -> None:
        """Hand pending jobs to idle workers, one job per worker at a time.

        libvirt jobs prefer the lowest worker slots and the others the highest,
        so the domain listing and the bulk VM stats of a cycle usually meet the
        same worker and its open connection: fewer connections to libvirtd,
        and one copy of whatever a libvirt client caches.
        """
        if not self.pending:
            return
        idle = [slot for slot in range(self.config.workers)
                if (c := self.pool.get(slot)) is not None and c.busy_with is None]
        while idle and self.pending:
            job = self.pending.popleft()
            slot = idle.pop(0) if needs_libvirt(job) else idle.pop()
            child = self.pool.children[slot]
            child.busy_with = job
            child.send(job)

    def finish_cycle(self) -> None:
        cycle = self.cycle
        assert cycle is not None
        self.cycle = None
        self.pending.clear()
        for job in cycle.abandon():
            if isinstance(job, RunAction):
                cycle.failures.append(Failure(job.metric.name, job.metric.context, job.domain,
                                              "no result before the cycle deadline"))
            elif isinstance(job, ListDomains):
                cycle.domains_error = "listing domains did not finish before the cycle deadline"
                cycle.failures.append(list_failure(cycle.domains_error))
            else:
                cycle.failures.append(Failure(job.describe(), job.context, None,
                                              "no result before the cycle deadline"))
        rendered = cycle.render()
        self.failures.update(cycle.failures, cycle.attempted)
        self.publisher.publish(rendered)
        now = self.clock()
        took = now - cycle.started
        self.stats.update(cycles=self.stats["cycles"] + 1, last_cycle_seconds=took,
                          published=rendered.published, left_out=rendered.left_out)
        self.last_cycle_wall = time.time()
        self.write_status()
        log.debug("cycle %d: %d metrics, %d left out, %.3f s", cycle.number,
                  rendered.published, rendered.left_out, took)
        late = self.cycle_clock.advance(now)
        if late:
            log.warning("cycle %d overran the %d s update period (%.2f s late)",
                        cycle.number, self.config.update_period, late)

    # -- status and shutdown -----------------------------------------------------

    def write_status(self) -> None:
        if self.status_path is None:
            return
        try:
            write_status(self.status_path, build_status(self))
        except OSError as exc:
            if self.status_error != exc.strerror:
                log.warning("cannot write status file %s: %s", self.status_path, exc.strerror)
            self.status_error = exc.strerror
        else:
            self.status_error = None

    def shutdown(self) -> None:
        self.pool.shutdown(STOP_GRACE)
        if self.status_path is not None:
            remove_status(self.status_path)
        log.info("stopped")
