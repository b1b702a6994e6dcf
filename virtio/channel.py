"""Serving one virtio channel: its buffers, its rate limit, its requests and responses.

What one guest can cost (so that it cannot hurt the others):

- Input: at most ``MAX_REQUEST`` (512) bytes buffered per channel, and only
  read while the buffer is not full. A request that fills the buffer without a
  blank line is invalid; the rest of it, up to its blank line, is skipped, so
  the guest gets exactly one ``INVALID REQUEST`` and the channel stays usable.
- Rate: a token bucket per channel, ``RATE_BURST`` requests at once,
  refilled at ``RATE_PER_SECOND`` requests per second (each skipped chunk of
  an oversized request costs a token too). A guest over its rate is not
  answered with an error: its channel simply is not read until a token is
  back, so its later requests wait in its own buffers (and QEMU's) while the
  loop serves everyone else.
- Output: non-blocking writes from a per-channel queue holding at most
  ``OUTPUT_LIMIT`` bytes (or a single response, if one response is larger).
  A response that would go beyond that is dropped whole (the stream stays
  framed), logged once per episode, and the guest gets responses again when it
  has read what is queued. Responses are built once per VM per cycle and
  shared, so queued copies of the same response cost no extra memory.

Nothing that comes from a VM reaches a shell; its name only appears in log
lines, ``repr``-escaped and truncated.
"""

from __future__ import annotations

import logging
import selectors
import socket
from collections import deque
from collections.abc import Callable

from vhostmd.logtext import loggable
from vhostmd.protocol import BLANK_LINE, INVALID_RESPONSE, MAX_REQUEST, Request, parse_request

log = logging.getLogger("vhostmd")

RATE_BURST = 10  # requests a channel may send back to back
RATE_PER_SECOND = 5.0  # sustained requests per second per channel
OUTPUT_LIMIT = 64 * 1024  # bytes queued per channel before responses are dropped
# A blank line is at most 4 bytes (\r\n\r\n): keep 3 when skipping, so one that
# straddles two reads is still seen.
_SKIP_KEEP = 3

# What serving a channel can end in, besides going on.
THROTTLED = "throttled"


class ChannelClosed(Exception):
    """The channel failed or hung up; str() says how, for the log."""

    def __init__(self, why: str, level: int = logging.DEBUG) -> None:
        super().__init__(why)
        self.level = level


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

    def wanted_mask(self) -> int:
        """What to wait for now: reading unless throttled, writing if responses are queued."""
        mask = 0
        if self.resume_at is None:
            mask |= selectors.EVENT_READ
        if self.outq:
            mask |= selectors.EVENT_WRITE
        return mask

    def read(self) -> None:
        """Take what the guest sent, as far as the input buffer has room; raises ChannelClosed."""
        room = MAX_REQUEST - len(self.inbuf)
        if room <= 0:
            return
        try:
            data = self.sock.recv(room)
        except BlockingIOError:
            return
        except OSError as exc:
            raise ChannelClosed(f"failed ({exc.strerror or exc}); forgotten") from None
        if not data:
            raise ChannelClosed("hung up; forgotten", logging.INFO)
        self.inbuf += data

    def serve(self, now: float, metrics: Callable[[int], bytes]) -> str | None:
        """Answer every complete request the rate limit allows; raises ChannelClosed.

        Returns THROTTLED when the guest is over its rate (stop reading it until
        ``next_token_at``), else None.
        """
        inbuf = self.inbuf
        while inbuf:
            kind, used = parse_request(inbuf)
            if kind is None:
                break  # a partial request: wait for more bytes
            # parse_request also reports a full buffer without a blank line as complete.
            ended = used < MAX_REQUEST or BLANK_LINE.search(inbuf, 0, used) is not None
            if self.skipping and ended:
                del inbuf[:used]  # the end of an oversized request, already answered
                self.skipping = False
                continue
            if not self.take_token(now):
                self.resume_at = self.next_token_at()
                return THROTTLED
            if not ended:
                del inbuf[: MAX_REQUEST - _SKIP_KEEP]
                if self.skipping:
                    continue  # one more chunk of the same oversized request
                self.skipping = True  # answer it once; skip the rest up to its end
            else:
                del inbuf[:used]
            self.enqueue(metrics(self.vm_id) if kind is Request.METRICS else INVALID_RESPONSE)
            # Write now: what the socket takes at once never counts against the queue.
            # (With more than this response queued, the socket is full: wait for EVENT_WRITE.)
            if len(self.outq) == 1:
                self.flush()
        return None

    def enqueue(self, response: bytes) -> None:
        if self.outq and self.out_bytes + len(response) > OUTPUT_LIMIT:
            if self.dropped == 0:
                log.warning("%s does not read its channel: %d bytes queued; dropping "
                            "responses until it does", self.describe(), self.out_bytes)
            self.dropped += 1
            return
        self.outq.append(memoryview(response))
        self.out_bytes += len(response)

    def flush(self) -> None:
        """Write what the socket takes now; raises ChannelClosed."""
        outq = self.outq
        while outq:
            view = outq[0]
            try:
                sent = self.sock.send(view, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                break
            except OSError as exc:
                raise ChannelClosed(f"failed ({exc.strerror or exc}); forgotten") from None
            self.out_bytes -= sent
            if sent < len(view):
                outq[0] = view[sent:]
                break
            outq.popleft()
        if not outq and self.dropped:
            log.info("%s reads its channel again (%d responses were dropped)",
                     self.describe(), self.dropped)
            self.dropped = 0

    def close(self) -> None:
        self.sock.close()
        self.outq.clear()
