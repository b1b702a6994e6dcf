"""The child pool with real children (through the forkserver), driven directly.

A child that sends something the supervisor cannot read is replaced (not
left "busy" and deaf for ever); a child that stops beating gets SIGABRT and
the log shows where it hung, then it is replaced.
"""

from __future__ import annotations

import logging
import queue
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostmd.runtime.child import start_forkserver
from vhostmd.supervisor.pool import Child, ChildPool, ChildSpec, Unreadable

from daemon_harness import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the forkserver imports pool_children


@pytest.fixture(scope="module", autouse=True)
def forkserver() -> Iterator[None]:
    main = sys.modules["__main__"]
    saved = (getattr(main, "__spec__", None), getattr(main, "__file__", None))
    start_forkserver()
    yield
    main.__spec__ = saved[0]
    if saved[1] is not None:
        main.__file__ = saved[1]


class Recorder:
    def __init__(self) -> None:
        self.events: queue.SimpleQueue[tuple[Child, object]] = queue.SimpleQueue()
        self.lost: list[tuple[int, str]] = []

    def pool(self) -> ChildPool:
        return ChildPool(level=logging.INFO, beat_interval=0.1,
                         on_message=lambda c, m: self.events.put((c, m)),
                         on_lost=lambda c, why: self.lost.append((c.pid, why)))

    def next_unreadable(self, timeout: float) -> tuple[Child, Unreadable]:
        def found() -> tuple[Child, Unreadable] | None:
            while not self.events.empty():
                child, message = self.events.get_nowait()
                if isinstance(message, Unreadable):
                    return child, message
            return None

        return wait_for(found, timeout, "an unreadable message")


def test_a_child_whose_message_cannot_be_read_is_replaced() -> None:
    recorder = Recorder()
    pool = recorder.pool()
    spec = ChildSpec("talker", 0, "pool_children:send_unreadable", {}, ("talker",))
    try:
        pool.converge({0: spec}, hang_timeout=30)
        child, unreadable = recorder.next_unreadable(30)
        assert "this message cannot be read" in unreadable.why
        pool.replace(child, f"sent an unreadable message ({unreadable.why}); killed")
        assert recorder.lost and recorder.lost[0][0] == child.pid
        wait_for(lambda: child.collect() is not None or child.gone, 10, "the old child reaped")
        pool.converge({0: spec}, hang_timeout=30)
        replacement = pool.get(0)
        assert replacement is not None and replacement.pid != child.pid
    finally:
        pool.shutdown(2.0)


def test_a_hung_child_is_aborted_and_its_stack_logged(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    pool = recorder.pool()
    spec = ChildSpec("sleeper", 0, "pool_children:hang_without_beating_here", {}, ("s",))
    caplog.set_level(logging.ERROR, logger="vhostmd")
    try:
        pool.converge({0: spec}, hang_timeout=0.5)
        first = pool.get(0)
        assert first is not None

        def aborted() -> bool:
            pool.converge({0: spec}, hang_timeout=0.5)
            return any("was at:" in r.getMessage() for r in caplog.records)

        wait_for(aborted, 20, "the hung child's stack in the log")
        line = next(r.getMessage() for r in caplog.records if "was at:" in r.getMessage())
        assert line.startswith(f"sleeper (pid {first.pid}) was at: ")
        assert "pool_children.py" in line and "hang_without_beating_here" in line
        assert any("stopped responding" in why for _pid, why in recorder.lost)
        replacement = pool.get(0)
        assert replacement is not None and replacement.pid != first.pid
    finally:
        pool.shutdown(2.0)
