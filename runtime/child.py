"""What a child process of the supervisor gets and runs on.

Children are started by multiprocessing's *forkserver*: a single-threaded
process, started by the supervisor before it runs any thread, with the
daemon's modules (libvirt included; lxml only where XML is parsed) already imported. The
supervisor itself runs threads (queue feeders, one outbox reader per child),
and forking a threaded process can leave a lock held for ever in the child;
the forkserver never has that problem, and its children share its imported
pages. Everything a child needs therefore travels by pickling: its queues,
its shared-memory cell and descriptors wrapped in ``InheritedFd``.

Each child gets:

- its own pair of queues (``inbox`` from the supervisor, ``outbox`` to it): a
  child killed mid-message only spoils its own pair;
- its own *cell*, two doubles in shared memory: the heartbeat stamp
  (CLOCK_MONOTONIC is system-wide) and the process group of the action it
  runs. A cell belongs to one child for its whole life, so whatever a dead
  child left in it can never touch its replacement;
- the beat interval, in an array all children share (a reload changes it);
- a *doorbell*: the supervisor writes a byte to it after each message, so a
  child that waits in ``select`` (virtio) wakes without reaching into the
  queue's private pipe;
- a *crash report* descriptor: on SIGABRT (sent by the supervisor to a child
  that stopped beating) ``faulthandler`` writes every thread's stack there,
  and the supervisor logs it before it kills the child.

Log records go to the supervisor over the outbox and are written by it, so a
child logs wherever the daemon logs (syslog, journal, file or stderr).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import faulthandler
import importlib
import logging
import logging.handlers
import multiprocessing
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import reduction
from queue import Empty
from typing import Any

import setproctitle

from vhostmd.runtime.privileges import RUN_AS_ENV, forbid_tracing
from vhostmd.wire import Ready

log = logging.getLogger("vhostmd")

CTX = multiprocessing.get_context("forkserver")

# Indexes into a child's cell.
BEAT, GROUP = 0, 1
CELL_SIZE = 2

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class InheritedFd:
    """A descriptor handed to a child: pickled as the descriptor itself (SCM_RIGHTS).

    Only picklable while a child is being started; in the child, ``fd`` is the
    child's own copy.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return (_rebuild_fd, (reduction.DupFd(self.fd),))

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _rebuild_fd(dup: Any) -> InheritedFd:
    return InheritedFd(dup.detach())


@dataclass
class ChildContext:
    """What a child's main function gets: its queues, its cell, its descriptors."""

    role: str
    seat: int
    inbox: Any  # multiprocessing Queue, supervisor -> child
    outbox: Any  # multiprocessing Queue, child -> supervisor
    cell: Any  # RawArray("d", CELL_SIZE)
    shared: Any  # RawArray("d", 1): the beat interval
    doorbell: InheritedFd
    crash_report: InheritedFd
    parent_pid: int = 0
    title_prefix: str = "vhostmd"
    _last_title: str = field(default="", repr=False)

    def beat(self) -> None:
        self.cell[BEAT] = time.monotonic()

    def set_action_group(self, pgid: int) -> None:
        """The process group of the action running now (0: none); killed with us."""
        self.cell[GROUP] = pgid

    @property
    def beat_interval(self) -> float:
        return self.shared[0]

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
            return self.inbox.get(timeout=timeout)
        except Empty:
            return None

    def send(self, message: object) -> None:
        self.outbox.put(message)

    def drain_doorbell(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self.doorbell.fd, 4096):
                pass

    def last_words(self) -> None:
        """Wait until what we sent has reached the pipe (before a hard exit)."""
        with contextlib.suppress(Exception):
            self.outbox.close()
            self.outbox.join_thread()


def release_free_memory() -> None:
    """Give freed heap pages back to the kernel after a burst of allocations.

    A cycle with 1000 VMs allocates (and frees) megabytes of small strings;
    glibc keeps such pages, so every process would sit at its busiest size.
    """
    with contextlib.suppress(AttributeError):  # not glibc: nothing to do
        _libc.malloc_trim(0)


# Pages given back are faulted in again by the next burst: at 1000 VMs that
# is a sixth of a cycle's CPU. Worth it only when they would sit unused for
# a while, as between cycles of the default 5 s period; at a 1 or 2 s period
# the next cycle reuses them at once.
TRIM_AFTER_IDLE = 2.0


