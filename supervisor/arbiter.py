"""The supervisor's main loop: signals, children's messages, and what they start.

Modelled on gunicorn's arbiter: signal handlers only queue the signal and
wake the loop through a self-pipe; each step handles signals (handle_term,
handle_hup), routes the children's messages, lets the cycle runner step, and
lets the pool converge on the wanted children. The supervisor itself never
calls libvirt, a shell or /proc, and never imports what its children run.

The parts live beside it: ``scheduler`` (running cycles), ``planning``
(which jobs, in which order), ``cycle`` (one cycle's results, the document),
``publisher`` (to the disk-writer and virtio), ``pool`` and ``children``
(the children), ``status`` (the status file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import queue
import select
import signal
import time
from collections import deque
from collections.abc import Callable

from vhostmd.disk.handle import DiskHandle, DiskRefused, open_disk, switch_disk
from vhostmd.disk.vmdir import VmDir
from vhostmd.runtime.child import IdleTrim
from vhostmd.runtime.published import SharedSlots
from vhostmd.supervisor.children import (
    DISK_SEAT,
    VIRTIO_SEAT,
    beat_interval,
    events_unavailable,
    hang_timeout,
    wanted_children,
)
from vhostmd.supervisor.config import Config, ConfigError, load_config
from vhostmd.supervisor.cycle import FailureLog
from vhostmd.supervisor.health import HealthFile
from vhostmd.supervisor.instant import InstantCycles
from vhostmd.supervisor.notify import Notifier
from vhostmd.supervisor.planning import count_metrics
from vhostmd.supervisor.pool import Child, ChildPool, ChildSpec, Unreadable
from vhostmd.supervisor.publisher import Publisher
from vhostmd.supervisor.scheduler import CycleRunner
from vhostmd.supervisor.status import StatusFile, build_status
from vhostmd.supervisor.vmdisks import reload_vm_dir
from vhostmd.wire import (
    CHILD_MESSAGES,
    ChildMessage,
    DiskFailed,
    DiskReady,
    DiskWritten,
    DomainsChanged,
    EventsState,
    JobResult,
    Ready,
    VirtioStatus,
    VirtioTaken,
)

log = logging.getLogger("vhostmd")

STOP_GRACE = 3.0


class Supervisor:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(self, config: Config, *, uri: str | None, config_path: str,
                 status_file: StatusFile | None = None, disk: DiskHandle | None = None,
                 dropped_to: str | None = None, log_level: int = logging.INFO,
                 clock: Callable[[], float] = time.monotonic,
                 vm_dir: VmDir | None = None, notifier: Notifier | None = None) -> None:
        self.config = config
        # systemd (Type=notify): ready once the first document is on the disk.
        self.notifier = notifier if notifier is not None else Notifier({})
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
        self.virtio_status: tuple[int, int, int] | None = None
        self.events: queue.SimpleQueue[tuple[Child, object]] = queue.SimpleQueue()
        self.signal_queue: deque[int] = deque()
        self.stopping = False
        self.all_stopped = False  # after shutdown: every child reaped
        self.disk_removed_said: str | None = None  # why a removed disk is not made again
        self.said_once: set[object] = set()  # children's "once" log lines already written
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller = select.poll()  # the wake pipe and the children's sentinels
        # Freed heap goes back to the kernel once the loop has had no message
        # for a while, as in the children: between cycles of the default
        # period, not between those of a 1 s period that would reuse it.
        self.trim = IdleTrim(self.clock)
        self.poller.register(self.wake_r, select.POLLIN)
        self.polled: set[int] = set()  # the sentinels registered with it
        self.pool = ChildPool(level=log_level, beat_interval=beat_interval(config.update_period),
                              on_message=self.on_message, on_lost=self.on_lost,
                              on_started=self.on_started, clock=clock)
        self.slots = SharedSlots()  # each cycle's result, for the disk-writer and virtio
        self.publisher = Publisher(lambda: self.pool.get(DISK_SEAT),
                                   lambda: self.pool.get(VIRTIO_SEAT),
                                   lambda: self.vm_dir is not None, self.slots)
        self.cycles = CycleRunner(lambda: self.config, self.pool, self.publisher, clock,
                                  self.cycle_ended)
        self.health = HealthFile()  # <textfile>: health for Prometheus
        self.virtio_refused = 0
        if (why := events_unavailable(uri)) is not None:
            self.cycles.instant.state(False, why)
        # The pool converges on what wanted_children says for these inputs; it
        # is rebuilt only when one of them changes (a reload, a new disk).
        self._wanted_for: tuple[object, ...] | None = None
        self._wanted: dict[int, ChildSpec] = {}
        # Converging costs a liveness check per child (a syscall each): run it
        # when a child's sentinel fired, when the wanted children changed, and
        # otherwise once per beat interval (hangs, back-offs and kill grace
        # periods are all far longer than that), not on every message.
        self.converge_due = -math.inf
        self.children_changed = True

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
            self.pool.beat_interval = beat_interval(new.update_period)
        self.cycles.reconfigured(self.clock())
        log.info("reloaded %s: %d metrics, period %d s", self.config_path, count_metrics(new),
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
            # The watchdog is fed here, by the loop itself: a supervisor stuck
            # anywhere stops feeding it (its children have heartbeats).
            self.notifier.ping_watchdog()
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
        self.converge()
        until = self.clock() + timeout
        workers = list(range(self.config.workers))
        while not self.stopping and not self.pool.all_ready(workers) and self.clock() < until:
            self.notifier.ping_watchdog()
            self.handle_signals()
            self.handle_events()
            self.sleep_until(until)
        self.cycles.cycle_clock.reanchor(self.clock())

    def recover(self) -> None:
        # A bug must not take every guest's metrics down with the supervisor:
        # log it, drop the cycle, and go on.
        log.exception("internal error in the supervisor loop; skipping this cycle")
        self.cycles.drop_cycle(self.clock() + self.config.update_period)

    def step(self) -> None:
        self.handle_signals()
        if self.stopping:
            return
        self.handle_events()
        self.cycles.step()
        self.converge()

    def converge(self) -> None:
        """Let the pool converge on the wanted children, when something may have changed."""
        inputs = (self.config, self.uri, self.disk, self.vm_dir)
        if self._wanted_for is None or any(
                a is not b for a, b in zip(inputs, self._wanted_for, strict=True)):
            self._wanted_for = inputs
            self._wanted = wanted_children(self.config, self.uri, self.disk, self.vm_dir,
                                           self.slots)
            self.children_changed = True
        now = self.clock()
        if not self.children_changed and now < self.converge_due:
            return
        reap, self.children_changed = self.children_changed, False
        self.converge_due = now + self.pool.beat_interval
        self.pool.converge(self._wanted, hang_timeout(self.config.update_period), reap)

    def sleep(self) -> None:
        self.sleep_until(self.cycles.next_wakeup)

    def sleep_until(self, until: float) -> None:
        """Wait for a signal, a message, a child's exit, ``until`` or the next beat."""
        left = until - self.clock()
        timeout = max(0.0, min(left, self.pool.beat_interval, self.notifier.wake_within,
                               self.trim.wait(left)))
        if self.events.empty():
            # One poll object for the daemon's life, updated when children
            # come and go: the loop wakes tens of times a cycle.
            sentinels = set(self.pool.sentinels())
            for fd in self.polled - sentinels:
                self.poller.unregister(fd)
            for fd in sentinels - self.polled:
                self.poller.register(fd, select.POLLIN)
            self.polled = sentinels
            ready = self.poller.poll(math.ceil(timeout * 1000))
            if any(fd != self.wake_r for fd, _ in ready):
                self.children_changed = True  # a child exited: reap and replace it now
        self.trim.poll()
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
        if not self.events.empty():
            self.trim.worked()
        for _ in range(self.events.qsize()):
            try:
                child, message = self.events.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, logging.LogRecord):
                # A child's log line, written where ours go; one a child marks
                # "once" (extra={"once": key}) is written once, whichever child sent it.
                once = getattr(message, "once", None)
                if once is None or once not in self.said_once:
                    if once is not None:
                        self.said_once.add(once)
                    log.handle(message)
            elif not self.pool.is_current(child):
                # From a child already replaced: only its last words still matter.
                if isinstance(message, DiskFailed):
                    log.error("%s", message.reason)
            elif isinstance(message, Unreadable):
                self.pool.replace(child, f"sent an unreadable message ({message.why}); killed")
                self.children_changed = True
            elif isinstance(message, JobResult):
                try:
                    # Copied out before the worker gets another job (and so
                    # before it could write its slot again).
                    message = child.take_result(message)
                except ValueError as exc:
                    self.pool.replace(child, f"sent an unreadable result ({exc}); killed")
                    self.children_changed = True
                    continue
                child.busy_with = None
                self.cycles.handle_result(message)
            elif isinstance(message, CHILD_MESSAGES):
                self.handle_child_message(child, message)
            else:
                self.pool.replace(child, f"sent a message of unknown type "
                                  f"{type(message).__name__}; killed")
                self.children_changed = True

    def handle_child_message(self, child: Child, message: ChildMessage) -> None:
        if isinstance(message, Ready):
            child.ready = True
        elif isinstance(message, DiskReady):
            self.publisher.writer_ready()
        elif isinstance(message, DiskWritten):
            self.publisher.written(message.error_kind, message.error)
            # The disk (and every per-VM disk) holds a document now: libvirt,
            # ordered after us, may start guests.
            self.notifier.notify_ready(self.status_line())
        elif isinstance(message, DiskFailed):
            log.error("%s", message.reason)
        elif isinstance(message, VirtioTaken):
            self.publisher.virtio_took()
        elif isinstance(message, VirtioStatus):
            self.virtio_status = (message.connected, message.known, message.maximum)
            self.virtio_refused = message.refused
        elif isinstance(message, DomainsChanged):
            log.debug("libvirt event: %s%s; listing again now", message.event,
                      f" (domain id {message.domain_id})" if message.domain_id is not None
                      else "")
            self.cycles.instant.request()
        elif isinstance(message, EventsState):
            self.cycles.instant.state(message.connected, message.detail)

    def on_lost(self, child: Child, why: str) -> None:
        self.cycles.on_lost(child, why)

    def on_started(self, child: Child) -> None:
        if child.seat == DISK_SEAT:
            self.publisher.writer_started()
        elif child.seat == VIRTIO_SEAT:
            # A restarted virtio process serves guests without waiting a cycle.
            self.publisher.virtio_started()

    # -- status and shutdown -----------------------------------------------------

    # What status and health read, kept by the cycle runner.
    @property
    def stats(self) -> dict[str, float]:
        return self.cycles.stats

    @property
    def last_cycle_wall(self) -> float:
        return self.cycles.last_cycle_wall

    @property
    def instant(self) -> InstantCycles:
        return self.cycles.instant

    @property
    def failures(self) -> FailureLog:
        return self.cycles.failures

    def cycle_ended(self) -> None:
        self.check_disk_present()
        self.write_status()
        self.health.write(self.config.textfile, self)
        if self.wants_disk_writer():
            self.notifier.notify_status(self.status_line())
        else:
            self.notifier.notify_ready(self.status_line())  # virtio only: nothing to wait for

    def wants_disk_writer(self) -> bool:
        return self.disk is not None or self.vm_dir is not None

    def status_line(self) -> str:
        """What ``systemctl status`` shows: the last cycle, and a problem with the disk."""
        stats = self.stats
        line = (f"cycle {int(stats['cycles'])}: {int(stats['published'])} metrics published"
                f" in {stats['last_cycle_seconds']:.2f} s")
        if stats["left_out"]:
            line += f", {int(stats['left_out'])} left out"
        if stats["vms_not_on_disk"]:
            line += f", {int(stats['vms_not_on_disk'])} VMs not on the disk"
        if self.publisher.error:
            line += f"; metrics disk: {self.publisher.error}"
        return line

    def check_disk_present(self) -> None:
        """Make the metrics disk again if it was removed (one fstat a cycle).

        Its path would otherwise stay free for anyone to plant a file at, and
        the daemon would go on writing a file nobody can open any more. The new
        one is opened with the same rules as at start (not through a link, not
        another user's file); until that works, one line says why.
        """
        disk = self.disk
        if disk is None or not disk.regular:
            return
        try:
            removed = os.fstat(disk.fd).st_nlink == 0
        except OSError:
            return
        if not removed:
            self.disk_removed_said = None
            return
        if self.dropped_to is not None:
            why = (f"vhostmd runs as {self.dropped_to} (-u) and cannot make it again; "
                   "restart vhostmd")
        else:
            try:
                new = open_disk(disk.path, disk.size)
            except DiskRefused as exc:
                why = f"cannot make it again: {exc}; trying again every cycle"
            else:
                log.warning("metrics disk %s was removed while in use; made it again (guests "
                            "that had it attached keep the old, unchanging file until they "
                            "attach it again)", disk.path)
                self.disk = new  # the disk-writer is replaced with one that maps it
                disk.close()
                self.disk_removed_said = None
                return
        if self.disk_removed_said != why:
            log.error("metrics disk %s was removed while in use; %s", disk.path, why)
        self.disk_removed_said = why

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
        self.notifier.notify_stopping()
        self.all_stopped = self.pool.shutdown(STOP_GRACE)
        if self.all_stopped:
            # No writer is left: let go of the disk's (and directory's) lock,
            # removing its file while it is still held.
            for held in (self.disk, self.vm_dir):
                if held is not None:
                    held.close()
        if self.status_file is not None:
            self.status_file.remove()
        log.info("stopped")
