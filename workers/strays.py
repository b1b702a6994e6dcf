"""Processes an action left behind outside its process group, and how the worker ends them.

An action runs in its own process group, which is killed when it ends or
times out. A process that moved to a session of its own (``setsid``, a
daemonizing program) escapes that kill. A worker is therefore a *child
subreaper* (prctl PR_SET_CHILD_SUBREAPER): orphans of its actions are
re-parented to it instead of to init, so after each action it can find the
processes that were not there before and kill them, wherever they moved.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> None:
    with contextlib.suppress(AttributeError):
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def children() -> set[int]:
    """This process's children now (e.g. a libvirt ssh transport, or orphans it adopted).

    Read from /proc/self/task/*/children: a few small reads, where a scan of
    every process (psutil's children()) would cost milliseconds per action.
    """
    found: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError, ValueError), \
                open(f"/proc/self/task/{task}/children", "rb") as f:
            found.update(int(pid) for pid in f.read().split())
    return found


def kill_new(before: set[int], passes: int = 3) -> int:
    """SIGKILL descendants that were not there before; reap them. How many were killed."""
    killed = 0
    for _ in range(passes):  # a killed process's own children come to us next, as orphans
        new = children() - before
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        reap()
    reap()
    return killed


def reap() -> None:
    """Collect exited children (orphans re-parented to us are ours to wait for)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
