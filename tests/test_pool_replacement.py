"""Replacing children, with real workers (forkserver), real shell actions, signals.

A hung child's leftovers never reach its replacement; replacing children any
number of times, however they went, leaves the supervisor no descriptor more.

The test drives ChildPool.converge itself, so it decides when the pool looks
at its children; every wait is a bounded poll on something observable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from vhostmd.runtime.child import GROUP, start_forkserver
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
        self.spec = WORKER
        # Added to the pool's clock: a test that replaces children quickly
        # moves it on, so the pool sees no crash loop and holds nothing back.
        self.skew = 0.0
        self.pool = ChildPool(level=logging.INFO, beat_interval=0.1,
                              on_message=lambda c, m: self.messages.put((c, m)),
                              on_lost=lambda c, why: self.lost.append(f"{c.pid} {why}"),
                              clock=lambda: time.monotonic() + self.skew)

    def converge(self, hang_timeout: float) -> None:
        self.pool.converge({0: self.spec}, hang_timeout)
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


@pytest.fixture(scope="module", autouse=True)
def forkserver() -> Iterator[None]:
    """The daemon's forkserver (what children run imported once): children start fast."""
    main = sys.modules["__main__"]
    saved = (getattr(main, "__spec__", None), getattr(main, "__file__", None))
    start_forkserver()
    yield
    main.__spec__ = saved[0]
    if saved[1] is not None:
        main.__file__ = saved[1]


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


def descriptors() -> dict[int, str]:
    """This process's open descriptors (the pool's supervisor here): number -> what."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            found[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
    return found


REPLACEMENTS = 60


def test_replacing_children_leaves_no_descriptor_behind(pool: Pool) -> None:
    """Issue 19, section 1: each replaced child used to leave a pipe open in the supervisor.

    A hung libvirt makes the supervisor replace workers again and again; each
    way a child is replaced (it died, a reload outdated it, it sent something
    unreadable) must leave the descriptor count where it was.
    """
    pool.spec = replace(WORKER, result_region=True)  # a worker's own memfd, as the daemon's

    def ready_other_than(old: object) -> Callable[[], object]:
        return lambda: ((c := pool.pool.get(0)) is not None and c is not old
                        and pool.said(c, "ready") and c)

    child = pool.until("worker 1 ready", ready_other_than(None))
    before = descriptors()
    for i in range(REPLACEMENTS):
        how = i % 3
        if how == 0:
            os.kill(child.pid, signal.SIGKILL)  # died
        elif how == 1:
            pool.spec = replace(pool.spec, key=("worker", i))  # a reload outdated it
        else:
            pool.pool.replace(child, "sent something unreadable")
        pool.skew += 60.0
        child = pool.until(f"replacement {i + 1} ready", ready_other_than(child))
    pool.until("every replaced child reaped", lambda: not pool.pool.dying)

    # Every old child's reader thread ends within a second of its child.
    def flat() -> bool:
        return len(descriptors()) <= len(before)

    try:
        wait_for(flat, 5, "the descriptor count back where it was")
    except AssertionError:
        after = descriptors()
        grown = sorted(v for k, v in after.items() if before.get(k) != v)
        raise AssertionError(f"{len(before)} descriptors before {REPLACEMENTS} replacements, "
                             f"{len(after)} after; new: {grown}") from None
