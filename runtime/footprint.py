"""Keep each process's address space (its VSZ in ps and top) near what it uses.

glibc gives each thread that allocates an arena of its own and reserves 64 MiB
of address space for it, and each thread a stack as large as RLIMIT_STACK
(8 MiB). The supervisor has a thread for each child it reads from and each
queue it writes to: measured at 1000 VMs, 6 arenas and 7 stacks made 430 of
its 474 MiB. None of it is memory in use, but operators read VSZ. Our threads
hold the GIL to do anything, so one arena serves them as well as many, and
they recurse little (pickling, libvirt's event callbacks).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

_M_ARENA_MAX = -8  # mallopt's parameter, from glibc's malloc.h
THREAD_STACK = 2 * 1024 * 1024


def limit_address_space() -> None:
    """For this process and what it forks: one malloc arena, small thread stacks.

    Call it before the process starts any thread.
    """
    threading.stack_size(THREAD_STACK)
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to set
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)
