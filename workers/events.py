"""The events process: libvirt's domain lifecycle events, as a nudge to the supervisor.

The supervisor learns which VMs run by listing them each cycle (a worker's
job). This child keeps a connection of its own open with libvirt's event loop
and tells the supervisor at once when a domain starts or stops, so the
supervisor runs a cycle right away instead of at the next period: a new VM
gets its metrics and its virtio channel, a stopped one leaves the document,
within a second.

Messages to the supervisor (``vhostmd.wire``):

- ``DomainsChanged(event, domain_id)``: a domain started, stopped or crashed
  (event "started", "stopped" or "crashed"), or ``DomainsChanged("connected",
  None)`` after (re)connecting: anything may have changed while nobody was
  watching.
- ``EventsState(connected, detail)``: whether events are being received now,
  and if not why (one line).

Nothing depends on these messages arriving: without them the supervisor
lists every cycle as it always does. So the connection is lost (libvirtd
restarts), or the driver has no events: the log says so once, listing goes
on, and this process reconnects with back-off (0.5 s, doubling, at most
10 s) until it is back.

Threads: libvirt's default event loop runs in a thread of its own
(``virEventRunDefaultImpl``); callbacks run there and only queue messages.
The main thread beats the heartbeat, but only while the event loop's own
timer keeps ticking, so a loop stuck in a callback (a hung libvirt call)
stops the beat and the supervisor replaces this process.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import libvirt

from vhostmd.runtime.child import ChildContext
from vhostmd.wire import DomainsChanged, EventsState
from vhostmd.workers.libvirt_conn import FIRST_RETRY, MAX_RETRY, error_message

log = logging.getLogger("vhostmd")

# Lifecycle events that change the list of running domains, by libvirt's code.
WATCHED = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
# Keepalive on the event connection: a libvirtd that stops answering (hung,
# or its host gone) closes the connection after about interval x (count + 1) s.
KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 3

_loop_started = False
_loop_lock = threading.Lock()


def start_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once)."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _loop_started = True


def _run_event_loop() -> None:
    failed = False
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
            failed = False
        except libvirt.libvirtError as exc:
            if not failed:
                log.warning("libvirt event loop: %s", error_message(exc))
            failed = True
            time.sleep(0.1)


class EventsUnavailable(Exception):
    """No lifecycle events now: str() says why in one line."""


class EventWatcher:
    """One event connection to libvirt, re-opened whenever it is lost."""

    def __init__(self, ctx: ChildContext, uri: str | None) -> None:
        self.ctx = ctx
        self.uri = uri
        self.where = uri or "(default)"
        self.conn: libvirt.virConnect | None = None
        self.callback_id: int | None = None
        self.lost = threading.Event()  # set by the close callback (event-loop thread)
        self.lost_reason = ""
        self.failures = 0
        self.retry_at = 0.0
        self.state: tuple[bool, str] | None = None  # what the supervisor was last told
        self.ever_connected = False
        self.loop_tick = time.monotonic()

    # -- event-loop thread ----------------------------------------------------

    def on_lifecycle(self, _conn: object, dom: libvirt.virDomain, event: int, _detail: int,
                     _opaque: object) -> None:
        what = WATCHED.get(event)
        if what is None:
            return
        try:
            domain_id: int | None = dom.ID()
        except libvirt.libvirtError:
            domain_id = None
        self.ctx.send(DomainsChanged(what, domain_id))

    def on_close(self, _conn: object, reason: int, _opaque: object) -> None:
        self.lost_reason = {
            libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirt closed the connection",
            libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "libvirt stopped answering (keepalive)",
            libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by us",
        }.get(reason, "connection error")
        self.lost.set()

    def on_tick(self, _timer: int, _opaque: object) -> None:
        self.loop_tick = time.monotonic()

    # -- main thread ----------------------------------------------------------

    def loop_alive(self) -> bool:
        return time.monotonic() - self.loop_tick < max(2.0, 4 * self.ctx.beat_interval)

    def connect(self) -> None:
        try:
            conn = libvirt.openReadOnly(self.uri)
        except libvirt.libvirtError as exc:
            raise EventsUnavailable(f"cannot connect: {error_message(exc)}") from None
        try:
            with contextlib.suppress(libvirt.libvirtError):  # not every driver has keepalive
                conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            with contextlib.suppress(libvirt.libvirtError):
                conn.registerCloseCallback(self.on_close, None)
            self.callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self.on_lifecycle, None)
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            raise EventsUnavailable(f"no lifecycle events: {error_message(exc)}") from None
        self.conn = conn
        self.lost.clear()

    def disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            if self.callback_id is not None:
                conn.domainEventDeregisterAny(self.callback_id)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
        self.callback_id = None
        self.lost.clear()
        self.lost_reason = ""

    def alive(self) -> bool:
        if self.conn is None or self.lost.is_set():
            return False
        try:
            return bool(self.conn.isAlive())
        except libvirt.libvirtError:
            return False

    def tell(self, connected: bool, detail: str) -> None:
        if self.state != (connected, detail):
            self.state = (connected, detail)
            self.ctx.send(EventsState(connected, detail))

    def step(self, now: float) -> None:
        """Keep the connection: notice its loss, reconnect when it is time."""
        if self.conn is not None and not self.alive():
            why = self.lost_reason or "connection lost"
            self.disconnect()
            log.warning("libvirt lifecycle events from %s lost (%s); VMs are found by "
                        "listing each cycle until they are back", self.where, why)
            self.tell(False, why)
            self.failures = 0
            self.retry_at = now + FIRST_RETRY
        if self.conn is not None or now < self.retry_at:
            return
        try:
            self.connect()
        except EventsUnavailable as exc:
            self.failures += 1
            self.retry_at = now + min(MAX_RETRY, FIRST_RETRY * 2 ** (self.failures - 1))
            if self.state is None or self.state[0]:
                log.warning("libvirt lifecycle events from %s unavailable (%s); VMs are "
                            "found by listing each cycle", self.where, exc)
            self.tell(False, str(exc))
            return
        log.info("libvirt lifecycle events from %s: %s", self.where,
                 "back" if self.ever_connected or self.state is not None else "watching")
        self.ever_connected = True
        self.failures = 0
        self.tell(True, "watching")
        # Whatever happened while nobody watched: list again now.
        self.ctx.send(DomainsChanged("connected", None))


def events_main(ctx: ChildContext, uri: str | None) -> None:
    """Entry point of the events child process (started by the supervisor)."""
    start_event_loop()
    watcher = EventWatcher(ctx, uri)
    libvirt.virEventAddTimeout(max(100, int(ctx.beat_interval * 500)), watcher.on_tick, None)
    try:
        while not ctx.orphaned():
            if watcher.loop_alive():
                ctx.beat()
            now = time.monotonic()
            watcher.step(now)
            ctx.title(f"events {'watching' if watcher.conn is not None else 'waiting'}")
            wait = ctx.beat_interval
            if watcher.conn is None:
                wait = min(wait, max(0.01, watcher.retry_at - now))
            watcher.lost.wait(wait)
    finally:
        watcher.disconnect()
