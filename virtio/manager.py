"""The virtio process: every running VM's virtio-serial channel, in one event loop.

QEMU listens on one unix socket per VM (``<channel_path>/<id>-<name>/`` or, with
older libvirt, ``<channel_path>/domain-<id>-<name>/``, socket
``org.github.vhostmd.1``); this process connects to each and answers the
guest's requests with the host fragment plus that VM's own fragment, as fed by
the supervisor each cycle (see :mod:`vhostmd.protocol` for the framing).

Which channels are served: a directory is matched to a VM by its **id** only
(libvirt truncates names). A channel is connected only while its VM is
*current*: listed by libvirt in a metrics message less than
``expiration_time`` seconds ago. So nothing is connected before the first
metrics message, a directory whose id matches no running VM is never served,
and the channel of a VM that stops getting metrics updates is closed once it
expires. A channel that hangs up (or errs) is forgotten; the directory scan
(every ``SCAN_INTERVAL`` s and right after each metrics message) connects it
again when its socket is back. At most ``max_channels`` channels are open; a
VM beyond that is refused with one log line and admitted once room frees up.

Serving one channel (buffers, rate limit, framing) is ``vhostmd.virtio.channel``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import resource
import selectors
import socket
import time

from vhostmd.logtext import loggable
from vhostmd.protocol import CHANNEL_NAME, build_response
from vhostmd.runtime.child import ChildContext, IdleTrim
from vhostmd.runtime.published import SharedSlots, VmFragments
from vhostmd.virtio.channel import THROTTLED, Channel, ChannelClosed
from vhostmd.wire import VirtioStatus, VirtioTaken

log = logging.getLogger("vhostmd")

SCAN_INTERVAL = 1.0  # seconds between directory scans (also: expiry checks)
# sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 108
CHANNEL_DIR = re.compile(r"(?:domain-)?(\d{1,9})-(.+)\Z", re.DOTALL)
_PROC_FD = "/proc/self/fd"


class ChannelManager:
    """All virtio channels of this host, served from one selector."""

    def __init__(self, channel_paths: tuple[str, ...], max_channels: int,
                 expiration_time: float) -> None:
        self.channel_paths = channel_paths
        self.max_channels = max_channels
        self.expiration_time = expiration_time
        self.selector = selectors.DefaultSelector()
        self.channels: dict[int, Channel] = {}
        self.known = 0  # channel directories of current VMs found by the last scan
        self.last_seen: dict[int, float] = {}  # VM id -> when a metrics message listed it
        self.names: dict[int, str] = {}  # VM id -> its name, as libvirt listed it
        self.host_fragment: bytes | None = None
        self.vm_fragments: VmFragments | dict[int, bytes] = {}
        self.responses: dict[int, bytes] = {}  # built lazily, once per VM per cycle
        self.throttled: dict[int, Channel] = {}
        self.refused: set[int] = set()  # VMs refused for max_channels (logged once)
        # VM id -> channel directory -> the problem connecting to it (logged once per change)
        self.connect_problems: dict[int, dict[str, str]] = {}
        self.path_problems: dict[str, str] = {}  # channel paths that cannot be scanned
        self.untrusted: dict[str, str] = {}  # channel directories refused, and why (logged once)
        self.long_path_ok = os.path.isdir(_PROC_FD)

    # -- metrics from the supervisor ------------------------------------------

    def update_metrics(self, host_fragment: bytes,
                       vm_fragments: VmFragments | dict[int, bytes],
                       domains: tuple[tuple[int, str], ...], now: float) -> None:
        self.host_fragment = host_fragment
        self.vm_fragments = vm_fragments
        self.responses.clear()
        for vm_id, name in domains:
            self.last_seen[vm_id] = now
            self.names[vm_id] = name

    def response_for(self, vm_id: int) -> bytes:
        response = self.responses.get(vm_id)
        if response is None:
            # After the first metrics message a VM without metrics of its own
            # (none configured, or all left out) gets none, not "not yet".
            vm_fragment = self.vm_fragments.get(vm_id)
            if vm_fragment is None and self.host_fragment is not None:
                vm_fragment = b""
            response = build_response(self.host_fragment, vm_fragment)
            self.responses[vm_id] = response
        return response

    def is_current(self, vm_id: int, now: float) -> bool:
        seen = self.last_seen.get(vm_id)
        return seen is not None and now - seen <= self.expiration_time

    # -- discovery and expiry -------------------------------------------------

    def scan(self) -> dict[int, list[tuple[str, str]]]:
        """Channel directories under every channel path: VM id -> [(directory, name)].

        A VM can have more than one (a stale directory left in the other
        libvirt location, both naming schemes): each is tried in turn.
        """
        found: dict[int, list[tuple[str, str]]] = {}
        for base in self.channel_paths:
            try:
                entries = os.scandir(base)
            except OSError as exc:
                problem = exc.strerror or str(exc)
                if self.path_problems.get(base) != problem:
                    self.path_problems[base] = problem
                    # A missing default path is normal (only one libvirt layout is in use).
                    level = logging.DEBUG if exc.errno == errno.ENOENT else logging.WARNING
                    log.log(level, "cannot scan channel path %s: %s", base, problem)
                continue
            if self.path_problems.pop(base, None) is not None:
                log.info("scanning channel path %s", base)
            with entries:
                try:
                    base_st = os.stat(base)
                except OSError:
                    continue
                for entry in entries:
                    match = CHANNEL_DIR.match(entry.name)
                    if match is None:
                        continue
                    with contextlib.suppress(OSError):
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        if not self.trusted(entry.path, entry.stat(follow_symlinks=False),
                                            base, base_st):
                            continue
                        found.setdefault(int(match.group(1)), []).append(
                            (entry.path, match.group(2)))
        return found

    def trusted(self, directory: str, st: os.stat_result, base: str,
                base_st: os.stat_result) -> bool:
        """Whether a channel directory was made by whom may make one; refusals logged once.

        Libvirt makes them as root and gives them to QEMU's user, in a channel
        path only root may write to. Where others may write to it, a directory
        another user planted would get a VM's metrics (and answer it): there,
        only root's (or our own) directories count. Nobody but its owner may
        write into one, or they could put their socket in it.
        """
        me = os.geteuid()
        trusted_owners = {0, me}
        if not base_st.st_mode & 0o022:
            # Only the path's owner could have made it: root, or QEMU's user.
            trusted_owners.add(base_st.st_uid)
            if base_st.st_uid in (0, me):
                trusted_owners = {st.st_uid}  # made by root (libvirt), given to anyone
        problem = None
        if st.st_uid not in trusted_owners:
            problem = (f"belongs to uid {st.st_uid}, and others than root may write to "
                       f"channel path {base}")
        elif st.st_mode & 0o022:
            problem = "can be written by group or others"
        if problem is None:
            self.untrusted.pop(directory, None)
            return True
        if self.untrusted.get(directory) != problem:
            self.untrusted[directory] = problem
            log.warning("not using channel directory %s: it %s", loggable(directory), problem)
        return False

    def discover(self, now: float) -> None:
        """Connect the channels of current VMs that are not connected yet.

        A directory must carry the VM's id *and* the start of its name (libvirt
        shortens long names): ids alone would let another libvirt's domain with
        the same id (a test driver, a second hypervisor) take a guest's channel.
        """
        found = {vm_id: matching for vm_id, dirs in self.scan().items()
                 if (matching := [(d, n) for d, n in dirs
                                  if self.names.get(vm_id, "").startswith(n)])}
        current = sorted(vm_id for vm_id in found if self.is_current(vm_id, now))
        self.known = len(current)
        current_set = set(current)
        self.refused &= current_set
        for vm_id in list(self.connect_problems):
            if vm_id not in current_set:
                del self.connect_problems[vm_id]
        for vm_id in current:
            if vm_id in self.channels:
                continue
            candidates = found[vm_id]
            directory, name = candidates[0]
            if len(self.channels) >= self.max_channels:
                if vm_id not in self.refused:
                    self.refused.add(vm_id)
                    log.warning("max_channels (%d) reached: refusing the channel of "
                                "VM %d (%s) at %s", self.max_channels, vm_id, loggable(name),
                                loggable(directory))
                continue
            problems: dict[str, str] = {}
            for directory, name in candidates:
                problem = self.connect(vm_id, name, directory, now)
                if problem is None:
                    break
                problems[directory] = problem
            else:
                self.report_connect_problems(vm_id, name, problems)

    def connect(self, vm_id: int, name: str, directory: str, now: float) -> str | None:
        """Connect to the channel socket in ``directory``; the problem if that fails."""
        path = os.path.join(directory, CHANNEL_NAME)
        long_path = len(os.fsencode(path)) >= UNIX_PATH_MAX
        if long_path and not self.long_path_ok:
            return (f"socket path longer than {UNIX_PATH_MAX - 1} bytes and {_PROC_FD} "
                    "is not available; skipped")
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            if long_path:
                # Too long for sun_path: reach it through a descriptor of its directory.
                dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    sock.connect(f"{_PROC_FD}/{dir_fd}/{CHANNEL_NAME}")
                finally:
                    os.close(dir_fd)
            else:
                sock.connect(path)
        except BlockingIOError:
            # The listener's backlog is full (or QEMU is busy): try again next scan.
            sock.close()
            return "listener busy"
        except OSError as exc:
            sock.close()
            return exc.strerror or str(exc)
        had_problem = self.connect_problems.pop(vm_id, None) is not None
        was_refused = vm_id in self.refused
        self.refused.discard(vm_id)
        channel = Channel(vm_id, name, directory, sock, now)
        self.channels[vm_id] = channel
        self.update_interest(channel)
        level = logging.INFO if (had_problem or was_refused) else logging.DEBUG
        log.log(level, "connected to the channel of %s", channel.describe())
        return None

    def report_connect_problems(self, vm_id: int, name: str, problems: dict[str, str]) -> None:
        """Log why a VM's channel cannot be connected: once, and again when that changes."""
        if self.connect_problems.get(vm_id) == problems:
            return
        self.connect_problems[vm_id] = problems
        why = "; ".join(f"{loggable(directory)}: {problem}"
                        for directory, problem in problems.items())
        log.info("cannot connect to the channel of VM %d (%s): %s (will retry)",
                 vm_id, loggable(name), why)

    def expire(self, now: float) -> None:
        for channel in list(self.channels.values()):
            if not self.is_current(channel.vm_id, now):
                self.close(channel, f"no metrics update for {self.expiration_time:g} s; closed",
                           logging.INFO)
        for vm_id, seen in list(self.last_seen.items()):
            if now - seen > self.expiration_time:
                del self.last_seen[vm_id]
                self.names.pop(vm_id, None)

    def close(self, channel: Channel, why: str, level: int = logging.DEBUG) -> None:
        if self.channels.get(channel.vm_id) is channel:
            del self.channels[channel.vm_id]
        self.throttled.pop(channel.vm_id, None)
        if channel.mask:
            self.selector.unregister(channel.fd)
            channel.mask = 0
        channel.close()
        log.log(level, "channel of %s %s", channel.describe(), why)

    def close_all(self) -> None:
        for channel in list(self.channels.values()):
            self.close(channel, "closed (stopping)")

    # -- serving ----------------------------------------------------------------

    def update_interest(self, channel: Channel) -> None:
        mask = channel.wanted_mask()
        if mask == channel.mask:
            return
        if channel.mask == 0:
            self.selector.register(channel.fd, mask, channel)
        elif mask == 0:
            self.selector.unregister(channel.fd)
        else:
            self.selector.modify(channel.fd, mask, channel)
        channel.mask = mask

    def serve(self, channel: Channel, now: float, *, read: bool) -> None:
        """Read (if asked) and answer a channel; close it if it failed."""
        try:
            if read:
                channel.read()
            if channel.serve(now, self.response_for) == THROTTLED:
                self.throttled[channel.vm_id] = channel
        except ChannelClosed as exc:
            self.close(channel, str(exc), exc.level)
            return
        self.update_interest(channel)

    def resume_throttled(self, now: float) -> None:
        due = [c for c in self.throttled.values() if c.resume_at is None or c.resume_at <= now]
        for channel in due:
            del self.throttled[channel.vm_id]
            channel.resume_at = None
            self.serve(channel, now, read=False)

    def on_event(self, channel: Channel, mask: int, now: float) -> None:
        if mask & selectors.EVENT_WRITE:
            try:
                channel.flush()
            except ChannelClosed as exc:
                self.close(channel, str(exc), exc.level)
                return
            self.update_interest(channel)
        if mask & selectors.EVENT_READ and channel.mask & selectors.EVENT_READ:
            self.serve(channel, now, read=True)

    def next_wakeup(self) -> float | None:
        if not self.throttled:
            return None
        return min(c.resume_at or 0.0 for c in self.throttled.values())

    def status(self) -> tuple[int, int, int]:
        """(connected, known, max): known never shows fewer than connected."""
        connected = len(self.channels)
        return connected, max(self.known, connected), self.max_channels


