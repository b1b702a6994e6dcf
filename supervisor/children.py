"""Child processes of the supervisor: their queues, start-up, heartbeat and death.

Every child (worker, disk-writer, virtio) gets its own pair of
multiprocessing queues. A shared queue would let one child killed while it
holds the queue's lock (or is half-way through a message) starve every other
child; a private pair is simply thrown away with the child it belonged to.

The supervisor reads each child's outbox in a small reader thread that turns
messages into events for the main loop and wakes it through the self-pipe, so
a child that stops mid-message can never block the main loop. After the fork
the supervisor closes its copies of the pipe ends it does not use: a dead
child then shows up as end-of-file, and writes to it fail instead of blocking.

Heartbeats are timestamps (CLOCK_MONOTONIC is system-wide) that each child
writes into its slot of a shared array; the supervisor replaces a child whose
stamp gets too old.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.queues
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import SynchronizedArray
from queue import Empty
from typing import Any

import setproctitle

log = logging.getLogger("vhostmd")

# fork keeps children cheap (shared pages, no re-import) and lets them start
# in milliseconds when they are replaced. It is safe here because a child
# touches nothing but its own queues and the heartbeat arrays.
CTX = multiprocessing.get_context("fork")

_PR_SET_PDEATHSIG = 1


class ChildQueue(multiprocessing.queues.Queue):
    """A queue between the supervisor and exactly one child."""

    def __init__(self) -> None:
        super().__init__(ctx=CTX)
        # Never wait at exit for the feeder thread to flush into a dead child.
        self.cancel_join_thread()
        # A write into a dead child's pipe is expected, not an error to print.
        self._ignore_epipe = True

    def close_read_end(self) -> None:
        with contextlib.suppress(OSError):
            self._reader.close()  # type: ignore[attr-defined]

    def close_write_end(self) -> None:
        with contextlib.suppress(OSError):
            self._writer.close()  # type: ignore[attr-defined]

    @staticmethod
    def _on_queue_feeder_error(e: BaseException, obj: object) -> None:
        log.debug("dropped a message for a child that is gone: %s", e)


class ChildLink:
    """The two queues between the supervisor and one child."""

    def __init__(self) -> None:
        self.inbox = ChildQueue()  # supervisor -> child
        self.outbox = ChildQueue()  # child -> supervisor

    def parent_side(self) -> None:
        self.inbox.close_read_end()
        self.outbox.close_write_end()

    def child_side(self) -> None:
        self.inbox.close_write_end()
        self.outbox.close_read_end()
        # A child's last words (why it exits) must reach the supervisor: let
        # exit wait for the outbox feeder thread to flush.
        self.outbox._joincancelled = False  # type: ignore[attr-defined]

    def send(self, message: object) -> None:
        # Closed after the child died: nothing to deliver, nothing to report.
        with contextlib.suppress(ValueError, OSError):
            self.inbox.put(message)


@dataclass
class ChildContext:
    """What a child's main function gets: its queues, its heartbeat slot."""

    role: str
    slot: int
    link: ChildLink
    heartbeats: SynchronizedArray
    action_groups: SynchronizedArray
    parent_pid: int
    title_prefix: str = "vhostmd"
    _last_title: str = field(default="", repr=False)

    def beat(self) -> None:
        self.heartbeats[self.slot] = time.monotonic()

    @property
    def beat_interval(self) -> float:
        """How often to beat: the supervisor keeps it in the array's last slot."""
        return self.heartbeats[len(self.heartbeats) - 1]

    def title(self, text: str) -> None:
        """Set what `ps` shows: say what this process is doing now."""
        if text != self._last_title:
            self._last_title = text
            setproctitle.setproctitle(f"{self.title_prefix}: {text}")

    def orphaned(self) -> bool:
        return os.getppid() != self.parent_pid

    def receive(self, timeout: float) -> Any:
        """Next message from the supervisor, or None after ``timeout`` seconds."""
        try:
            return self.link.inbox.get(timeout=timeout)
        except Empty:
            return None

    def send(self, message: object) -> None:
        self.link.outbox.put(message)


