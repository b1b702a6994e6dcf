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
import time

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


def kill_new(before: set[int], passes: int = 5,
             settle: float = 1.0) -> tuple[set[int], set[int]]:
    """SIGKILL descendants that were not there before, and reap them.

    Returns (the pids killed, the pids that are still there: not ours to
    kill, or not dead within ``settle`` seconds). Each pass waits for what it
    killed to be gone, so that their own children have come to us (as
    orphans) when the next pass looks.
    """
    killed: set[int] = set()
    stuck: set[int] = set()
    deadline = time.monotonic() + settle
    for _ in range(passes):
        new = children() - before - stuck
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            except PermissionError:
                stuck.add(pid)
                continue
            if not _zombie(pid):
                killed.add(pid)
        _reap_until_gone(new - stuck, deadline)
    reap()
    return killed, stuck | (children() - before - killed)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b") ")[2][:1] == b"Z"
    except OSError:
        return True


def _reap_until_gone(pids: set[int], deadline: float) -> None:
    """Wait (until ``deadline``) for our children ``pids`` to exit, reaping them."""
    left = set(pids)
    while left:
        for pid in list(left):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                left.discard(pid)
        if not left or time.monotonic() >= deadline:
            return
        time.sleep(0.002)


def wait_group_gone(pgid: int, timeout: float = 1.0) -> None:
    """Wait until no process of group ``pgid`` (killed) is left, reaping those that are ours.

    Each one that exits hands its children (an action's escapes among them)
    to us: only then does a look at our children find them all.
    """
    deadline = time.monotonic() + timeout
    while True:
        reap()
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.002)


def reap() -> None:
    """Collect exited children (orphans re-parented to us are ours to wait for)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
