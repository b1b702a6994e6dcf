"""The workers' libvirt connection: opened lazily, read-only, re-opened when lost.

Only worker processes use this; the supervisor never talks to libvirt (it
imports this module before dropping privileges, so that workers it forks later
find it in memory: see DAEMON_MODULES in supervisor/cli.py).
"""

from __future__ import annotations

import contextlib
import logging
import time

import libvirt

from vhostmd.wire import Domain

log = logging.getLogger("vhostmd")


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


libvirt.registerErrorHandler(_quiet, None)


class LibvirtUnavailable(Exception):
    """libvirt cannot be reached (or a call failed); str() says why in one line."""


# After a failed connect, wait 0.5, 1, 2, 4, 8, then 10 s between attempts:
# libvirtd restarting is noticed within seconds, a dead one is not hammered.
FIRST_RETRY = 0.5
MAX_RETRY = 10.0


class LibvirtConnection:
    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._last_error = ""
        # Running domains by id, as listed before on this connection. A running
        # domain's id, name and UUID cannot change while it runs (a rename needs
        # it shut off, and ids only grow while libvirtd runs), so a cycle asks
        # libvirt only about ids it has not seen. Cleared with the connection: a
        # restarted libvirtd numbers domains from 1 again.
        self._running: dict[int, Domain] = {}

    def get(self) -> libvirt.virConnect:
        if self._conn is not None:
            try:
                if self._conn.isAlive():
                    return self._conn
            except libvirt.libvirtError:
                pass
            self.reset()
        now = time.monotonic()
        if now < self._retry_at:
            raise LibvirtUnavailable(
                f"{self._last_error} (next attempt in {self._retry_at - now:.1f} s)")
        try:
            self._conn = libvirt.openReadOnly(self.uri)
        except libvirt.libvirtError as exc:
            self._failures += 1
            self._retry_at = now + min(MAX_RETRY, FIRST_RETRY * 2 ** (self._failures - 1))
            self._last_error = (f"cannot connect to libvirt {self.uri or '(default)'}: "
                                f"{error_message(exc)}")
            raise LibvirtUnavailable(self._last_error) from None
        self._failures = 0
        self._retry_at = 0.0
        return self._conn

    def reset(self) -> None:
        conn, self._conn = self._conn, None
        self._running = {}
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def list_domains(self) -> tuple[Domain, ...]:
        return self.list_all_domains(inactive=False)[0]

    def list_all_domains(self, *, inactive: bool) -> tuple[tuple[Domain, ...], tuple[str, ...]]:
        """The running domains by id, and (``inactive``) the UUIDs of the others defined.

        With ``inactive``: one listing call of every domain (a domain that does
        not run has id -1, known without another call). Without: the running
        domains' ids only, looked up one by one only when new on this connection
        (see ``_running``), which saves the per-domain calls of a full listing
        every cycle.
        """
        if not inactive:
            return self._list_running(), ()
        conn = self.get()
        try:
            found = conn.listAllDomains(0)
            domains = [Domain(d.ID(), d.name(), d.UUIDString()) for d in found]
        except libvirt.libvirtError as exc:
            self.reset()
            raise LibvirtUnavailable(f"listing domains failed: {error_message(exc)}") from None
        running = sorted((d for d in domains if d.id >= 0), key=lambda d: d.id)
        return tuple(running), tuple(sorted(d.uuid for d in domains if d.id < 0))

    def _list_running(self) -> tuple[Domain, ...]:
        conn = self.get()
        known = self._running
        try:
            ids = sorted(conn.listDomainsID())
            if known.keys() != set(ids):
                fresh: dict[int, Domain] = {}
                for vm_id in ids:
                    domain = known.get(vm_id)
                    if domain is None:
                        domain = self._lookup(conn, vm_id)
                        if domain is None:
                            continue  # it stopped since listDomainsID
                    fresh[vm_id] = domain
                self._running = known = fresh  # drops the ids no longer running
        except libvirt.libvirtError as exc:
            self.reset()
            raise LibvirtUnavailable(f"listing domains failed: {error_message(exc)}") from None
        return tuple(known.values())  # in id order: built from the sorted ids

    @staticmethod
    def _lookup(conn: libvirt.virConnect, vm_id: int) -> Domain | None:
        """The running domain with this id, or None if it is gone."""
        try:
            dom = conn.lookupByID(vm_id)
            return Domain(vm_id, dom.name(), dom.UUIDString())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise


def error_message(exc: Exception) -> str:
    """A libvirt error (or any exception) as one line, for logs and failures."""
    get = getattr(exc, "get_error_message", None)
    text = (get() if get else None) or str(exc)
    return " ".join(text.split())
