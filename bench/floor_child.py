"""A child of bench_floor.py's idle process model that holds what the worker holds at rest.

The worker keeps its libvirt connection between cycles. On libvirt's
in-process test driver (``test:///``) that connection holds the whole node,
every domain of it, in the worker's own memory (a ``qemu:///system`` client
holds none: libvirtd does). So the memory floor is given twice: with idle
children only, and with one of them holding such a connection after it
listed the domains and read their stats once, its freed heap given back as a
worker does between cycles of the default period.
"""

from __future__ import annotations

from typing import Any


def hold_connection(uri: str, queue: Any) -> None:
    # Imported here: the model's supervisor imports this module, and must not
    # load libvirt (the daemon's supervisor does not).
    import libvirt

    from vhostmd.runtime.child import release_free_memory

    conn = libvirt.openReadOnly(uri)
    domains = [conn.lookupByID(i) for i in conn.listDomainsID()]
    conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BALLOON,
                           libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE)
    for domain in domains:
        domain.info()
    del domains
    release_free_memory()
    queue.get()
    conn.close()