class IdleTrim:
    """Calls release_free_memory once a process has been idle TRIM_AFTER_IDLE s after work."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.worked_at: float | None = None  # None: nothing freed since the last trim

    def worked(self) -> None:
        self.worked_at = self.clock()

    def wait(self, longest: float) -> float:
        """How long the caller may sleep (at most ``longest``) before ``poll`` is due."""
        if self.worked_at is None:
            return longest
        return max(0.0, min(longest, self.worked_at + TRIM_AFTER_IDLE - self.clock()))

    def poll(self) -> None:
        if self.worked_at is not None and self.clock() - self.worked_at >= TRIM_AFTER_IDLE:
            self.worked_at = None
            release_free_memory()


class _ToSupervisor(logging.Handler):
    """Sends each record, formatted and picklable, to the supervisor."""

    def __init__(self, ctx: ChildContext) -> None:
        super().__init__()
        self.ctx = ctx

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            copy = logging.makeLogRecord(record.__dict__)
            copy.msg, copy.args, copy.exc_info, copy.exc_text = message, None, None, None
            copy.role = self.ctx.role
            self.ctx.send(copy)
        except Exception:
            self.handleError(record)


def _let_go_of_helpers() -> None:
    """Close this child's end of the pipe that keeps the forkserver alive.

    The forkserver hands every child the write end of its keep-alive pipe,
    and runs until every write end is closed; with the children holding it,
    a supervisor killed outright (SIGKILL, the OOM killer) left the
    forkserver and every child running, and the disk locked. Without it, the
    supervisor's death closes the last write end: the forkserver exits,
    which kills its children (PDEATHSIG) and unlinks the queues' semaphores.
    """
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        with contextlib.suppress(OSError):
            os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None


def _setup(ctx: ChildContext) -> None:
    with contextlib.suppress(AttributeError):
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Inherited from the forkserver already; a child holds root's descriptors
    # (the disk, the channels), so it makes sure (runtime/privileges.py).
    forbid_tracing()
    # Our parent is the forkserver, which exits when the supervisor does: then
    # the kernel kills us too (PDEATHSIG above), even after a SIGKILL.
    _let_go_of_helpers()
    ctx.parent_pid = os.getppid()
    if ctx.parent_pid == 1:
        os._exit(1)
    # Our own process group keeps a terminal's Ctrl-C (or a hang-up) for the
    # supervisor alone; shutdown is its job, it tells us with SIGTERM.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    os.set_blocking(ctx.doorbell.fd, False)
    faulthandler.enable(file=ctx.crash_report.fd, all_threads=True)
    root = logging.getLogger("vhostmd")
    root.handlers.clear()
    root.addHandler(_ToSupervisor(ctx))
    root.propagate = False


def child_main(target: str, kwargs: dict[str, Any], ctx: ChildContext, level: int) -> None:
    """Entry point of every child: ``target`` is "module:function", called with ctx."""
    _setup(ctx)
    logging.getLogger("vhostmd").setLevel(level)
    ctx.beat()
    ctx.send(Ready())
    module, _, function = target.partition(":")
    try:
        main = getattr(importlib.import_module(module), function)
        main(ctx, **kwargs)
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:
        ctx.last_words()
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    except Exception:
        log.exception("%s crashed", ctx.role)
        ctx.last_words()
        os._exit(1)
    ctx.last_words()
    os._exit(0)


def serve(ctx: ChildContext, handle: Any, idle_title: str) -> None:
    """The receive loop of a child that answers one message at a time.

    Beats while it waits; gives the freed heap back once it has been idle
    for a while after a burst of work (see IdleTrim).
    """
    ctx.title(idle_title)
    trim = IdleTrim()
    while not ctx.orphaned():
        ctx.beat()
        message = ctx.receive(trim.wait(ctx.beat_interval))
        if message is None:
            trim.poll()
            continue
        ctx.drain_doorbell()
        handle(message)
        trim.worked()
        ctx.title(idle_title)


# The directory multiprocessing puts the forkserver's socket in, when we chose it:
# "vhostmd-mp-PID-XXXXXXXX" in TMPDIR, PID the supervisor's. The queues'
# semaphores are named after it (_semaphores_named_after).
_HELPERS_DIR_PREFIX = "vhostmd-mp-"
_LEFTOVER = re.compile(r"(?:sem\.)?vhostmd-mp-([1-9]\d{0,9})-")


class ForkserverUnavailable(Exception):
    """The forkserver could not be started; str() is one line."""


def start_forkserver(run_as: tuple[str, int, int] | None = None) -> None:
    """Start the process children are forked from; call before any thread exists.

    With ``run_as`` (user, uid, gid; -u), call it as root before dropping
    privileges: the forkserver starts as root and becomes that user itself
    before it imports anything of ours (runtime/privileges.py), and its
    socket is given to the user so that the supervisor, by then that user
    too, can connect to it.
    """
    from multiprocessing import forkserver, process, util

    # multiprocessing re-runs the parent's main script (or module, with -m)
    # in every child it starts, to find functions defined there, unless
    # __main__ has neither a spec nor a file.
    # Ours is the launcher: re-running it would import the supervisor, and
    # all it imports, into every child. Children need nothing from it.
    main = sys.modules["__main__"]
    main.__spec__ = None
    if hasattr(main, "__file__"):
        del main.__file__
    # The forkserver listens on a socket in a temporary directory that
    # multiprocessing removes when the supervisor exits normally. A directory
    # of our own instead: the forkserver removes it when it exits, so a
    # supervisor killed outright leaves nothing behind in /tmp either
    # (``clean_up_at_forkserver_exit``).
    config = process.current_process()._config
    if config.get("tempdir") is None:
        remove_leftovers(tempfile.gettempdir(), _SEMAPHORE_DIR,
                         {os.geteuid()} | ({run_as[1]} if run_as is not None else set()))
        config["tempdir"] = tempfile.mkdtemp(prefix=f"{_HELPERS_DIR_PREFIX}{os.getpid()}-")
        # Only then: the forkserver sweeps semaphores named after a directory of ours.
        _semaphores_named_after(config["tempdir"])
    CTX.set_forkserver_preload([PRELOAD])
    if run_as is not None:
        user, uid, gid = run_as
        os.environ[RUN_AS_ENV] = f"{user}:{uid}:{gid}"
    try:
        with _helpers_started_as_ours():
            forkserver.ensure_running()
    except OSError as exc:
        # A socket path longer than AF_UNIX allows (a long TMPDIR), a full
        # or read-only temporary directory: one line, not a traceback.
        raise ForkserverUnavailable(
            f"cannot start the forkserver (its socket goes in {config['tempdir']}): "
            f"{exc.strerror or exc}; set TMPDIR to a short, writable directory") from None
    finally:
        os.environ.pop(RUN_AS_ENV, None)
    if run_as is not None:
        # The listener's directory (private, 0700) and socket: the supervisor
        # connects for every child it starts, as the user.
        address = forkserver._forkserver._forkserver_address  # type: ignore[attr-defined]
        for path in (util.get_temp_dir(), address):
            os.chown(path, uid, gid)


def _semaphores_named_after(helpers_dir: str) -> None:
    """Name the queues' semaphores after the forkserver's directory; start no resource tracker.

    A multiprocessing queue has three named POSIX semaphores (files in
    /dev/shm), which a child opens by name. multiprocessing would start a
    *resource tracker* to unlink them should the supervisor die: a Python
    interpreter of its own, the daemon's largest process after the children
    (7.6 MiB of PSS measured at 1000 VMs), and root's under -u. The
    forkserver outlives the supervisor just as well and unlinks them as it
    exits (``_remove_semaphores``): their names start with its directory's
    (random) name, and it knows that name. multiprocessing unlinks each
    queue's semaphores itself when the queue is freed or the supervisor
    exits. Its tracker is pointed at /dev/null, so none is started: its
    liveness probe writes there and succeeds.
    """
    from multiprocessing import process, resource_tracker

    process.current_process()._config["semprefix"] = "/" + os.path.basename(helpers_dir)
    tracker = resource_tracker._resource_tracker
    if tracker._fd is None:
        tracker._fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


# Where glibc keeps a named semaphore "/NAME": /dev/shm/sem.NAME.
_SEMAPHORE_DIR = "/dev/shm"


def _remove_semaphores(helpers_dir: str) -> None:
    """In the forkserver, as it exits: unlink the semaphores the supervisor left.

    Those of a supervisor killed outright; after a clean stop none is left.
    Processes that still have one open keep it: unlinking only removes the
    name.
    """
    start = f"sem.{os.path.basename(helpers_dir)}-"
    for name, path, st in _owned_entries(_SEMAPHORE_DIR, {os.geteuid()}):
        if name.startswith(start) and stat.S_ISREG(st.st_mode):
            with contextlib.suppress(OSError):
                os.unlink(path)


def _owned_entries(folder: str, owners: set[int]) -> Iterator[tuple[str, str, os.stat_result]]:
    """The entries of ``folder`` that ``owners`` own, not followed if links: in a
    world-writable directory (/tmp, /dev/shm) only those can be ours."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid in owners:
            yield name, path, st


