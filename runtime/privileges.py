"""Keeping the -u user away from the daemon's processes.

With ``-u USER`` every process of the daemon runs as USER, yet holds what
root opened: the metrics disk (read-write), the virtio channels. A process
USER could trace (ptrace, /proc/PID/mem, pidfd_getfd) would hand those to
any process USER runs. So none may be traceable by USER:

- The supervisor and every child are marked not dumpable
  (prctl PR_SET_DUMPABLE 0): the kernel then allows ptrace, /proc/PID/mem,
  /proc/PID/fd and pidfd_getfd only to root. Children are forked from the
  forkserver and inherit the mark; each sets it again all the same.
- The forkserver is a new program (exec), and exec makes a process of USER
  dumpable again: started as USER it could be traced, or its memory opened,
  in the moment before it marks itself. So it is started as root and drops
  to USER itself, first thing (``drop_in_forkserver``, its first preload):
  USER can attach to no process of root's, and a process that changes its
  user is not dumpable from that moment (fs.suid_dumpable 0, Linux's
  default; otherwise the mark follows a few instructions later).

No process of the daemon stays root's: multiprocessing's resource tracker,
which would, is not started (``runtime/child.py``). Shell actions are new
programs run as USER: USER may trace them, as it may change anything else an
action of its own reads.
"""

from __future__ import annotations

import ctypes
import os
import sys

_PR_SET_DUMPABLE = 4
_libc = ctypes.CDLL(None, use_errno=True)

# The user the forkserver drops to, "name:uid:gid"; set only while it starts.
RUN_AS_ENV = "VHOSTMD_FORKSERVER_RUN_AS"


def forbid_tracing() -> None:
    """Mark this process not dumpable: only root may trace it or read its memory and fds."""
    if _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def traced_by() -> int:
    """The pid of the process tracing this one (0: none)."""
    with open("/proc/self/status", encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def drop_in_forkserver() -> None:
    """In the forkserver, started as root for -u: become the user, untraceable; or exit."""
    wanted = os.environ.pop(RUN_AS_ENV, None)
    if not wanted:
        forbid_tracing()
        return
    name, uid, gid = wanted.rsplit(":", 2)
    try:
        os.initgroups(name, int(gid))
        os.setgid(int(gid))
        os.setuid(int(uid))
        forbid_tracing()
        if os.getuid() == 0 or os.geteuid() == 0 or traced_by() != 0:
            raise OSError("still root, or traced, after switching users")
    except OSError as exc:
        # Never serve children as root, nor traced: the supervisor's children
        # then fail to start, and it says so.
        print(f"vhostmd: forkserver: cannot switch to user {name}: {exc}", file=sys.stderr)
        os._exit(1)
