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

What one guest can cost (so that it cannot hurt the others):

- Input: at most ``MAX_REQUEST`` (512) bytes buffered per channel, and only
  read while the buffer is not full. A request that fills the buffer without a
  blank line is invalid; the rest of it, up to its blank line, is skipped, so
  the guest gets exactly one ``INVALID REQUEST`` and the channel stays usable.
- Rate: a token bucket per channel, ``RATE_BURST`` = 10 requests, refilled at
  ``RATE_PER_SECOND`` = 5 requests per second (each skipped 512-byte chunk
  of an oversized request costs a token too). A guest over its rate is not
  answered with an error: its channel simply is not read until a token is
  back, so its later requests wait in its own buffers (and QEMU's) while the
  loop serves everyone else.
- Output: non-blocking writes from a per-channel queue holding at most
  ``OUTPUT_LIMIT`` = 64 KiB (or a single response, if one response is larger).
  A response that would go beyond that is dropped whole (the stream stays
  framed), logged once per episode, and the guest gets responses again when it
  has read what is queued. Responses are built once per VM per cycle and
  shared, so queued copies of the same response cost no extra memory.

Nothing that comes from a VM reaches a shell; names taken from channel
directories only appear in log lines, ``repr``-escaped and truncated.
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
from collections import deque
from typing import TYPE_CHECKING

from vhostmd.logtext import loggable
from vhostmd.protocol import (
    BLANK_LINE,
    CHANNEL_NAME,
    INVALID_RESPONSE,
    MAX_REQUEST,
    Request,
    build_response,
    parse_request,
)
from vhostmd.supervisor.children import release_free_memory

if TYPE_CHECKING:
    from vhostmd.supervisor.children import ChildContext

log = logging.getLogger("vhostmd")

SCAN_INTERVAL = 1.0  # seconds between directory scans (also: expiry checks)
RATE_BURST = 10  # requests a channel may send back to back
RATE_PER_SECOND = 5.0  # sustained requests per second per channel
OUTPUT_LIMIT = 64 * 1024  # bytes queued per channel before responses are dropped
# sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 108
# A blank line is at most 4 bytes (\r\n\r\n): keep 3 when skipping, so one that
# straddles two reads is still seen.
_SKIP_KEEP = 3
CHANNEL_DIR = re.compile(r"(?:domain-)?(\d{1,9})-(.+)\Z", re.DOTALL)
_PROC_FD = "/proc/self/fd"


class Channel:
    """One connected VM channel: its socket, buffers and rate-limit state."""

    __slots__ = (
        "directory",
        "dropped",
        "fd",
        "inbuf",
        "mask",
        "name",
        "out_bytes",
        "outq",
        "refilled",
        "resume_at",
        "skipping",
        "sock",
        "tokens",
        "vm_id",
    )

    def __init__(self, vm_id: int, name: str, directory: str, sock: socket.socket,
                 now: float) -> None:
        self.vm_id = vm_id
        self.name = name
        self.directory = directory
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outq: deque[memoryview] = deque()
        self.out_bytes = 0
        self.tokens = float(RATE_BURST)
        self.refilled = now
        self.resume_at: float | None = None  # set while throttled by the rate limit
        self.skipping = False  # inside the tail of an oversized request
        self.dropped = 0  # responses dropped in the current "does not read" episode
        self.mask = 0  # events registered with the selector (0: not registered)

    def describe(self) -> str:
        return f"VM {self.vm_id} ({loggable(self.name)})"

    def take_token(self, now: float) -> bool:
        self.tokens = min(float(RATE_BURST),
                          self.tokens + (now - self.refilled) * RATE_PER_SECOND)
        self.refilled = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def next_token_at(self) -> float:
        return self.refilled + (1.0 - self.tokens) / RATE_PER_SECOND


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
        self.host_fragment: bytes | None = None
        self.vm_fragments: dict[int, bytes] = {}
        self.responses: dict[int, bytes] = {}  # built lazily, once per VM per cycle
        self.throttled: dict[int, Channel] = {}
        self.refused: set[int] = set()  # VMs refused for max_channels (logged once)
        # VM id -> channel directory -> the problem connecting to it (logged once per change)
        self.connect_problems: dict[int, dict[str, str]] = {}
        self.path_problems: dict[str, str] = {}  # channel paths that cannot be scanned
        self.long_path_ok = os.path.isdir(_PROC_FD)

    # -- metrics from the supervisor ------------------------------------------

    def update_metrics(self, host_fragment: bytes, vm_fragments: dict[int, bytes],
                       domain_ids: tuple[int, ...], now: float) -> None:
        self.host_fragment = host_fragment
        self.vm_fragments = vm_fragments
        self.responses.clear()
        for vm_id in domain_ids:
            self.last_seen[vm_id] = now

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
                for entry in entries:
                    match = CHANNEL_DIR.match(entry.name)
                    if match is None:
                        continue
                    with contextlib.suppress(OSError):
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        found.setdefault(int(match.group(1)), []).append(
                            (entry.path, match.group(2)))
        return found

    def discover(self, now: float) -> None:
        """Connect the channels of current VMs that are not connected yet."""
        found = self.scan()
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

    def close(self, channel: Channel, why: str, level: int = logging.DEBUG) -> None:
        if self.channels.get(channel.vm_id) is channel:
            del self.channels[channel.vm_id]
        self.throttled.pop(channel.vm_id, None)
        if channel.mask:
            self.selector.unregister(channel.fd)
            channel.mask = 0
        channel.sock.close()
        channel.outq.clear()
        log.log(level, "channel of %s %s", channel.describe(), why)

    def close_all(self) -> None:
        for channel in list(self.channels.values()):
            self.close(channel, "closed (stopping)")

    # -- serving ----------------------------------------------------------------

    def update_interest(self, channel: Channel) -> None:
        """Register for what the channel needs now: reading unless throttled, writing if queued."""
        mask = 0
        if channel.resume_at is None:
            mask |= selectors.EVENT_READ
        if channel.outq:
            mask |= selectors.EVENT_WRITE
        if mask == channel.mask:
            return
        if channel.mask == 0:
            self.selector.register(channel.fd, mask, channel)
        elif mask == 0:
            self.selector.unregister(channel.fd)
        else:
            self.selector.modify(channel.fd, mask, channel)
        channel.mask = mask

    def on_readable(self, channel: Channel, now: float) -> None:
        room = MAX_REQUEST - len(channel.inbuf)
        if room > 0:
            try:
                data = channel.sock.recv(room)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close(channel, f"failed ({exc.strerror or exc}); forgotten")
                return
            if not data:
                self.close(channel, "hung up; forgotten", logging.INFO)
                return
            channel.inbuf += data
        self.serve(channel, now)

    def serve(self, channel: Channel, now: float) -> None:
        """Answer every complete request in the input buffer the rate limit allows."""
        inbuf = channel.inbuf
        while inbuf:
            kind, used = parse_request(inbuf)
            if kind is None:
                break  # a partial request: wait for more bytes
            # parse_request also reports a full buffer without a blank line as complete.
            ended = used < MAX_REQUEST or BLANK_LINE.search(inbuf, 0, used) is not None
            if channel.skipping and ended:
                del inbuf[:used]  # the end of an oversized request, already answered
                channel.skipping = False
                continue
            if not channel.take_token(now):
                self.throttle(channel)
                break
            if not ended:
                del inbuf[: MAX_REQUEST - _SKIP_KEEP]
                if channel.skipping:
                    continue  # one more chunk of the same oversized request
                channel.skipping = True  # answer it once; skip the rest up to its end
            else:
                del inbuf[:used]
            self.enqueue(channel, self.response_for(channel.vm_id)
                         if kind is Request.METRICS else INVALID_RESPONSE)
            # Write now: what the socket takes at once never counts against the queue.
            # (With more than this response queued, the socket is full: wait for EVENT_WRITE.)
            if len(channel.outq) == 1 and not self.flush(channel):
                return
        self.update_interest(channel)

    def throttle(self, channel: Channel) -> None:
        channel.resume_at = channel.next_token_at()
        self.throttled[channel.vm_id] = channel

    def resume_throttled(self, now: float) -> None:
        due = [c for c in self.throttled.values() if c.resume_at is None or c.resume_at <= now]
        for channel in due:
            del self.throttled[channel.vm_id]
            channel.resume_at = None
            self.serve(channel, now)

    def enqueue(self, channel: Channel, response: bytes) -> None:
        if channel.outq and channel.out_bytes + len(response) > OUTPUT_LIMIT:
            if channel.dropped == 0:
                log.warning("%s does not read its channel: %d bytes queued; dropping "
                            "responses until it does", channel.describe(), channel.out_bytes)
            channel.dropped += 1
            return
        channel.outq.append(memoryview(response))
        channel.out_bytes += len(response)

    def flush(self, channel: Channel) -> bool:
        """Write what the socket takes now. False if the channel was closed."""
        outq = channel.outq
        while outq:
            view = outq[0]
            try:
                sent = channel.sock.send(view, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                break
            except OSError as exc:
                self.close(channel, f"failed ({exc.strerror or exc}); forgotten")
                return False
            channel.out_bytes -= sent
            if sent < len(view):
                outq[0] = view[sent:]
                break
            outq.popleft()
        if not outq and channel.dropped:
            log.info("%s reads its channel again (%d responses were dropped)",
                     channel.describe(), channel.dropped)
            channel.dropped = 0
        return True

    def on_event(self, channel: Channel, mask: int, now: float) -> None:
        if mask & selectors.EVENT_WRITE:
            if not self.flush(channel):
                return
            self.update_interest(channel)
        if mask & selectors.EVENT_READ and channel.mask & selectors.EVENT_READ:
            self.on_readable(channel, now)

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
                expiration_time: int) -> None:
    """Entry point of the virtio child process (started by the supervisor)."""
    raise_fd_limit(max_channels)
    manager = ChannelManager(channel_paths, max_channels, float(expiration_time))
    inbox_fd = ctx.link.inbox._reader.fileno()  # type: ignore[attr-defined]
    manager.selector.register(inbox_fd, selectors.EVENT_READ, None)
    shown: tuple[int, int, int] | None = None
    next_scan = time.monotonic()
    try:
        while True:
            ctx.beat()
            now = time.monotonic()
            if now >= next_scan:
                manager.expire(now)
                manager.discover(now)
                next_scan = now + SCAN_INTERVAL
            status = manager.status()
            if status != shown:
                shown = status
                ctx.title("virtio {}/{}/{} channels".format(*status))
                ctx.send(("virtio-status", *status))
            if ctx.orphaned():
                return
            wake = min(next_scan, now + ctx.beat_interval)
            throttled_until = manager.next_wakeup()
            if throttled_until is not None:
                wake = min(wake, throttled_until)
            for key, mask in manager.selector.select(max(0.0, wake - now)):
                now = time.monotonic()
                if key.data is None:
                    if not receive_messages(ctx, manager, now):
                        return
                    next_scan = now  # a fresh VM list: look for their channels at once
                else:
                    manager.on_event(key.data, mask, now)
            manager.resume_throttled(time.monotonic())
    finally:
        manager.close_all()


def receive_messages(ctx: ChildContext, manager: ChannelManager, now: float) -> bool:
    """Take every waiting message from the supervisor. False once it is gone."""
    while True:
        try:
            message = ctx.receive(0)
        except (EOFError, OSError):
            log.debug("the supervisor is gone; stopping")
            return False
        if message is None:
            return True
        if isinstance(message, tuple) and len(message) == 4 and message[0] == "metrics":
            _, host_fragment, vm_fragments, domain_ids = message
            manager.update_metrics(host_fragment, vm_fragments, domain_ids, now)
            release_free_memory()
        else:
            log.debug("ignoring an unknown message from the supervisor")