_libc = ctypes.CDLL(None, use_errno=True)


def release_free_memory() -> None:
    """Give freed heap pages back to the kernel after a cycle's burst of allocations.

    A cycle with 1000 VMs allocates (and frees) megabytes of small strings; glibc
    keeps such pages, so every process would sit at its busiest cycle's size.
    """
    with contextlib.suppress(AttributeError):  # not glibc: nothing to do
        _libc.malloc_trim(0)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies (even by SIGKILL)."""
    with contextlib.suppress(AttributeError):
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _child_bootstrap(
    target: Callable[[ChildContext], None], ctx: ChildContext, close_fds: list[int]
) -> None:
    _die_with_parent()
    if ctx.orphaned():  # the supervisor died between fork and prctl
        os._exit(1)
    # Shutdown is the supervisor's job: it tells us (SIGTERM) in its own order.
    # Our own process group keeps a terminal's Ctrl-C (or a hang-up) for the
    # supervisor alone, without ignoring signals that actions would inherit.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    for fd in close_fds:  # pid file lock, self-pipe: the supervisor's alone
        with contextlib.suppress(OSError):
            os.close(fd)
    ctx.link.child_side()
    ctx.beat()
    try:
        target(ctx)
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("%s crashed", ctx.role)
        os._exit(1)


class Child:
    """One running child process as the supervisor sees it."""

    def __init__(
        self,
        role: str,
        slot: int,
        target: Callable[[ChildContext], None],
        heartbeats: SynchronizedArray,
        action_groups: SynchronizedArray,
        on_message: Callable[[Child, object], None],
        close_fds: list[int],
    ) -> None:
        self.role = role
        self.slot = slot
        self.link = ChildLink()
        self.heartbeats = heartbeats
        self.action_groups = action_groups
        self.started = time.monotonic()
        self.gone = False
        self.busy_with: object = None  # the job a worker is running, for the supervisor
        self.spec_key: tuple = ()  # what it was started for; a change means replace it
        heartbeats[slot] = self.started
        action_groups[slot] = 0
        ctx = ChildContext(role, slot, self.link, heartbeats, action_groups, os.getpid())
        self.process = CTX.Process(
            target=_child_bootstrap, args=(target, ctx, close_fds), name=role, daemon=False
        )
        # Frozen objects are never visited by the child's garbage collector, so
        # the pages it shares with the supervisor stay shared (lower PSS).
        gc.freeze()
        try:
            self.process.start()
        finally:
            gc.unfreeze()
        self.pid: int = self.process.pid or 0  # kept: the Process object is closed on reap
        self.link.parent_side()
        self._reader = threading.Thread(
            target=self._pump, args=(on_message,), name=f"read-{role}", daemon=True
        )
        self._reader.start()

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def _pump(self, on_message: Callable[[Child, object], None]) -> None:
        while True:
            try:
                message = self.link.outbox.get()
            except (EOFError, OSError, ValueError):
                return  # the child is gone; its sentinel tells the main loop
            except Exception as exc:  # a torn message from a child killed mid-write
                log.debug("%s: unreadable message: %s", self.role, exc)
                return
            on_message(self, message)

    def heartbeat_age(self) -> float:
        return time.monotonic() - self.heartbeats[self.slot]

    def send(self, message: object) -> None:
        self.link.send(message)

    def kill(self) -> None:
        """SIGKILL the child and any action process group it was running."""
        if self.gone:
            return
        group = self.action_groups[self.slot]
        if group > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
            self.action_groups[self.slot] = 0
        if self.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def terminate(self) -> None:
        if not self.gone and self.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)

    def collect(self, timeout: float = 0.0) -> str | None:
        """If the child has exited (waiting up to ``timeout``): reap it, say how it ended."""
        if self.gone:
            return None
        self.process.join(timeout)
        code = self.process.exitcode
        if code is None:
            return None
        self.gone = True
        group = self.action_groups[self.slot]
        if group > 0:  # an action the child could not clean up before it died
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
            self.action_groups[self.slot] = 0
        self.process.close()
        return describe_exit(code)


def describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"
