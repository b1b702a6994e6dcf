"""run_collector's VM path: rows of values from the sources, rendered per VM.

Sources here are stand-ins that hand back fixed rows, odd ones included
(negative, missing, text, split over two sources, columns in another order
than the document's), so every way a row can take is checked against the
one per-metric renderer (render_metric through FragmentBuilder.add_vm).
"""

from __future__ import annotations

import time

import pytest

from vhostmd.document import InvalidValue, check_value, render_metric, vm_attributes
from vhostmd.wire import Collect, Domain, Failure
from vhostmd.workers import collectors
from vhostmd.workers.collectors.source import (
    MetricSpec,
    Request,
    Sample,
    Source,
    int_text,
    seconds_from_ticks,
)
from vhostmd.workers.libvirt_conn import LibvirtConnection
from vhostmd.workers.results import FragmentBuilder

CPU, VCPUS, USED, LIMIT = ("TotalCPUTime", "ResourceProcessorLimit",
                           "PhysicalMemoryAllocatedToVirtualSystem", "ResourceMemoryLimit")
NAMES = (CPU, VCPUS, USED, LIMIT)
VMS = [Domain(i, f"vm{i}", f"00000000-0000-0000-0000-{i:012d}") for i in range(1, 7)]


def expected(rows: dict[int, dict[str, int | str]]) -> tuple[FragmentBuilder, list[Failure]]:
    """What the document must hold: each value checked and rendered on its own."""
    out = FragmentBuilder()
    failures = []
    for vm in VMS:
        for name in NAMES:
            raw = rows.get(vm.id, {}).get(name)
            if raw is None:
                continue
            spec = collectors.BY_KIND["vm"][name][1]
            text = raw if isinstance(raw, str) else int_text(raw, spec.scale)
            try:
                out.add_vm(vm, name, spec.type, check_value(spec.type, text), spec.unit)
            except InvalidValue as exc:
                failures.append(Failure(name, "vm", vm, str(exc)))
    return out, failures


def with_sources(monkeypatch: pytest.MonkeyPatch,
                 parts: list[tuple[str, tuple[str, ...], dict[int, dict]]]) -> None:
    """Replace the VM metrics' source by stand-ins: (name, columns, values by VM id)."""
    for source_name, columns, rows in parts:
        def collect(request: Request, columns: tuple[str, ...] = columns,
                    rows: dict[int, dict] = rows) -> Sample:
            assert request.wanted == frozenset(columns)
            return Sample(vm_names=columns, vms=[
                (vm, tuple(rows[vm.id].get(name) for name in columns))
                for vm in reversed(VMS) if vm.id in rows])  # not in id order on purpose

        specs = tuple(collectors.BY_KIND["vm"][name][1] for name in columns)
        source = Source(source_name, "vm", specs, collect)
        for spec in specs:
            monkeypatch.setitem(collectors.BY_KIND["vm"], spec.name, (source, spec))


def run(names: tuple[str, ...]) -> tuple[bytes, tuple, tuple]:
    job = Collect(1, time.monotonic() + 10, collectors.VM_JOB, names, tuple(VMS), None)
    result = collectors.run_collector(job, None)
    return result.host, result.vms, result.failures


ROWS: dict[int, dict[str, int | str]] = {
    1: {CPU: 123_456_789_012, VCPUS: 2, USED: 1024, LIMIT: 2048},  # the usual row
    2: {CPU: 0, VCPUS: 0, USED: 0, LIMIT: 0},
    3: {CPU: -1, VCPUS: -1, USED: 5, LIMIT: 6},  # negative: checked, one fails
    4: {CPU: 7_000_000_000, USED: 9},  # some missing
    5: {CPU: "1.5", VCPUS: "07", USED: 3, LIMIT: "x"},  # texts: checked as host values are
    # 6: listed but no values at all: nothing published
}


@pytest.mark.parametrize("columns", [NAMES, (LIMIT, CPU, USED, VCPUS)])
def test_rows_render_like_each_value_on_its_own(monkeypatch: pytest.MonkeyPatch,
                                                columns: tuple[str, ...]) -> None:
    with_sources(monkeypatch, [("stand_in", columns, ROWS)])
    want, failures = expected(ROWS)
    assert run(NAMES) == (b"", want.result(1).vms, tuple(failures))
    assert [vm_id for vm_id, _ in want.result(1).vms] == [1, 2, 3, 4, 5]


def test_rows_of_two_sources_merge_per_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    first = {i: {CPU: row[CPU], USED: row.get(USED)} for i, row in ROWS.items() if CPU in row}
    second = {i: {VCPUS: row.get(VCPUS), LIMIT: row.get(LIMIT)} for i, row in ROWS.items()}
    with_sources(monkeypatch, [("stand_in_a", (USED, CPU), first),
                               ("stand_in_b", (VCPUS, LIMIT), second)])
    want, failures = expected(ROWS)
    assert run(NAMES) == (b"", want.result(1).vms, tuple(failures))


def test_only_the_host_total_wanted_still_lists_each_vm() -> None:
    """libvirt_domains' rows are empty then: each VM gets an empty fragment, as before rows."""
    test = Domain(1, "test", "6695eb01-f6a4-8304-79aa-97f2502e193f")  # of test:///default
    job = Collect(1, time.monotonic() + 10, collectors.VM_JOB,
                  ("MemoryAllocatedToVirtualServers",), (test,), None)
    result = collectors.run_collector(job, LibvirtConnection("test:///default"))
    assert result.vms == ((1, b""),) and result.failures == ()
    assert b"<value>2097152</value>" in result.host  # virsh dominfo test: Used memory


def test_int_text_is_the_original_printf_of_nanoseconds() -> None:
    for ns in (0, 1, 999, 1000, 999_999_999, 1_000_000_000, 123_456_789_012_345, -1, -1001):
        whole, rest = divmod(ns, 1_000_000_000)
        assert int_text(ns, 1_000_000_000) == f"{whole}.{rest // 1000:06d}"
        assert seconds_from_ticks(ns, 1_000_000_000) == int_text(ns, 1_000_000_000)
    assert int_text(-5, 1) == "-5" and int_text(2**64 - 1, 1) == str(2**64 - 1)


def test_vm_template_is_the_renderer_whatever_the_names_hold() -> None:
    """%, braces or markup in a name or unit cannot break the one-call rendering."""
    specs = (MetricSpec("Odd%s{0}%%", "uint64", "vm", "%", "test"),
             MetricSpec("a<b>&'c'", "real64", "vm", "{1}", "test"))
    template, arguments = collectors._vm_template(specs)
    attrs = vm_attributes(7, "u'7")
    got = template % arguments((attrs, 12, "3.500000"))
    assert got == (render_metric(specs[0].name, "uint64", "vm", "12", "%", attrs)
                   + render_metric(specs[1].name, "real64", "vm", "3.500000", "{1}", attrs))
    empty, no_arguments = collectors._vm_template(())
    assert empty % no_arguments(("x",)) == ""
