"""systemd's notification protocol (sd_notify(3)), spoken by the supervisor itself.

Under ``Type=notify`` systemd hands the service ``$NOTIFY_SOCKET``, a datagram
socket (a path, or ``@name`` in the abstract namespace), and waits for
``READY=1`` before it starts the units ordered after it: here, libvirt, so
that no guest starts before its metrics disk holds a document. ``STATUS=``
is the line ``systemctl status`` shows; ``WATCHDOG=1`` must come at least
every ``$WATCHDOG_USEC`` or systemd kills and restarts the service. Each
message is one datagram; nothing is read back.

Without ``$NOTIFY_SOCKET`` (the init script, a shell) every call does
nothing. The variables are removed from the environment at once: only the
main process may notify (``NotifyAccess=main``), and children and shell
actions must not inherit them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger("vhostmd")


def watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds between two watchdog pings for this process, or None without a watchdog."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None  # meant for another process
    # sd_watchdog_enabled(3) advises half the timeout. The main loop checks at
    # least this often (see ``wake_within``) and pings when this much has
    # passed: a quarter, so that a ping comes at most half the timeout after
    # the one before.
    return int(usec) / 1e6 / 4


class Notifier:
    """The supervisor's line to systemd; every method is a no-op outside systemd."""

    def __init__(self, environ: MutableMapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        environ = os.environ if environ is None else environ
        address = environ.pop("NOTIFY_SOCKET", "")
        self.watchdog_every = watchdog_interval(environ, os.getpid())
        environ.pop("WATCHDOG_USEC", None)
        environ.pop("WATCHDOG_PID", None)
        self.clock = clock
        self.ready = False
        self.status = ""
        self.last_ping = -float("inf")
        self.address: str | bytes | None = None
        self.sock: socket.socket | None = None
        self.failed = False
        if address.startswith("@"):
            self.address = b"\0" + address[1:].encode()  # the abstract namespace
        elif address.startswith("/"):
            self.address = address
        elif address:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor @name; not notifying systemd",
                        address)
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def active(self) -> bool:
        return self.sock is not None

    def send(self, *fields: str) -> bool:
        if self.sock is None or self.address is None:
            return False
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            # systemd gone (a test, a switch-root): say so once, keep running.
            if not self.failed:
                log.warning("cannot notify systemd at %r: %s", self.address, exc.strerror)
            self.failed = True
            return False
        self.failed = False
        return True

    def notify_ready(self, status: str) -> None:
        """READY=1, once: the metrics disk exists and holds the first document."""
        if self.ready:
            return
        self.ready = True
        self.status = status
        self.send("READY=1", f"STATUS={status}")

    def notify_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self.send(f"STATUS={status}")

    def notify_stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    @property
    def wake_within(self) -> float:
        """How long the main loop may sleep at most, for the watchdog (inf: no limit)."""
        return self.watchdog_every if self.watchdog_every is not None else float("inf")

    def ping_watchdog(self) -> None:
        """WATCHDOG=1 when a quarter of the watchdog timeout has passed since the last one."""
        if self.watchdog_every is None:
            return
        now = self.clock()
        if now - self.last_ping >= self.watchdog_every:
            self.last_ping = now
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
