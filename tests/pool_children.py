"""Children for tests/test_pool.py: what the forkserver runs in those tests.

They misbehave on purpose: one sends a message the supervisor cannot
unpickle, one stops beating inside a function whose name the test looks for
in the stack the pool logs.
"""

from __future__ import annotations

import time

from vhostmd.runtime.child import ChildContext


def _explode() -> None:
    raise ValueError("this message cannot be read")


class Poison:
    """Pickles fine; unpickling it in the supervisor raises."""

    def __reduce__(self) -> tuple:
        return (_explode, ())


def send_unreadable(ctx: ChildContext) -> None:
    ctx.send(Poison())
    while not ctx.orphaned():
        ctx.beat()
        time.sleep(0.05)


def hang_without_beating_here(ctx: ChildContext) -> None:
    while not ctx.orphaned():
        time.sleep(0.05)  # never beats: the pool must abort it and log where it was
