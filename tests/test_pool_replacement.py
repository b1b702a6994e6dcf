"""A hung child and its replacement, with real workers (forkserver), real shell actions, signals.

The test drives ChildPool.converge itself, so it decides when the pool looks
at its children; every wait is a bounded poll on something observable.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from vhostmd.runtime.child import GROUP
from vhostmd.supervisor.pool import ChildPool, ChildSpec
from vhostmd.wire import JobResult, MetricDef, Ready, RunAction

from daemon_harness import alive, wait_for

WORKER = ChildSpec("worker 1", 0, "vhostmd.workers.worker:worker_main",
                   {"index": 1, "uri": None}, ("worker",))
EXEC_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
T = TypeVar("T")


class Pool:
    """A ChildPool whose messages and losses the test can wait for."""

    def __init__(self) -> None:
        self.messages: queue.SimpleQueue[tuple[object, object]] = queue.SimpleQueue()
        self.seen: list[tuple[object, object]] = []
        self.lost: list[str] = []
        self.pool = ChildPool(level=logging.INFO, beat_interval=0.1,
                              on_message=lambda c, m: self.messages.put((c, m)),
                              on_lost=lambda c, why: self.lost.append(f"{c.pid} {why}"))

    def converge(self, hang_timeout: float) -> None:
        self.pool.converge({0: WORKER}, hang_timeout)
        while True:
            try:
                self.seen.append(self.messages.get_nowait())
            except queue.Empty:
                return

    def said(self, child: object, kind: type | str) -> object | None:
        """The first message of type ``kind`` ("ready": Ready) ``child`` sent, if any."""
        wanted = Ready if kind == "ready" else kind
        for who, message in self.seen:
            if who is child and isinstance(message, wanted):  # type: ignore[arg-type]
                return message
        return None

    def until(self, what: str, predicate: Callable[[], T], hang_timeout: float = 30.0,
              timeout: float = 15.0) -> T:
        """Converge (as the supervisor's loop does) until ``predicate()`` holds."""
        def check() -> T:
            self.converge(hang_timeout)
            return predicate()

        return wait_for(check, timeout, what)


@pytest.fixture
def pool() -> Iterator[Pool]:
    rig = Pool()
    try:
        yield rig
    finally:
        for child in [*rig.pool.children.values(), *rig.pool.dying]:
            if not child.gone:
                os.kill(child.pid, signal.SIGCONT)
        rig.pool.shutdown(5.0)


def read_pid(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def action(job_id: int, command: str) -> RunAction:
    metric = MetricDef("Long", "uint32", "host", command)
    return RunAction(job_id, time.monotonic() + 60, metric, None, EXEC_PATH)


def test_a_dying_child_cannot_kill_its_replacements_action(pool: Pool, tmp_path: Path) -> None:
    """Issue 11, section 3: the hung child's leftovers must not reach its replacement."""
    old = pool.until("worker 1 ready",
                     lambda: (c := pool.pool.get(0)) is not None and pool.said(c, "ready") and c)
    old_pid, new_pid = tmp_path / "old.pid", tmp_path / "new.pid"
    # An action runs in a session (and process group) of its own: its shell's pid is the group.
    old.send(action(1, f"echo $$ > {old_pid}.tmp && mv {old_pid}.tmp {old_pid}; exec sleep 60"))
    old_group = int(pool.until("the old worker's action", lambda: read_pid(old_pid)))
    assert alive(old_group) and os.getpgid(old_group) == old_group

    # Hung: it stops beating. The pool aborts it and starts a replacement at once;
    # SIGABRT stays pending on a stopped process, so the old one lingers until
    # ABORT_GRACE has passed and it is SIGKILLed.
    os.kill(old.pid, signal.SIGSTOP)
    new = pool.until("a replacement", lambda: (c := pool.pool.get(0)) is not old and c,
                     hang_timeout=0.5)
    assert old in pool.pool.dying and not old.gone
    assert any(f"{old.pid} stopped responding" in why for why in pool.lost)
    pool.until("the replacement ready", lambda: pool.said(new, "ready"))
    flag = tmp_path / "flag"
    new.send(action(2, f"echo $$ > {new_pid}.tmp && mv {new_pid}.tmp {new_pid}; "
                       f"while [ ! -e {flag} ]; do sleep 0.02; done; echo 7"))
    new_group = int(pool.until("the replacement's action", lambda: read_pid(new_pid)))
    # The supervisor knows it as the replacement's (the group the pool would kill with it).
    pool.until("the group in the replacement's cell", lambda: new.cell[GROUP] == new_group)

    # The old child is killed and reaped (with its own action) ...
    pool.until("the old worker reaped", lambda: old.gone and old not in pool.pool.dying)
    # ... the replacement's action lives on ...
    assert alive(new_group), "the dead child's clean-up killed its replacement's action"
    # ... the old child's action does not (it was killed with its child) ...
    wait_for(lambda: not alive(old_group), 5, "the old worker's action to end")
    # ... and the replacement's metric arrives.
    flag.touch()
    result = pool.until("the replacement's result", lambda: pool.said(new, JobResult))
    assert isinstance(result, JobResult) and result.failures == ()
    assert b"<value>7</value>" in result.host
