"""The workers' libvirt connection: listing running domains, with its per-connection cache.

Real libvirt test driver, in-process: ``test:///default`` is one shared
driver per process, so a read-write connection opened here starts and
destroys domains that the worker's read-only connection then lists.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from vhostmd.wire import Domain
from vhostmd.workers.libvirt_conn import LibvirtConnection

import nodes

DEFAULT_URI = "test:///default"
TEST_DOMAIN = Domain(1, "test", "6695eb01-f6a4-8304-79aa-97f2502e193f")  # of test:///default


def transient_xml(name: str) -> str:
    uuid = uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"vhostmd-test/{name}")
    return (f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>"
            "<memory>1024</memory><os><type>hvm</type></os></domain>")


def as_domain(dom: libvirt.virDomain) -> Domain:
    return Domain(dom.ID(), dom.name(), dom.UUIDString())


@pytest.fixture
def admin() -> Iterator[libvirt.virConnect]:
    """A read-write connection to the shared default driver; removes what a test started.

    Other tests use test:///default's one domain ("test", id 1) and the total
    memory of all running domains, so nothing started here may outlive the test.
    """
    conn = libvirt.open(DEFAULT_URI)
    try:
        yield conn
    finally:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            if dom.name() != TEST_DOMAIN.name:
                dom.destroy()  # transient: destroying removes it
        conn.close()


def test_running_domains_follow_starts_and_stops(admin: libvirt.virConnect) -> None:
    listing = LibvirtConnection(DEFAULT_URI)
    assert listing.list_all_domains(inactive=False) == ((TEST_DOMAIN,), ())
    first = as_domain(admin.createXML(transient_xml("cache-a"), 0))
    second = as_domain(admin.createXML(transient_xml("cache-b"), 0))
    assert listing.list_domains() == (TEST_DOMAIN, first, second)
    admin.lookupByName("cache-a").destroy()
    third = as_domain(admin.createXML(transient_xml("cache-c"), 0))
    assert third.id > second.id
    assert listing.list_domains() == (TEST_DOMAIN, second, third)
    # The same again: what the cache holds matches what libvirt says.
    assert listing.list_domains() == (TEST_DOMAIN, second, third)
    # The full listing (for the per-VM disks) agrees, and sees no inactive domain.
    assert listing.list_all_domains(inactive=True) == ((TEST_DOMAIN, second, third), ())
    admin.lookupByName("cache-b").destroy()
    admin.lookupByName("cache-c").destroy()
    assert listing.list_domains() == (TEST_DOMAIN,)


def test_a_domain_gone_before_its_lookup_is_skipped(admin: libvirt.virConnect) -> None:
    listing = LibvirtConnection(DEFAULT_URI)
    conn = listing.get()
    gone = admin.createXML(transient_xml("cache-gone"), 0)
    gone_id = gone.ID()
    real_ids = conn.listDomainsID()
    gone.destroy()

    class Stale:
        """The connection as it was: it still lists the domain destroyed since."""

        def __getattr__(self, name: str) -> object:
            return getattr(conn, name)

        def listDomainsID(self) -> list[int]:
            return real_ids

    listing._conn = Stale()  # type: ignore[assignment]
    assert gone_id in real_ids
    assert listing.list_domains() == (TEST_DOMAIN,)


def test_a_new_connection_forgets_the_domains_of_the_old(tmp_path: Path) -> None:
    """After a reconnect the same ids may be other domains (a restarted libvirtd).

    Two node files stand for libvirtd before and after its restart: both
    number their domains from 1, with other names and UUIDs.
    """
    before_uri, before = nodes.write_node(tmp_path / "before.xml", 2, prefix="old")
    after_uri, after = nodes.write_node(tmp_path / "after.xml", 3, prefix="new")
    listing = LibvirtConnection(before_uri)
    assert listing.list_domains() == tuple(
        Domain(i, d.name, d.uuid) for i, d in enumerate(before, 1))
    listing.reset()
    listing.uri = after_uri
    assert listing.list_domains() == tuple(
        Domain(i, d.name, d.uuid) for i, d in enumerate(after, 1))


def test_a_lost_connection_forgets_the_domains_of_the_old(tmp_path: Path) -> None:
    """The same when the connection is found dead at the next call (no explicit reset)."""
    before_uri, _ = nodes.write_node(tmp_path / "before.xml", 2, prefix="old")
    after_uri, after = nodes.write_node(tmp_path / "after.xml", 2, prefix="new")
    listing = LibvirtConnection(before_uri)
    listing.list_domains()
    listing.get().close()  # as if libvirtd went away under us
    listing.uri = after_uri
    assert listing.list_domains() == tuple(
        Domain(i, d.name, d.uuid) for i, d in enumerate(after, 1))
