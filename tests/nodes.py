"""Write libvirt test-driver node files: a fake host with N running domains.

``test:///ABS/PATH/node.xml`` opens such a file with libvirt's test driver (in
the client process, no libvirtd needed). Every domain in the file is running;
the driver numbers them 1..N in file order. The driver needs a ``<node>`` root
with ``<cpu>`` and ``<memory>`` (the host that ``virsh nodeinfo`` shows) and
one ``<domain type='test'>`` per VM with at least a name, memory and an
``<os><type>`` (the uuid is generated when missing; we always give one so
tests know it).

Used by the tests (``import nodes``) and by bench/bench_cycle.py.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

# The fake host: what `virsh -c test:///... nodeinfo` reports.
NODE_CPUS = 8
NODE_MEMORY_KIB = 64 * 1024 * 1024


@dataclass(frozen=True)
class TestDomain:
    """One domain as written to the node file (what libvirt then reports)."""

    name: str
    uuid: str
    memory_kib: int  # <memory>: the maximum (virsh dominfo "Max memory")
    current_memory_kib: int  # <currentMemory>: allocated now ("Used memory")
    vcpus: int


def make_domains(count: int, *, names: Sequence[str] = (), prefix: str = "vm",
                 base_memory_kib: int = 512 * 1024) -> list[TestDomain]:
    """``count`` domains (plus one per explicit name, which come first).

    Values differ per domain (memory, vcpus) so a test notices values landing
    on the wrong VM. UUIDs are derived from the name, so they are stable.
    """
    all_names = [*names, *(f"{prefix}{i:05d}" for i in range(1, count + 1))]
    domains = []
    for index, name in enumerate(all_names):
        maximum = base_memory_kib + 1024 * (index % 64)
        domains.append(TestDomain(
            name=name,
            uuid=str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"vhostmd-test/{name}")),
            memory_kib=maximum,
            current_memory_kib=maximum - 256 * (index % 3),
            vcpus=1 + index % 4,
        ))
    return domains


def node_xml(domains: Sequence[TestDomain]) -> str:
    parts = [
        "<node>\n",
        "  <cpu>\n",
        "    <mhz>2400</mhz>\n",
        "    <model>vhostmd-test</model>\n",
        f"    <active>{NODE_CPUS}</active>\n",
        "    <nodes>1</nodes>\n",
        "    <sockets>1</sockets>\n",
        f"    <cores>{NODE_CPUS // 2}</cores>\n",
        "    <threads>2</threads>\n",
        "  </cpu>\n",
        f"  <memory>{NODE_MEMORY_KIB}</memory>\n",
    ]
    for dom in domains:
        parts.append(
            "  <domain type='test'>\n"
            f"    <name>{escape(dom.name)}</name>\n"
            f"    <uuid>{dom.uuid}</uuid>\n"
            f"    <memory unit='KiB'>{dom.memory_kib}</memory>\n"
            f"    <currentMemory unit='KiB'>{dom.current_memory_kib}</currentMemory>\n"
            f"    <vcpu>{dom.vcpus}</vcpu>\n"
            "    <os><type arch='x86_64'>hvm</type></os>\n"
            "  </domain>\n"
        )
    parts.append("</node>\n")
    return "".join(parts)


def write_node(path: Path | str, count: int, *, names: Sequence[str] = (),
               prefix: str = "vm") -> tuple[str, list[TestDomain]]:
    """Write a node file; returns (its test:/// URI, the domains in it)."""
    path = Path(path).resolve()
    domains = make_domains(count, names=names, prefix=prefix)
    path.write_text(node_xml(domains), encoding="utf-8")
    return f"test://{path}", domains
