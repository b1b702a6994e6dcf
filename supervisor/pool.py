"""The children the supervisor keeps alive: start, reap, kill, back off.

A ``ChildSpec`` says what should run in a seat; ``ChildPool.converge`` makes
it so, like gunicorn's manage_workers: reap the dead, abort the hung, replace
what is missing or outdated (a reload changed its key), and hold back a seat
that crash-loops.

Everything about one running child lives in its ``Child`` handle: its queues,
its shared-memory cell (heartbeat and action process group), its doorbell and
crash-report pipes. A replacement gets new ones, so nothing a dead child left
behind (a late message, an action group in its cell) can reach the child that
replaced it.

A child that stops beating gets SIGABRT first: ``faulthandler`` in the child
writes every thread's stack to its crash-report pipe, which is logged (so the
log shows where it hung); SIGKILL follows after ``ABORT_GRACE`` seconds, or at
once for a child that cannot run its handler (stopped).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from queue import Empty
from typing import Any

from vhostmd.runtime.child import BEAT, CELL_SIZE, CTX, GROUP, ChildContext, InheritedFd, child_main
from vhostmd.runtime.published import SharedSlots, unpack_fragments
from vhostmd.wire import JobResult

log = logging.getLogger("vhostmd")

# A child restarted this often within CRASH_WINDOW seconds is crash-looping:
# wait before the next start instead of spinning on it.
CRASH_LIMIT = 5
CRASH_WINDOW = 30.0
MAX_BACKOFF = 30.0
ABORT_GRACE = 1.0
CRASH_REPORT_LIMIT = 16384


@dataclass(frozen=True)
class ChildSpec:
    """A child the supervisor wants running in ``seat``."""

    role: str
    seat: int
    target: str  # "module:function": the supervisor never imports what children run
    kwargs: dict[str, Any] = field(default_factory=dict, compare=False)
    key: tuple = ()  # when the key changes (reload), the running child is replaced
    result_region: bool = False  # a shared-memory region of its own for large results (workers)


class Unreadable:
    """Event: a message from a child could not be read (the child is then replaced)."""

    def __init__(self, why: str) -> None:
        self.why = why


class Child:
    """One running child as the supervisor sees it."""

    def __init__(self, spec: ChildSpec, shared: Any, level: int,
                 on_message: Callable[[Child, object], None]) -> None:
        self.spec = spec
        self.role = spec.role
        self.seat = spec.seat
        self.key = spec.key
        self.inbox = CTX.Queue()
        self.outbox = CTX.Queue()
        # Never wait at exit to flush a message into a child that is gone.
        self.inbox.cancel_join_thread()
        self.cell = CTX.RawArray("d", CELL_SIZE)
        self.started = time.monotonic()
        self.cell[BEAT] = self.started
        bell_r, self._bell = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._crash, crash_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        ctx = ChildContext(self.role, self.seat, self.inbox, self.outbox, self.cell, shared,
                           InheritedFd(bell_r), InheritedFd(crash_w))
        # Per process, never per seat: whatever a dying worker still writes
        # there cannot reach its replacement's results.
        self.results = SharedSlots(slots=1, writable=True) if spec.result_region else None
        kwargs = spec.kwargs if self.results is None else {**spec.kwargs, "results": self.results}
        self.process = CTX.Process(target=child_main, args=(spec.target, kwargs, ctx, level),
                                   name=self.role, daemon=False)
        try:
            self.process.start()
        finally:
            os.close(bell_r)
            os.close(crash_w)
        self.pid: int = self.process.pid or 0
        self.gone = False
        self.aborted_at: float | None = None
        self.busy_with: object = None  # the job a worker runs, for the supervisor
        self.ready = False  # it said so: its imports are done, it takes work
        self._stopped = threading.Event()
        self._sending = threading.Lock()  # the inbox between ``send`` and the reader's close
        self._inbox_closed = False
        self._reader = threading.Thread(target=self._pump, args=(on_message,),
                                        name=f"read-{self.role}", daemon=True)
        self._reader.start()

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def _pump(self, on_message: Callable[[Child, object], None]) -> None:
        """Reader thread: turn the child's messages into events for the main loop."""
        while not self._stopped.is_set():
            try:
                message = self.outbox.get(timeout=0.5)
            except Empty:
                continue
            except Exception as exc:
                # A message that cannot be unpickled: the child is out of step
                # with us and would sit "busy" for ever. The main loop replaces it.
                on_message(self, Unreadable(f"{type(exc).__name__}: {exc}"))
                break
            on_message(self, message)
        # Anything still on its way to the dead child would block our feeder
        # thread on a full pipe: read it back, then let the feeder end.
        with contextlib.suppress(Exception):
            while True:
                self.inbox.get(timeout=0.1)
        # Both queues' pipes are closed here, not whenever this handle happens
        # to be collected: replacing children never piles up descriptors.
        with self._sending:
            self._inbox_closed = True
            with contextlib.suppress(Exception):
                self.inbox.close()
            # Its feeder thread closes the inbox's pipe as it ends; a queue
            # nothing was ever sent on has none, so its pipe is closed here.
            # (Under the lock: ``send`` cannot start a feeder meanwhile.)
            ends = [] if self.inbox._thread is not None else [self.inbox._reader,
                                                                self.inbox._writer]
        # The outbox's pipe is ours alone (the supervisor never writes to it).
        for end in (*ends, self.outbox._reader, self.outbox._writer):
            with contextlib.suppress(OSError):
                end.close()

    def take_result(self, result: JobResult) -> JobResult:
        """``result`` with its VM fragments copied out of this child's result region.

        Raises ValueError when the region is gone or the result points outside it.
        """
        if result.vms_in_region is None:
            return result
        if self.results is None or self.gone:
            raise ValueError("a result in a region this child does not have")
        return replace(result, vms=unpack_fragments(self.results, result.vms_in_region),
                       vms_in_region=None)

    def heartbeat_age(self) -> float:
        return time.monotonic() - self.cell[BEAT]

    def send(self, message: object) -> None:
        if self.gone:
            return
        with self._sending, contextlib.suppress(ValueError, OSError):
            if not self._inbox_closed:
                self.inbox.put(message)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._bell, b"m")

    def abort(self) -> None:
        """Ask a hung child for its stacks (SIGABRT); ``kill`` follows if it lingers."""
        if self.gone or self.aborted_at is not None:
            return
        self.aborted_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGABRT)

    def kill(self) -> None:
        """SIGKILL the child and the action process group it was running, if any."""
        if self.gone:
            return
        self._kill_action()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def terminate(self) -> None:
        if not self.gone:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)

    def _kill_action(self) -> None:
        group = int(self.cell[GROUP])
        if group > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
            self.cell[GROUP] = 0

    def crash_report(self) -> str:
        """What faulthandler wrote (after SIGABRT or a fatal signal), as one line."""
        try:
            data = os.read(self._crash, CRASH_REPORT_LIMIT)
        except OSError:
            return ""
        frames = []
        for line in data.decode("utf-8", "replace").splitlines():
            line = line.strip()
            if line.startswith("File "):
                # File "/x/y/actions.py", line 12 in run_shell -> actions.py:12 run_shell
                path, _, rest = line[6:].partition('", line ')
                number, _, func = rest.partition(" in ")
                frames.append(f"{os.path.basename(path)}:{number} {func}")
            elif line.startswith(("Thread ", "Current thread ")):
                frames.append("|")
        return " <- ".join(frames).replace(" <- | <- ", " | ").strip(" |<-")

    def collect(self, timeout: float = 0.0) -> str | None:
        """If the child has exited (waiting up to ``timeout``): reap it, say how it ended."""
        if self.gone:
            return None
        self.process.join(timeout)
        code = self.process.exitcode
        if code is None:
            return None
        self.gone = True
        if self.results is not None:
            self.results.close()
        self._kill_action()  # an action the child could not clean up before it died
        self._stopped.set()
        self.process.close()
        with contextlib.suppress(OSError):
            os.close(self._bell)
        return describe_exit(code)

    def join_reader(self, timeout: float) -> None:
        self._stopped.set()
        self._reader.join(timeout)

    def release(self) -> None:
        """After reaping: close what is left (the crash-report pipe); once."""
        if self._crash >= 0:
            with contextlib.suppress(OSError):
                os.close(self._crash)
            self._crash = -1


def describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


@dataclass
class SeatHistory:
    """Restarts of one seat, for the crash-loop back-off."""

    restarts: int = 0
    loops: int = 0  # back-offs in a row, without a long enough run in between
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=CRASH_LIMIT))
    not_before: float = 0.0

    def record(self, now: float, started: float) -> float:
        """Note a restart; return how long to wait before the next start (0: at once)."""
        self.restarts += 1
        if now - started > CRASH_WINDOW:
            self.loops = 0  # it had been running fine: a new problem, not the same loop
        self.recent.append(now)
        # Once in a loop, every short run continues it: the back-offs themselves
        # spread the last CRASH_LIMIT restarts over more than CRASH_WINDOW.
        looping = len(self.recent) == CRASH_LIMIT and now - self.recent[0] < CRASH_WINDOW
        if self.loops > 0 or looping:
            self.loops += 1
            backoff = min(MAX_BACKOFF, 2.0 ** self.loops)
            self.not_before = now + backoff
            return backoff
        return 0.0


class ChildPool:
    """Converges the running children on the wanted specs."""

    def __init__(self, *, level: int, beat_interval: float,
                 on_message: Callable[[Child, object], None],
                 on_lost: Callable[[Child, str], None],
                 on_started: Callable[[Child], None] = lambda _c: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.level = level
        self.shared = CTX.RawArray("d", 1)
        self.shared[0] = beat_interval
        self.on_message = on_message
        self.on_lost = on_lost
        self.on_started = on_started
        self.clock = clock
        self.children: dict[int, Child] = {}
        self.dying: list[Child] = []  # killed or aborted, not reaped yet
        self.history: dict[int, SeatHistory] = {}
        self.stopping = False
        # What ``spawn`` builds: a test replaces it with a fake child (no process).
        self.child_factory: Callable[..., Child] = Child

    @property
    def beat_interval(self) -> float:
        return self.shared[0]

    @beat_interval.setter
    def beat_interval(self, value: float) -> None:
        self.shared[0] = value

    def get(self, seat: int) -> Child | None:
        child = self.children.get(seat)
        return child if child is not None and not child.gone else None

    def is_current(self, child: Child) -> bool:
        return self.children.get(child.seat) is child

    def sentinels(self) -> list[int]:
        return [c.sentinel for c in (*self.children.values(), *self.dying) if not c.gone]

    def all_ready(self, seats: list[int]) -> bool:
        return all((c := self.get(seat)) is not None and c.ready for seat in seats)

    def restarts(self, seat: int) -> int:
        history = self.history.get(seat)
        return history.restarts if history is not None else 0

    def waiting(self, seat: int) -> bool:
        history = self.history.get(seat)
        return history is not None and history.not_before > self.clock()

    def converge(self, wanted: dict[int, ChildSpec], hang_timeout: float,
                 reap: bool = True) -> None:
        """Reap the dead, abort the hung, replace what is missing or outdated.

        ``reap=False``: the caller knows no child exited since the last
        converge (no sentinel was readable), so the liveness check (a system
        call per child) is skipped; hangs, back-offs and reloads are handled.
        """
        now = self.clock()
        self._reap_dying(now, reap)
        for seat, child in list(self.children.items()):
            how = child.collect() if reap else None
            if how is not None:
                del self.children[seat]
                self.lost(child, f"died ({how})")
                self._retire(child)
                continue
            spec = wanted.get(seat)
            if spec is None or spec.key != child.key:
                del self.children[seat]
                child.kill()  # outdated by a reload: nothing in it worth waiting for
                self.dying.append(child)
                continue
            age = child.heartbeat_age()
            if age > hang_timeout:
                del self.children[seat]
                child.abort()
                self.dying.append(child)
                job = child.busy_with
                doing = f" while running {job.describe()}" if hasattr(job, "describe") else ""
                self.lost(child, f"stopped responding for {age:.1f} s{doing}; aborted")
        for seat, spec in wanted.items():
            if seat in self.children:
                continue
            history = self.history.setdefault(seat, SeatHistory())
            if now < history.not_before:
                continue
            self.spawn(spec)

    def _reap_dying(self, now: float, reap: bool = True) -> None:
        still = []
        for child in self.dying:
            if reap and child.collect() is not None:
                self._retire(child)
                continue
            if child.aborted_at is not None and now - child.aborted_at > ABORT_GRACE:
                child.kill()  # SIGABRT did not end it (stopped, or stuck in the kernel)
            still.append(child)
        self.dying = still

    @staticmethod
    def _retire(child: Child) -> None:
        """A reaped child: log where it was if it left a stack (SIGABRT, a fatal
        signal), then close what it left (every replacement has its own)."""
        report = child.crash_report()
        if report:
            log.error("%s (pid %d) was at: %s", child.role, child.pid, report)
        child.release()

    def replace(self, child: Child, why: str) -> None:
        """Kill a child that cannot go on (e.g. it sent something unreadable)."""
        if self.children.get(child.seat) is child:
            del self.children[child.seat]
            child.kill()
            self.dying.append(child)
            self.lost(child, why)

    def spawn(self, spec: ChildSpec) -> Child:
        child = self.child_factory(spec, self.shared, self.level, self.on_message)
        self.children[spec.seat] = child
        log.debug("started %s (pid %d)", spec.role, child.pid)
        self.on_started(child)
        return child

    def lost(self, child: Child, why: str) -> None:
        self.on_lost(child, why)
        if self.stopping:
            return
        history = self.history.setdefault(child.seat, SeatHistory())
        backoff = history.record(self.clock(), child.started)
        log.error("%s (pid %d) %s; %s", child.role, child.pid, why,
                  f"restarting in {math.ceil(backoff)} s (crash loop)" if backoff
                  else "restarting")

    def shutdown(self, grace: float) -> bool:
        """Stop every child (SIGTERM, then SIGKILL after ``grace``); True if all are reaped."""
        self.stopping = True
        children = [*self.children.values(), *self.dying]
        for child in children:
            child.terminate()
        deadline = time.monotonic() + grace
        for child in children:
            child.collect(max(0.0, deadline - time.monotonic()))
        for child in children:
            if not child.gone:
                log.warning("%s (pid %d) did not stop in %g s; killing it", child.role,
                            child.pid, grace)
                child.kill()
                child.collect(2.0)
            child.release()
        # Reader threads end within about half a second of their child; until
        # then they hold its queues (named semaphores the forkserver would
        # otherwise unlink under them as it exits).
        deadline = time.monotonic() + 2.0
        for child in children:
            child.join_reader(max(0.0, deadline - time.monotonic()))
        gone = all(child.gone for child in children)
        self.children.clear()
        self.dying.clear()
        return gone
