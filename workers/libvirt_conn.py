"""The workers' libvirt connection: opened lazily, read-only, re-opened when lost.

Only worker processes import this; the supervisor never talks to libvirt.
"""

from __future__ import annotations

import contextlib
import logging

import libvirt

from vhostmd.workers.jobs import Domain

log = logging.getLogger("vhostmd")


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


libvirt.registerErrorHandler(_quiet, None)


class LibvirtUnavailable(Exception):
    """libvirt cannot be reached (or a call failed); str() says why in one line."""


class LibvirtConnection:
    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None

    def get(self) -> libvirt.virConnect:
        if self._conn is not None:
            try:
                if self._conn.isAlive():
                    return self._conn
            except libvirt.libvirtError:
                pass
            self.reset()
        try:
            self._conn = libvirt.openReadOnly(self.uri)
        except libvirt.libvirtError as exc:
            raise LibvirtUnavailable(f"cannot connect to libvirt {self.uri or '(default)'}: "
                                     f"{_message(exc)}") from None
        return self._conn

    def reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def list_domains(self) -> tuple[Domain, ...]:
        conn = self.get()
        try:
            found = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            domains = [Domain(d.ID(), d.name(), d.UUIDString()) for d in found]
        except libvirt.libvirtError as exc:
            self.reset()
            raise LibvirtUnavailable(f"listing domains failed: {_message(exc)}") from None
        return tuple(sorted(domains, key=lambda d: d.id))


def _message(exc: libvirt.libvirtError) -> str:
    text = exc.get_error_message() or str(exc)
    return " ".join(text.split())