def raise_fd_limit(max_channels: int) -> None:
    """One descriptor per channel plus some: raise the soft limit as far as needed."""
    wanted = max_channels + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("open file limit %d is too low for %d channels", new,
                        max_channels)


def virtio_main(ctx: ChildContext, *, channel_paths: tuple[str, ...], max_channels: int,
                expiration_time: int, slots: SharedSlots) -> None:
    """Entry point of the virtio child process (started by the supervisor)."""
    raise_fd_limit(max_channels)
    manager = ChannelManager(channel_paths, max_channels, float(expiration_time))
    # The supervisor rings the doorbell after each message it sends us.
    manager.selector.register(ctx.doorbell.fd, selectors.EVENT_READ, None)
    shown: tuple[int, ...] | None = None
    next_scan = time.monotonic()
    trim = IdleTrim()
    try:
        while True:
            ctx.beat()
            now = time.monotonic()
            if now >= next_scan:
                manager.expire(now)
                manager.discover(now)
                next_scan = now + SCAN_INTERVAL
            status = (*manager.status(), len(manager.refused))
            if status != shown:
                shown = status
                ctx.title("virtio {}/{}/{} channels".format(*status))
                ctx.send(VirtioStatus(*status))
            if ctx.orphaned():
                return
            trim.poll()
            wake = min(next_scan, now + trim.wait(ctx.beat_interval))
            throttled_until = manager.next_wakeup()
            if throttled_until is not None:
                wake = min(wake, throttled_until)
            for key, mask in manager.selector.select(max(0.0, wake - now)):
                now = time.monotonic()
                if key.data is None:
                    if not receive_messages(ctx, manager, now, trim, slots):
                        return
                    next_scan = now  # a fresh VM list: look for their channels at once
                else:
                    manager.on_event(key.data, mask, now)
            manager.resume_throttled(time.monotonic())
    finally:
        manager.close_all()


def receive_messages(ctx: ChildContext, manager: ChannelManager, now: float,
                     trim: IdleTrim, slots: SharedSlots) -> bool:
    """Take every waiting message from the supervisor. False once it is gone."""
    ctx.drain_doorbell()
    # The bell can ring before the queue's feeder thread has written the
    # message: wait a moment for the first one.
    timeout = 0.2
    while True:
        try:
            message = ctx.receive(timeout)
        except (EOFError, OSError):
            log.debug("the supervisor is gone; stopping")
            return False
        if message is None:
            return True
        timeout = 0.0
        if isinstance(message, tuple) and len(message) == 3 and message[0] == "metrics":
            _, placement, domains = message
            # Copied out at once, then acknowledged: the slot is the supervisor's again.
            host_fragment, vm_fragments = slots.take(placement)
            ctx.send(VirtioTaken(placement.seq))
            manager.update_metrics(host_fragment, vm_fragments, domains, now)
            trim.worked()
        else:
            log.debug("ignoring an unknown message from the supervisor")