def remove_leftovers(tmp: str, shm: str, owners: set[int]) -> None:
    """Remove what daemons that died with their forkserver left: its directory in
    ``tmp``, the queues' semaphores in ``shm``.

    A daemon killed whole at once (systemd's last SIGKILL after its stop
    timeout, ``systemctl kill -s KILL``) has no process left to clean up.
    Its leftovers carry its supervisor's pid: those of a pid that no longer
    runs are removed, when ``owners`` (our users) own them. Those of a pid
    that runs are kept, whatever runs under it now. A directory loses only
    the forkserver's socket, then goes if that left it empty.

    Pids are this namespace's: a daemon in another pid namespace that shares
    ``tmp`` or ``shm`` with us would look dead (containers have their own).
    """
    for folder in (tmp, shm):
        for name, path, st in _owned_entries(folder, owners):
            found = _LEFTOVER.match(name)
            if found is None or _runs(int(found.group(1))):
                continue
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(st.st_mode):
                    _remove_helpers_socket_dir(path)
                elif stat.S_ISREG(st.st_mode):
                    os.unlink(path)


def _remove_helpers_socket_dir(path: str) -> None:
    """Remove the forkserver's socket (``listener-*``) in ``path``, then ``path`` if empty.

    Never more: under -u the directory is the user's, and root removes only
    what the daemon put there."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for entry in os.listdir(fd):
            st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            if entry.startswith("listener-") and stat.S_ISSOCK(st.st_mode):
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)  # fails, and leaves it, if anything else is in it


def _runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # another user's: it runs (or no pid at all: left alone)
    return True


# The forkserver's preload (runtime/forkserver.py).
PRELOAD = "vhostmd.runtime.forkserver"

# What multiprocessing runs with ``python3 -c`` to start the forkserver.
_FORKSERVER_PROGRAM = "from multiprocessing.forkserver import main"


def forkserver_program(program: str, path: list[str]) -> str:
    """The forkserver's ``-c`` program, made to import our preload.

    Python 3.11's forkserver is handed the supervisor's ``sys.path`` and
    ignores it; the interpreter's flags (``-I`` of the Debian launcher) keep
    PYTHONPATH out too. So in the installed package, whose modules live in a
    private directory, the preload could not be imported, and multiprocessing
    swallows that ImportError: no libvirt or lxml shared by the children, no
    gc.freeze, and a 300-character ``python3 -I -c ...`` in ``ps``. It gets
    the supervisor's path first (its ``vhostmd: forkserver`` title comes from
    the preload, so that the title says the preload ran).
    """
    if not program.startswith(_FORKSERVER_PROGRAM):
        return program
    return f"import sys; sys.path[:] = {path!r}\n" + program


@contextlib.contextmanager
def _helpers_started_as_ours() -> Any:
    """While the forkserver starts: run its program through forkserver_program.

    multiprocessing starts it with ``util.spawnv_passfds(exe, args, fds)``,
    ``args`` ending in ``-c PROGRAM``; that call is wrapped for the duration.
    """
    from multiprocessing import util

    original = util.spawnv_passfds

    def spawn(path: Any, args: Any, passfds: Any) -> int:
        args = list(args)
        if len(args) >= 2 and args[-2] == "-c":
            args[-1] = forkserver_program(args[-1], list(sys.path))
        return original(path, args, passfds)

    util.spawnv_passfds = spawn
    try:
        yield
    finally:
        util.spawnv_passfds = original


def clean_up_at_forkserver_exit() -> None:
    """In the forkserver: register what it does as it exits.

    It exits when the supervisor has stopped it (every child already gone),
    or when the supervisor died (its keep-alive pipe reads EOF). Then it ends
    what is left below it, actions included (``_end_children_and_actions``),
    and removes its socket and directory and the queues' semaphores left in
    /dev/shm (``_remove_helpers_dir``).
    Children are forked from the forkserver and inherit the registration;
    they leave with os._exit, which runs no exit handler.
    """
    atexit.register(_remove_helpers_dir)
    atexit.register(_end_children_and_actions)  # runs first: last registered


def _children_of(pid: int) -> set[int]:
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError), \
                    open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                found.update(int(child) for child in f.read().split())
    return found


def _end_children_and_actions() -> None:
    """Kill every child still there, and what each runs: shell actions and their groups.

    Children would die with the forkserver anyway (PDEATHSIG), but a worker's
    shell action runs in a session of its own and would outlive its worker:
    the supervisor that kills an action's group is gone. Each child is
    stopped first, so that it starts nothing meanwhile; then what runs below
    it (an action leads its own process group; an orphan the worker adopted
    as subreaper is its child too) is killed, then the child.
    """
    children = _children_of(os.getpid())
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGSTOP)
    for pid in children:
        for below in _children_of(pid):
            with contextlib.suppress(OSError):
                os.killpg(below, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(below, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _remove_helpers_dir() -> None:
    """The forkserver's socket and directory, if ``start_forkserver`` made the directory
    (multiprocessing removes its own), and the semaphores named after it."""
    from multiprocessing import forkserver

    address = forkserver._forkserver._forkserver_address
    if not isinstance(address, str) or not address.startswith("/"):
        return  # an abstract socket: nothing on disk
    folder = os.path.dirname(address)
    if not os.path.basename(folder).startswith(_HELPERS_DIR_PREFIX):
        return
    _remove_semaphores(folder)
    with contextlib.suppress(OSError):
        os.unlink(address)
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def stop_forkserver() -> None:
    """At shutdown, after every child is gone: stop the forkserver.

    It would end on its own right after the supervisor, but as an orphan: an
    init that does not reap (a container) keeps it as a zombie, and an init
    script waiting for every process of the daemon waits for it. So the
    supervisor stops and reaps it itself, with the function multiprocessing
    uses for that in its own tests; where a Python lacks it, the forkserver
    still ends on its own.
    """
    from multiprocessing import forkserver, process

    # The forkserver removes its socket as it exits, so multiprocessing's
    # own removal after it may find nothing there: ignored, as any failure.
    with contextlib.suppress(Exception):
        forkserver._forkserver._stop()  # type: ignore[attr-defined]
    folder = process.current_process()._config.get("tempdir")
    if folder is not None and os.path.basename(folder).startswith(_HELPERS_DIR_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)
        # multiprocessing has unlinked every queue's semaphores by now (its
        # finalizers run before this one); should one have been missed, it
        # goes here, as the forkserver would remove it.
        _remove_semaphores(folder)


# The libraries the forkserver imports for the children, besides our own packages.
_CHILD_LIBRARIES = ("libvirt", "lxml", "psutil", "setproctitle")


def unreadable_by_us() -> str | None:
    """Why this process (e.g. after dropping root) could not import what children run.

    The forkserver starts as the daemon's user and imports the children's
    modules itself; a tree that user cannot read would leave every child
    failing at start. None when everything is readable.
    """
    import importlib.util

    places = {os.path.dirname(m.__file__) for name, m in list(sys.modules.items())
              if name.split(".")[0] == "vhostmd" and getattr(m, "__file__", None)}
    for place in sorted(places):
        if not os.access(place, os.R_OK | os.X_OK):
            return f"cannot read {place}"
    for name in _CHILD_LIBRARIES:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None)
        if origin is None:
            try:
                spec = importlib.util.find_spec(name)
            except Exception:
                spec = None
            origin = getattr(spec, "origin", None)
            if origin is None:
                return f"cannot find the {name} module"
        if not os.access(os.path.dirname(origin), os.R_OK | os.X_OK):
            return f"cannot read {os.path.dirname(origin)}"
    return None
