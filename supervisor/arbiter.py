"""The supervisor: cycle clock, fan-out, rendering, and a pool of children it keeps alive.

Modelled on gunicorn's arbiter: signal handlers only queue the signal and
wake the main loop through a self-pipe; the loop handles signals
(handle_term, handle_hup, ...), reads children's messages, runs the cycle,
and converges the running children on the wanted set (reap, kill hung ones,
respawn with backoff). The supervisor itself never calls libvirt, a shell or
/proc: everything external runs in a worker under a deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import queue
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vhostmd.disk.handle import DiskHandle, DiskRefused, switch_disk
from vhostmd.supervisor.children import CTX, Child, ChildContext, release_free_memory
from vhostmd.supervisor.config import MAX_WORKERS, Config, ConfigError, load_config
from vhostmd.supervisor.cycle import (
    DOMAIN_LIST_FAILURE,
    Cycle,
    FailureLog,
    Rendered,
    domain_list_failure,
    failure_key,
)
from vhostmd.supervisor.status import StatusFile
from vhostmd.workers.actions import is_plain_name
from vhostmd.workers.collectors import CollectorPlan
from vhostmd.workers.collectors import plan as plan_collectors
from vhostmd.workers.jobs import (
    Collect,
    Domain,
    Failure,
    Job,
    JobResult,
    ListDomains,
    RunAction,
)

log = logging.getLogger("vhostmd")

DISK_SLOT = MAX_WORKERS
VIRTIO_SLOT = MAX_WORKERS + 1
SLOTS = MAX_WORKERS + 2
STOP_GRACE = 3.0
# A child restarted this often within CRASH_WINDOW seconds is crash-looping:
# wait before the next start instead of spinning on it.
CRASH_LIMIT = 5
CRASH_WINDOW = 30.0
MAX_BACKOFF = 30.0


@dataclass
class ChildSpec:
    """A child the supervisor wants running."""

    role: str
    slot: int
    target: Callable[[ChildContext], None]
    key: tuple  # when the key changes (reload), the running child is replaced


@dataclass
class SlotState:
    restarts: int = 0
    loops: int = 0  # back-offs in a row, without a long enough run in between
    recent: deque[float] | None = None
    not_before: float = 0.0


class Supervisor:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(self, config: Config, *, uri: str | None, config_path: str,
                 private_fds: tuple[int, ...] = (), status_file: StatusFile | None = None,
                 disk: DiskHandle | None = None, dropped_to: str | None = None) -> None:
        self.config = config
        self.status_file = status_file
        # The open, locked metrics disk (None without vbd); only the disk-writer
        # child keeps its descriptor. dropped_to: the -u user, once root is gone.
        self.disk = disk
        self.dropped_to = dropped_to
        self.status_error: str | None = None
        self.started_wall = time.time()
        self.last_cycle_wall = 0.0
        self.virtio_status: tuple[int, int, int] | None = None
        self.uri = uri
        self.config_path = config_path
        self.private_fds = list(private_fds)  # children close these (the pid file lock)
        # One slot per child, and a last one with the beat interval they follow.
        self.heartbeats = CTX.Array("d", SLOTS + 1, lock=False)
        self.heartbeats[SLOTS] = self.beat_interval
        self.action_groups = CTX.Array("i", SLOTS, lock=False)
        self.children: dict[int, Child] = {}
        self.dying: list[Child] = []  # killed, not reaped yet
        self.slot_state: dict[int, SlotState] = {}
        self.events: queue.SimpleQueue[tuple[Child, object]] = queue.SimpleQueue()
        self.signal_queue: deque[int] = deque()
        self.stopping = False
        self.cycle: Cycle | None = None
        self.cycle_number = 0
        self.job_counter = 0
        self.pending: deque[Job] = deque()
        self.failures = FailureLog()
        self.clock_base = time.monotonic()
        self.clock_k = 0
        self.next_cycle = self.clock_base
        self.latest: Rendered | None = None
        self.doc_seq = 0
        self.disk_acked = True
        self.disk_sent_seq = 0
        self.disk_error: str | None = None
        self.disk_error_kind: str | None = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.collector_state: dict[tuple[str, str], object] = {}
        self._plans: list[CollectorPlan] = []
        self._plans_for: Config | None = None
        self.stats = {"cycles": 0, "last_cycle_seconds": 0.0, "published": 0, "left_out": 0}

    # -- wanted state -------------------------------------------------------

    @property
    def hang_timeout(self) -> float:
        return min(max(1.0, 1.5 * self.config.update_period), 30.0)

    @property
    def beat_interval(self) -> float:
        # Several beats per hang timeout, but no more than needed: every wake-up
        # of an idle daemon costs CPU on a host that runs VMs.
        return min(1.0, max(0.25, self.hang_timeout / 6))

    def wanted(self) -> dict[int, ChildSpec]:
        from vhostmd.disk.writer import disk_writer_main
        from vhostmd.workers.worker import worker_main

        cfg = self.config
        specs = {
            i: ChildSpec(f"worker {i + 1}", i,
                         functools.partial(worker_main, index=i + 1, uri=self.uri), ("worker",))
            for i in range(cfg.workers)
        }
        if cfg.vbd and self.disk is not None:
            specs[DISK_SLOT] = ChildSpec(
                "disk-writer", DISK_SLOT,
                functools.partial(disk_writer_main, handle=self.disk),
                ("disk", self.disk.path, self.disk.size),
            )
        if cfg.virtio:
            specs[VIRTIO_SLOT] = self.virtio_spec()
        return specs

    def virtio_spec(self) -> ChildSpec:
        from vhostmd.virtio.channels import virtio_main

        cfg = self.config
        return ChildSpec(
            "virtio", VIRTIO_SLOT,
            functools.partial(virtio_main, channel_paths=cfg.channel_paths,
                              max_channels=cfg.max_channels,
                              expiration_time=cfg.expiration_time),
            ("virtio", cfg.channel_paths, cfg.max_channels, cfg.expiration_time),
        )

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
        self.config = new
        if new.update_period != old.update_period:
            self.reanchor_clock(time.monotonic())
            self.heartbeats[SLOTS] = self.beat_interval
        log.info("reloaded %s: %d metrics, period %d s", self.config_path,
                 len(new.metrics), new.update_period)

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
        while not self.stopping:
            try:
                self.step()
            except Exception:
                # A bug must not take every guest's metrics down with the
                # supervisor: log it, drop the cycle, and go on.
                log.exception("internal error in the supervisor loop; skipping this cycle")
                self.cycle = None
                self.pending.clear()
                self.reanchor_clock(time.monotonic() + self.config.update_period)
            if not self.stopping:
                self.sleep()
        self.shutdown()
        return 0

    def step(self) -> None:
        self.handle_signals()
        if self.stopping:
            return
        self.handle_events()
        now = time.monotonic()
        if self.cycle is None and now >= self.next_cycle:
            self.start_cycle(now)
        self.dispatch()
        if self.cycle is not None and (self.cycle.complete or now >= self.cycle.deadline):
            self.finish_cycle()
        self.converge()

    def sleep(self) -> None:
        now = time.monotonic()
        until = self.next_cycle if self.cycle is None else self.cycle.deadline
        timeout = max(0.0, min(until - now, self.beat_interval))
        from multiprocessing.connection import wait

        waitables: list = [self.wake_r]
        waitables.extend(c.sentinel for c in self.children.values() if not c.gone)
        if self.events.empty():
            wait(waitables, timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass

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
            if self.children.get(child.slot) is not child:
                # From a child already reaped: only its last words still matter.
                if isinstance(message, tuple) and message and message[0] == "disk-failed":
                    log.error("%s", message[1])
                continue
            if isinstance(message, JobResult):
                self.handle_result(child, message)
            elif isinstance(message, tuple) and message:
                self.handle_child_message(child, message)

    def handle_result(self, child: Child, result: JobResult) -> None:
        child.busy_with = None
        if self.cycle is None:
            return
        job = self.cycle.accept(result)
        if isinstance(job, Collect) and result.state is not None:
            context = "host" if job.domains is None else "vm"
            self.collector_state[(job.collector, context)] = result.state
        if job is not None and isinstance(job, ListDomains):
            self.fan_out_vms()

    def handle_child_message(self, child: Child, message: tuple) -> None:
        kind = message[0]
        if kind == "disk-ready":
            self.disk_acked = True
            self.disk_sent_seq = 0
            self.send_document()
        elif kind == "disk-written":
            _, _seq, error_kind, error = message
            self.disk_acked = True
            # Logged once per kind of problem: a too-large document changes
            # size (and so message) nearly every cycle.
            if error_kind != self.disk_error_kind:
                if error:
                    log.error("metrics disk: %s", error)
                elif self.disk_error_kind:
                    log.info("metrics disk written again")
                self.disk_error_kind = error_kind
            self.disk_error = error
            self.send_document()
        elif kind == "disk-failed":
            log.error("%s", message[1])
        elif kind == "virtio-status":
            self.virtio_status = tuple(message[1:4])  # type: ignore[assignment]

    # -- cycles --------------------------------------------------------------

    def reanchor_clock(self, now: float) -> None:
        self.clock_base = now
        self.clock_k = 0
        self.next_cycle = now if self.cycle is None else now + self.config.update_period

    def new_job_id(self) -> int:
        self.job_counter += 1
        return self.job_counter

    def start_cycle(self, now: float) -> None:
        cfg = self.config
        self.cycle_number += 1
        deadline = now + max(0.5, 0.8 * cfg.update_period)
        cycle = Cycle(self.cycle_number, now, deadline)
        # Jobs end a little before the cycle does, so a timed-out action is
        # reported as such instead of as a missing result.
        job_deadline = deadline - max(0.05, min(0.25, 0.05 * cfg.update_period))
        cycle.job_deadline = job_deadline
        self.cycle = cycle
        cycle.domains_job = self.new_job_id()
        cycle.attempted.add(failure_key(DOMAIN_LIST_FAILURE))
        if any(isinstance(c.busy_with, ListDomains) for c in self.children.values()):
            # libvirt has not answered the last listing: asking again would only
            # tie up another worker until the hung one is replaced.
            cycle.domains_error = "libvirt did not answer the previous domain listing"
            cycle.failures.append(domain_list_failure(cycle.domains_error))
        else:
            listing = ListDomains(cycle.domains_job, job_deadline)
            cycle.expect((-1, -1), listing)
            self.pending.append(listing)
        for index, metric in enumerate(cfg.metrics):
            if metric.context == "host":
                job = RunAction(self.new_job_id(), job_deadline, metric, None, cfg.exec_path)
                cycle.expect((metric.line, index), job)
                self.pending.append(job)
        for plan in self.collector_plans():
            if plan.context == "host":
                self.expect_collect(cycle, plan, None)
        cycle.attempted.update(
            (m.context, m.name, None, None) for m in cfg.metrics if m.context == "host")

    def fan_out_vms(self) -> None:
        cycle = self.cycle
        assert cycle is not None
        cfg = self.config
        if cycle.domains_error is not None:
            cycle.failures.append(domain_list_failure(cycle.domains_error))
            return

        for plan in self.collector_plans():
            if plan.context == "vm":  # also with no VMs: it computes host totals too
                self.expect_collect(cycle, plan, cycle.domains)
        vm_metrics = [(i, m) for i, m in enumerate(cfg.metrics) if m.context == "vm"]
        if not vm_metrics:
            return
        for domain in cycle.domains or ():
            if not is_plain_name(domain.name):
                # One warning per VM (not per metric): its name never reaches a shell.
                cycle.attempted.add(("vm", "shell metrics", domain.id, domain.name))
                cycle.failures.append(Failure(
                    "shell metrics", "vm", domain,
                    "VM name is not plain ([A-Za-z0-9._+:@-]), so no shell action runs for it"))
                continue
            for index, metric in vm_metrics:
                cycle.attempted.add(("vm", metric.name, domain.id, domain.name))
                job = RunAction(self.new_job_id(), cycle.job_deadline, metric, domain,
                                cfg.exec_path)
                cycle.expect((metric.line, index), job)
                self.pending.append(job)

    def collector_plans(self) -> list[CollectorPlan]:
        if self._plans_for is not self.config:
            self._plans = plan_collectors(self.config.builtins)
            self._plans_for = self.config
        return self._plans

    def expect_collect(self, cycle: Cycle, plan: CollectorPlan,
                       domains: tuple[Domain, ...] | None) -> None:
        job = Collect(self.new_job_id(), cycle.job_deadline, plan.collector, plan.metric_names,
                      domains, self.collector_state.get((plan.collector, plan.context)))
        # Unique per plan: a host job and the vm job may share a <builtin> line.
        cycle.expect((plan.order, -1 - self.collector_plans().index(plan)), job)
        cycle.attempted.add((plan.context, f"builtin {plan.collector}", None, None))
        # Built-ins report failures per metric (and per VM): recoveries are
        # noticed only if those keys count as tried.
        for name in plan.metric_names:
            cycle.attempted.add(("host", name, None, None))
            cycle.attempted.update(("vm", name, d.id, d.name) for d in domains or ())
        self.pending.append(job)

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
                if (c := self.children.get(slot)) is not None and not c.gone
                and c.busy_with is None]
        while idle and self.pending:
            job = self.pending.popleft()
            needs_libvirt = isinstance(job, ListDomains) or (
                isinstance(job, Collect) and job.domains is not None)
            slot = idle.pop(0) if needs_libvirt else idle.pop()
            child = self.children[slot]
            child.busy_with = job
            child.send(job)

    def finish_cycle(self) -> None:
        cycle = self.cycle
        assert cycle is not None
        self.cycle = None
        self.pending.clear()
        for job in cycle.abandon():
            if isinstance(job, RunAction):
                cycle.failures.append(Failure(
                    job.metric.name, job.metric.context, job.domain,
                    "no result before the cycle deadline"))
            elif isinstance(job, ListDomains):
                cycle.domains_error = "listing domains did not finish before the cycle deadline"
                cycle.failures.append(domain_list_failure(cycle.domains_error))
            else:
                context = "vm" if getattr(job, "domains", None) else "host"
                cycle.failures.append(Failure(job.describe(), context, None,
                                              "no result before the cycle deadline"))
        rendered = cycle.render()
        self.failures.update(cycle.failures, cycle.attempted)
        self.publish(rendered)
        now = time.monotonic()
        took = now - cycle.started
        self.stats.update(cycles=self.stats["cycles"] + 1, last_cycle_seconds=took,
                          published=rendered.published, left_out=rendered.left_out)
        self.last_cycle_wall = time.time()
        self.write_status()
        release_free_memory()
        log.debug("cycle %d: %d metrics, %d left out, %.3f s", cycle.number,
                  rendered.published, rendered.left_out, took)
        self.clock_k += 1
        self.next_cycle = self.clock_base + self.clock_k * self.config.update_period
        if self.next_cycle < now:
            log.warning("cycle %d overran the %d s update period (%.2f s late)",
                        cycle.number, self.config.update_period, now - self.next_cycle)
            self.reanchor_clock(now)

    def publish(self, rendered: Rendered) -> None:
        self.latest = rendered
        self.doc_seq += 1
        self.send_document()
        self.send_fragments()

    def send_fragments(self) -> None:
        virtio = self.children.get(VIRTIO_SLOT)
        rendered = self.latest
        if virtio is not None and not virtio.gone and rendered is not None:
            virtio.send(("metrics", rendered.host_fragment, rendered.vm_fragments,
                         tuple(d.id for d in rendered.domains)))

    def send_document(self) -> None:
        """At most one document in flight to the disk-writer: always the newest."""
        writer = self.children.get(DISK_SLOT)
        if (writer is None or writer.gone or not self.disk_acked or self.latest is None
                or self.disk_sent_seq == self.doc_seq):
            return
        self.disk_acked = False
        self.disk_sent_seq = self.doc_seq
        writer.send((self.doc_seq, self.latest.document))

    # -- status ----------------------------------------------------------------

    def child_state(self, slot: int, child: Child | None) -> str:
        if child is None:
            state = self.slot_state.get(slot)
            if state is not None and state.not_before > time.monotonic():
                return "waiting to restart (crash loop)"
            return "starting"
        job = child.busy_with
        if isinstance(job, (RunAction, ListDomains, Collect)):
            return f"busy: {job.describe()}"
        if slot == DISK_SLOT:
            return f"error: {self.disk_error}" if self.disk_error else "ok"
        return "idle" if slot < MAX_WORKERS else "running"

    def status(self) -> dict:
        from vhostmd import __version__

        children = []
        for slot, spec in sorted(self.wanted().items()):
            child = self.children.get(slot)
            children.append({
                "role": spec.role,
                "pid": child.pid if child is not None else None,
                "state": self.child_state(slot, child),
                "restarts": self.slot_state.get(slot, SlotState()).restarts,
                "heartbeat_age": round(child.heartbeat_age(), 3) if child is not None else None,
            })
        virtio = None
        if self.virtio_status is not None:
            connected, known, maximum = self.virtio_status
            virtio = {"connected": connected, "known": known, "max": maximum}
        return {
            "version": __version__, "pid": os.getpid(), "config": self.config_path,
            "update_period": self.config.update_period, "started": self.started_wall,
            "updated": time.time(), "last_cycle_at": self.last_cycle_wall,
            "last_cycle_seconds": round(self.stats["last_cycle_seconds"], 4),
            "cycles": self.stats["cycles"], "published": self.stats["published"],
            "left_out": self.stats["left_out"], "children": children, "virtio": virtio,
        }

    def write_status(self) -> None:
        if self.status_file is None:
            return
        try:
            if not self.status_file.write(self.status()):
                log.debug("status file %s locked by a reader; not rewritten this cycle",
                          self.status_file.path)
        except OSError as exc:
            if self.status_error != exc.strerror:
                log.warning("cannot write status file %s: %s", self.status_file.path,
                            exc.strerror)
            self.status_error = exc.strerror
        else:
            self.status_error = None

    # -- children ------------------------------------------------------------

    def converge(self) -> None:
        """Reap the dead, kill the hung, replace what is missing or outdated."""
        wanted = self.wanted()
        now = time.monotonic()
        # Killed children are reaped here, a loop later, never waited for.
        self.dying = [c for c in self.dying if c.collect() is None]
        for slot, child in list(self.children.items()):
            how = child.collect()
            if how is not None:
                self.lost_child(child, f"died ({how})")
                continue
            spec = wanted.get(slot)
            if spec is None or spec.key != child.spec_key:
                child.kill()  # outdated by a reload: nothing in it worth waiting for
                self.dying.append(child)
                del self.children[slot]
                continue
            age = child.heartbeat_age()
            if age > self.hang_timeout:
                job = child.busy_with
                doing = f" while running {job.describe()}" if isinstance(
                    job, (RunAction, ListDomains, Collect)) else ""
                child.kill()
                self.dying.append(child)
                self.lost_child(child, f"stopped responding for {age:.1f} s{doing}; killed")
        for slot, spec in wanted.items():
            if slot in self.children:
                continue
            state = self.slot_state.setdefault(slot, SlotState(recent=deque(maxlen=CRASH_LIMIT)))
            if now < state.not_before:
                continue
            self.spawn(spec)

    def spawn(self, spec: ChildSpec) -> None:
        private = [self.wake_r, self.wake_w, *self.private_fds]
        if self.disk is not None and spec.slot != DISK_SLOT:
            private.append(self.disk.fd)  # the disk is the writer's alone
        child = Child(spec.role, spec.slot, spec.target, self.heartbeats, self.action_groups,
                      self.on_message, private)
        child.spec_key = spec.key
        self.children[spec.slot] = child
        if spec.slot == DISK_SLOT:
            self.disk_acked = False  # until the new writer says it is ready
        elif spec.slot == VIRTIO_SLOT:
            self.send_fragments()  # a restarted virtio serves guests without waiting a cycle
        log.debug("started %s (pid %d)", spec.role, child.pid)

    def lost_child(self, child: Child, why: str) -> None:
        del self.children[child.slot]
        job = child.busy_with
        if self.cycle is not None and isinstance(job, (RunAction, ListDomains, Collect)):
            # Its result will never come: leave it out of this cycle now.
            reason = f"{child.role} {why}"
            if isinstance(job, RunAction):
                metric = job.metric
                result = JobResult(job.job_id,
                                   failures=(Failure(metric.name, metric.context, job.domain,
                                                     reason),))
            else:
                result = JobResult(job.job_id, error=reason)
            self.handle_result(child, result)
        if self.stopping:
            return
        state = self.slot_state.setdefault(child.slot, SlotState(recent=deque(maxlen=CRASH_LIMIT)))
        now = time.monotonic()
        state.restarts += 1
        assert state.recent is not None
        if now - child.started > CRASH_WINDOW:
            state.loops = 0  # it had been running fine: a new problem, not the same loop
        state.recent.append(now)
        backoff = 0.0
        if len(state.recent) == CRASH_LIMIT and now - state.recent[0] < CRASH_WINDOW:
            state.loops += 1
            backoff = min(MAX_BACKOFF, 2.0 ** state.loops)
            state.not_before = now + backoff
        log.error("%s (pid %d) %s; %s", child.role, child.pid, why,
                  f"restarting in {math.ceil(backoff)} s (crash loop)" if backoff
                  else "restarting")

    def shutdown(self) -> None:
        children = list(self.children.values()) + self.dying
        for child in children:
            child.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for child in children:
            child.collect(max(0.0, deadline - time.monotonic()))
        for child in children:
            if not child.gone:
                log.warning("%s (pid %d) did not stop in %g s; killing it", child.role,
                            child.pid, STOP_GRACE)
                child.kill()
                child.collect(2.0)
        self.children.clear()
        if self.status_file is not None:
            self.status_file.remove()
        log.info("stopped")
