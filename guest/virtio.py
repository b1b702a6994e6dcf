"""The virtio transport: ask the host for metrics over the guest's virtio-serial port.

One exchange per call: open the port, drop anything stale, write the request,
read until the first blank line (the end of a response, see
:mod:`vhostmd.protocol`). Every wait is bounded by one overall deadline.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import termios
import time
import tty

from vhostmd.guest.errors import VirtioError, VirtioTimeout
from vhostmd.mdisk import MAX_SIZE
from vhostmd.protocol import GUEST_PORT, INVALID_RESPONSE, REQUEST, RESPONSE_END

DEFAULT_TIMEOUT = 5.0
# A response never holds more than a full metrics disk would; stop a runaway host there.
MAX_RESPONSE = MAX_SIZE
_CHUNK = 64 * 1024
_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL


def request_metrics(port: str = GUEST_PORT, *, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The host's response (``<metrics>`` ... ``</metrics>\\n\\n``), byte for byte.

    Raises VirtioError when the port is missing, busy or hung up, or the host
    refuses the request; VirtioTimeout when no complete response arrives
    within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    fd = _open_port(port)
    try:
        _make_raw_if_tty(fd)
        _drop_stale_input(fd)
        _write_request(fd, port, deadline, timeout)
        response = _read_response(fd, port, deadline, timeout)
    finally:
        os.close(fd)
    if response == INVALID_RESPONSE:
        raise VirtioError(f"{port}: the host answered INVALID REQUEST")
    return response


def _open_port(port: str) -> int:
    try:
        return os.open(port, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            reason = "no such port (is the vhostmd virtio channel configured for this VM?)"
        elif exc.errno == errno.EBUSY:
            reason = "port busy (another program has it open)"
        else:
            reason = exc.strerror or str(exc)
        raise VirtioError(f"{port}: {reason}") from None


def _make_raw_if_tty(fd: int) -> None:
    # A real virtio port is no tty; a pty standing in for one (tests, socat
    # bridges) must not echo the request or turn "\n" into "\r\n".
    if os.isatty(fd):
        with contextlib.suppress(termios.error):
            tty.setraw(fd)


def _drop_stale_input(fd: int) -> None:
    # A client that gave up earlier may have left (part of) a late response.
    dropped = 0
    while dropped < MAX_RESPONSE:
        try:
            chunk = os.read(fd, _CHUNK)
        except OSError:
            return  # EAGAIN: nothing pending; anything else shows up again below
        if not chunk:
            return
        dropped += len(chunk)


def _poll(fd: int, events: int, deadline: float) -> int:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return 0
    poller = select.poll()
    poller.register(fd, events)
    ready = poller.poll(max(1, int(remaining * 1000)))
    return ready[0][1] if ready else 0


def _write_request(fd: int, port: str, deadline: float, timeout: float) -> None:
    sent = 0
    while sent < len(REQUEST):
        events = _poll(fd, select.POLLOUT, deadline)
        if not events:
            raise VirtioTimeout(f"{port}: could not send the request within {timeout:g} s")
        if not events & select.POLLOUT:
            raise VirtioError(f"{port}: the host side is not connected")
        try:
            sent += os.write(fd, REQUEST[sent:])
        except BlockingIOError:
            continue
        except OSError as exc:
            raise VirtioError(f"{port}: cannot send the request: {exc.strerror or exc}") from None


def _read_response(fd: int, port: str, deadline: float, timeout: float) -> bytes:
    received = bytearray()
    searched = 0  # the blank line cannot end before here: search only new bytes
    while True:
        end = received.find(RESPONSE_END, max(0, searched - len(RESPONSE_END) + 1))
        searched = len(received)
        if end >= 0:
            # Rendered values never hold a raw newline: the first blank line ends it.
            return bytes(received[: end + len(RESPONSE_END)])
        if len(received) > MAX_RESPONSE:
            raise VirtioError(f"{port}: response larger than {MAX_RESPONSE} bytes")
        events = _poll(fd, select.POLLIN, deadline)
        if not events:
            got = f" ({len(received)} bytes of an incomplete one)" if received else ""
            raise VirtioTimeout(f"{port}: no complete response within {timeout:g} s{got}")
        if events & select.POLLIN:
            try:
                chunk = os.read(fd, _CHUNK)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    raise VirtioError(f"{port}: the host side hung up") from None
                raise VirtioError(f"{port}: read failed: {exc.strerror or exc}") from None
            if not chunk:
                raise VirtioError(f"{port}: the host side hung up")
            received += chunk
        elif events & _HANGUP:
            raise VirtioError(f"{port}: the host side is not connected")
