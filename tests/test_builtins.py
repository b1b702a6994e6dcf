"""Built-in collectors: the standard metric sets, checked against independent readings.

Every value is compared with what /proc, os-release or `virsh` on the same
libvirt test-driver URI say, read just before and after the collector ran.
Tolerances are stated where a value moves between the two readings.
No mocks: real /proc, real libvirt test driver, real daemon.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhostmd.document import Metric, assemble, check_value, parse_document
from vhostmd.etc import shipped
from vhostmd.supervisor.config import BuiltinRef, ConfigError, load_config, parse_config_bytes
from vhostmd.wire import Collect, Domain, JobResult
from vhostmd.workers import collectors
from vhostmd.workers.libvirt_conn import LibvirtConnection

import nodes
from daemon_harness import Daemon, config_xml, metric_xml, ready_metrics, wait_for

DEFAULT_URI = "test:///default"
TEST_DOMAIN = Domain(1, "test", "6695eb01-f6a4-8304-79aa-97f2502e193f")  # of test:///default
# Memory that moves between two readings taken a few ms apart on a busy host.
MEMORY_SLACK_KIB = 128 * 1024

SAP_HOST = {
    "HostName": ("string", None), "HostSystemInfo": ("string", None),
    "VirtualizationVendor": ("string", None), "VirtProductInfo": ("string", None),
    "NumberOfPhysicalCPUs": ("uint32", None), "TotalCPUTime": ("real64", "s"),
    "FreePhysicalMemory": ("uint64", "KiB"), "FreeVirtualMemory": ("uint64", "KiB"),
    "MemoryAllocatedToVirtualServers": ("uint64", "KiB"),
    "UsedVirtualMemory": ("uint64", "KiB"), "PagedInMemory": ("uint64", "KiB"),
    "PagedOutMemory": ("uint64", "KiB"), "Time": ("uint64", "s"),
}
SAP_VM = {
    "TotalCPUTime": ("real64", "s"), "ResourceProcessorLimit": ("uint32", None),
    "PhysicalMemoryAllocatedToVirtualSystem": ("uint64", "KiB"),
    "ResourceMemoryLimit": ("uint64", "KiB"),
}
VHOSTMD_HOST = {
    "TotalPhyCPUs": ("uint32", None), "NumCPUs": ("uint32", None),
    "TotalPhyMem": ("uint64", "MiB"), "UsedMem": ("uint64", "MiB"),
    "FreeMem": ("uint64", "MiB"), "PagedInMemory": ("uint64", "KiB"),
    "PagedOutMemory": ("uint64", "KiB"), "PageInRate": ("uint64", "KiB/s"),
    "PageFaultRate": ("uint64", "1/s"), "TotalCPUTime": ("real64", "s"),
}
VHOSTMD_VM = {"TotalCPUTime": ("real64", "s")}


# -- independent readings ------------------------------------------------------

def proc_values(path: str) -> dict[str, int]:
    values = {}
    for line in Path(path).read_text().splitlines():
        key, *rest = line.replace(":", " ").split()
        if rest and rest[0].isdigit():
            values[key] = int(rest[0])
    return values


def proc_cpu() -> tuple[int, float]:
    """(online CPUs, user+nice+system seconds) straight from /proc/stat."""
    lines = Path("/proc/stat").read_text().splitlines()
    total = next(line.split() for line in lines if line.startswith("cpu "))
    online = sum(1 for line in lines if re.match(r"cpu\d+ ", line))
    return online, (int(total[1]) + int(total[2]) + int(total[3])) / os.sysconf("SC_CLK_TCK")


def virsh(uri: str, *args: str) -> str:
    return subprocess.run(["virsh", "-c", uri, *args], check=True, capture_output=True,
                          text=True, timeout=30).stdout


def virsh_fields(uri: str, *args: str) -> dict[str, str]:
    fields = {}
    for line in virsh(uri, *args).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def kib(text: str) -> int:
    number, unit = text.split()
    assert unit == "KiB"
    return int(number)


# -- helpers -------------------------------------------------------------------

def run(names: tuple[str, ...], domains: tuple[Domain, ...] | None, uri: str = DEFAULT_URI,
        state: object = None, connection: LibvirtConnection | None = None) -> JobResult:
    job = Collect(1, time.monotonic() + 10, "test", names, domains, state)
    return collectors.run_collector(job, connection or LibvirtConnection(uri))


def metrics_of(result: JobResult) -> list[Metric]:
    """The metrics a worker's result carries, read back from its rendered fragments."""
    return parse_document(assemble([result.host, *(f for _, f in result.vms)]))


def by_name(result: JobResult) -> dict[str, Metric]:
    return {m.name: m for m in metrics_of(result) if m.vm_id is None}


def host_names(set_name: str) -> tuple[str, ...]:
    return tuple(n for c, n in collectors.SETS[set_name]
                 if c == "host" and collectors.METRICS[(c, n)][0].kind == "host")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[nodes.TestDomain]]:
    """A fake host with VMs whose names would be trouble in a shell or in XML."""
    path = tmp_path_factory.mktemp("node") / "node.xml"
    return nodes.write_node(path, 5, names=["x;touch pwned", "a&b<c>'q\""])


# -- sets, config, plan --------------------------------------------------------

def test_package_does_not_import_libvirt_or_psutil() -> None:
    code = ("import sys, vhostmd.workers.collectors as c; c.plan(()); c.describe_builtins(); "
            "print(sorted(m for m in ('libvirt', 'psutil') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("set_name", "host", "vm"), [
    ("sap", SAP_HOST, SAP_VM), ("vhostmd", VHOSTMD_HOST, VHOSTMD_VM)])
def test_standard_sets_have_exact_names_types_and_units(set_name: str, host: dict,
                                                        vm: dict) -> None:
    keys = collectors.SETS[set_name]
    assert sorted(n for c, n in keys if c == "host") == sorted(host)
    assert sorted(n for c, n in keys if c == "vm") == sorted(vm)
    for context, expected in (("host", host), ("vm", vm)):
        for name, (mtype, unit) in expected.items():
            spec = collectors.METRICS[(context, name)][1]
            assert (spec.type, spec.unit) == (mtype, unit), (context, name)


def test_validate_ref_explains_what_is_wrong() -> None:
    ok = [BuiltinRef("sap", None, None), BuiltinRef("vhostmd", None, "vm"),
          BuiltinRef(None, "TotalCPUTime", None), BuiltinRef(None, "FreeMem", "host")]
    assert [collectors.validate_ref(r) for r in ok] == [None] * 4
    assert collectors.validate_ref(BuiltinRef("foo", None, None)) == (
        "unknown built-in set 'foo' (known: sap, vhostmd)")
    assert "unknown built-in metric 'Nope'" in collectors.validate_ref(
        BuiltinRef(None, "Nope", None))
    assert collectors.validate_ref(BuiltinRef(None, "FreeMem", "vm")) == (
        "built-in metric 'FreeMem' has no vm metrics")


def test_config_with_unknown_set_fails_with_file_and_line(tmp_path: Path) -> None:
    data = config_xml(tmp_path / "disk", '    <builtin set="sap"/>\n    <builtin set="saq"/>')
    with pytest.raises(ConfigError) as err:
        parse_config_bytes(data.encode(), "x.conf")
    line = data.splitlines().index('    <builtin set="saq"/>') + 1
    assert str(err.value) == f"x.conf:{line}: unknown built-in set 'saq' (known: sap, vhostmd)"


def test_plan_publishes_shared_metrics_once_in_config_order() -> None:
    plans = collectors.plan((BuiltinRef("vhostmd", None, None, 20),
                             BuiltinRef("sap", None, None, 30),
                             BuiltinRef(None, "FreeMem", None, 40)))
    assert [(p.collector, p.context, p.order) for p in plans] == [
        ("vhostmd", "host", 20), ("sap", "host", 30), ("domains", "vm", 20)]
    host = [n for p in plans if p.context == "host" for n in p.metric_names]
    from_vm_job = {"MemoryAllocatedToVirtualServers", "VirtProductInfo"}
    assert len(host) == len(set(host))
    assert set(host) == (set(SAP_HOST) | set(VHOSTMD_HOST)) - from_vm_job
    assert from_vm_job <= set(plans[2].metric_names)
    assert "TotalCPUTime" in plans[0].metric_names and "TotalCPUTime" not in plans[1].metric_names
    assert collectors.plan((BuiltinRef("sap", None, "host", 5),)) == [
        collectors.CollectorPlan("sap", "host", host_names("sap"), 5),
        collectors.CollectorPlan("domains", "vm",
                                 ("VirtProductInfo", "MemoryAllocatedToVirtualServers"), 5)]


def test_shipped_configs_select_both_sets_and_pvc_has_no_duplicates() -> None:
    default = load_config(shipped("vhostmd.conf"))
    assert [(r.set, r.context) for r in default.builtins] == [("sap", None), ("vhostmd", None)]
    assert not default.metrics
    pvc = load_config(shipped("vhostmd-pvc.conf"))
    published: list[tuple[str, str]] = [(m.context, m.name) for m in pvc.metrics]
    for p in collectors.plan(pvc.builtins):
        published += [(collectors.BY_KIND[p.context][n][1].context, n) for n in p.metric_names]
    assert len(published) == len(set(published))
    assert {("host", n) for n in SAP_HOST} | {("vm", n) for n in SAP_VM} <= set(published)
    assert {"PVC-Cluster-Name", "PVC-Timezone", "PVC-Debian-Version",
            "VirtualizationProductInfo"} <= {m.name for m in pvc.metrics}


def test_list_builtins_describes_every_metric() -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "vhostmd"), "--list-builtins"],
                         check=True, capture_output=True, text=True).stdout
    rows = {tuple(line.split()[:4]) for line in out.splitlines()}
    for (context, name), (_source, spec) in collectors.METRICS.items():
        assert (name, context, spec.type, spec.unit or "-") in rows
    assert '<builtin set="sap"/>' in out and "share" in out


# -- host values against /proc -------------------------------------------------

def test_host_values_match_proc() -> None:
    names = tuple(dict.fromkeys(host_names("sap") + host_names("vhostmd")))
    cpus_before, cpu_before = proc_cpu()
    vm_before = proc_values("/proc/vmstat")
    time_before = int(time.time())
    result = run(names, None)
    time_after = time.time()
    cpus_after, cpu_after = proc_cpu()
    vm_after = proc_values("/proc/vmstat")
    mem = proc_values("/proc/meminfo")
    assert result.failures == ()
    got = by_name(result)
    assert list(got) == list(names)  # all of them, in plan order
    value = {name: m.typed_value() for name, m in got.items()}

    assert value["HostName"] == socket.gethostname()
    assert value["VirtualizationVendor"] == platform.freedesktop_os_release()["NAME"]
    dmi = " ".join(p for p in (Path(f"/sys/class/dmi/id/{f}").read_text().strip()
                               for f in ("sys_vendor", "product_name")
                               if Path(f"/sys/class/dmi/id/{f}").exists()) if p)
    uname = os.uname()
    assert value["HostSystemInfo"] == (dmi or f"{uname.sysname} {uname.release} {uname.machine}")

    assert cpus_before == cpus_after == os.sysconf("SC_NPROCESSORS_ONLN")
    for name in ("NumberOfPhysicalCPUs", "TotalPhyCPUs", "NumCPUs"):
        assert value[name] == cpus_before
    # Busy time only grows: the value lies between the two readings (6 decimals).
    assert cpu_before - 1e-6 <= value["TotalCPUTime"] <= cpu_after + 1e-6
    assert vm_before["pgpgin"] <= value["PagedInMemory"] <= vm_after["pgpgin"]
    assert vm_before["pgpgout"] <= value["PagedOutMemory"] <= vm_after["pgpgout"]
    assert time_before <= value["Time"] <= time_after

    available, swap_free = mem["MemAvailable"], mem["SwapFree"]
    assert value["TotalPhyMem"] == mem["MemTotal"] // 1024
    assert abs(value["FreePhysicalMemory"] - available) <= MEMORY_SLACK_KIB
    assert abs(value["FreeMem"] - available // 1024) <= MEMORY_SLACK_KIB // 1024
    assert abs(value["UsedMem"] - (mem["MemTotal"] - available) // 1024) <= (
        MEMORY_SLACK_KIB // 1024)
    assert abs(value["FreeVirtualMemory"] - (available + swap_free)) <= MEMORY_SLACK_KIB
    assert abs(value["UsedVirtualMemory"] - (mem["MemTotal"] + mem["SwapTotal"]
                                             - available - swap_free)) <= MEMORY_SLACK_KIB
    # One reading: these add up exactly (up to the MiB rounding).
    assert value["TotalPhyMem"] - 1 <= value["UsedMem"] + value["FreeMem"] <= value["TotalPhyMem"]


def test_rates_come_from_two_samples_across_cycles() -> None:
    names = ("PageInRate", "PageFaultRate", "PagedInMemory")
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    before = proc_values("/proc/vmstat")
    first = run(names, None)
    # No state yet: averaged since boot, rounded to the nearest integer (so up
    # to 0.5 below the true average: after hours of uptime the +1 s of slack
    # on the clock is worth less than that).
    since_boot = by_name(first)["PageFaultRate"].typed_value()
    assert before["pgfault"] / (uptime + 1) - 0.5 <= since_boot
    assert since_boot <= proc_values("/proc/vmstat")["pgfault"] / max(uptime - 1, 1) + 1
    state1 = first.state["host_paging"]
    # Make page faults the second sample must count: touch 32 MiB of fresh pages,
    # and keep touching until the interval is long enough to give a rate
    # (samples closer than 50 ms fall back to the since-boot average).
    touched = bytearray(32 * 1024 * 1024)
    for offset in range(0, len(touched), 4096):
        touched[offset] = 1
    while time.clock_gettime(time.CLOCK_BOOTTIME) - state1["at"] < 0.1:
        touched = bytearray(1024 * 1024)
        touched[::4096] = b"\1" * (len(touched) // 4096)
    second = run(names, None, state=first.state)
    state2 = second.state["host_paging"]
    elapsed = state2["at"] - state1["at"]
    assert elapsed > 0
    rate = by_name(second)["PageFaultRate"].typed_value()
    assert rate == int((state2["pgfault"] - state1["pgfault"]) / elapsed + 0.5)
    assert rate * elapsed >= 32 * 1024 * 1024 / 4096 * 0.9  # our own faults are in it
    assert by_name(second)["PageInRate"].typed_value() == int(
        (state2["pgpgin"] - state1["pgpgin"]) / elapsed + 0.5)
    after = proc_values("/proc/vmstat")
    assert before["pgfault"] <= state1["pgfault"] <= state2["pgfault"] <= after["pgfault"]


# -- VM values against virsh -----------------------------------------------------

VM_NAMES = (*SAP_VM, "MemoryAllocatedToVirtualServers", "VirtProductInfo")


def check_vms_against_virsh(uri: str, domains: tuple[Domain, ...]) -> None:
    started = time.time()
    result = run(VM_NAMES, domains, uri)
    assert result.failures == ()
    vms: dict[int, dict[str, Metric]] = {}
    for m in metrics_of(result):
        if m.vm_id is not None:
            assert m.context == "vm"
            vms.setdefault(m.vm_id, {})[m.name] = m
    assert sorted(vms) == sorted(d.id for d in domains)
    used_total = 0
    for domain in domains:
        got = vms[domain.id]
        assert {m.uuid for m in got.values()} == {domain.uuid}
        assert list(got) == list(SAP_VM)
        info = virsh_fields(uri, "dominfo", domain.uuid)
        assert (info["Id"], info["Name"], info["UUID"]) == (str(domain.id), domain.name,
                                                            domain.uuid)
        assert got["ResourceProcessorLimit"].typed_value() == int(info["CPU(s)"])
        assert got["ResourceMemoryLimit"].typed_value() == kib(info["Max memory"])
        assert got["PhysicalMemoryAllocatedToVirtualSystem"].typed_value() == kib(
            info["Used memory"])
        # The test driver's CPU time is the wall clock (ns); virsh ran later and
        # prints one decimal: ours is between our start and virsh's reading.
        cpu = got["TotalCPUTime"].typed_value()
        assert started - 1 <= cpu <= float(info["CPU time"].rstrip("s")) + 0.05
        assert re.fullmatch(r"\d+\.\d{6}", got["TotalCPUTime"].value)
        used_total += kib(info["Used memory"])
    assert by_name(result)["MemoryAllocatedToVirtualServers"].typed_value() == used_total
    running = virsh_fields(uri, "version")["Running hypervisor"]
    assert by_name(result)["VirtProductInfo"].value == running  # "TEST 0.0.2"


def test_vm_values_match_virsh_on_test_default() -> None:
    check_vms_against_virsh(DEFAULT_URI, (TEST_DOMAIN,))


def test_vm_values_match_virsh_on_a_node_file(node: tuple[str, list]) -> None:
    uri, written = node
    domains = LibvirtConnection(uri).list_domains()  # as the cycle lists them
    assert sorted(d.name for d in domains) == sorted(d.name for d in written)
    check_vms_against_virsh(uri, domains)


def test_vms_not_listed_or_restarted_are_skipped(node: tuple[str, list]) -> None:
    uri, _ = node
    listed = LibvirtConnection(uri).list_domains()
    gone = Domain(999, "gone", "00000000-0000-0000-0000-000000000001")
    restarted = Domain(listed[1].id + 100, listed[1].name, listed[1].uuid)
    result = run(VM_NAMES, (listed[0], gone, restarted), uri)
    assert result.failures == ()
    assert {m.vm_id for m in metrics_of(result)} == {listed[0].id, None}
    # The host total still counts every running VM.
    allocated = by_name(result)["MemoryAllocatedToVirtualServers"].typed_value()
    assert allocated == sum(kib(virsh_fields(uri, "dominfo", d.uuid)["Used memory"])
                            for d in listed)


def test_no_domains_means_nothing_allocated() -> None:
    result = run(VM_NAMES, ())
    assert result.failures == ()
    assert [(m.name, m.value) for m in metrics_of(result)] == [
        ("MemoryAllocatedToVirtualServers", "0"), ("VirtProductInfo", "TEST 0.0.2")]


def test_libvirt_down_leaves_only_libvirt_metrics_out(tmp_path: Path) -> None:
    uri = f"test://{tmp_path}/missing.xml"
    vm = run(VM_NAMES, (TEST_DOMAIN,), uri)
    assert metrics_of(vm) == [] and vm.error is None
    assert {f.metric for f in vm.failures} == set(VM_NAMES)
    assert all("cannot connect to libvirt" in f.reason for f in vm.failures)
    host = run(("HostName", "TotalCPUTime"), None, uri)  # host jobs never ask libvirt
    assert list(by_name(host)) == ["HostName", "TotalCPUTime"] and host.failures == ()


def test_values_are_checked_text() -> None:
    result = run(tuple(dict.fromkeys(host_names("sap") + host_names("vhostmd"))), None)
    result_vm = run(VM_NAMES, (TEST_DOMAIN,))
    for m in metrics_of(result) + metrics_of(result_vm):
        assert check_value(m.type, m.value) == m.value


# -- the real daemon ---------------------------------------------------------------

def expected_keys(domains: tuple[Domain, ...]) -> set[tuple[str, str, int | None]]:
    host = set(SAP_HOST) | set(VHOSTMD_HOST)
    keys = {("host", n, None) for n in host}
    keys |= {("vm", n, d.id) for d in domains for n in set(SAP_VM) | set(VHOSTMD_VM)}
    return keys


def wait_complete(disk: Path, keys: set, timeout: float = 15.0) -> list[Metric]:
    def complete() -> list[Metric] | None:
        metrics = ready_metrics(disk)
        if metrics is None:
            return None
        return metrics if {(m.context, m.name, m.vm_id) for m in metrics} >= keys else None

    return wait_for(complete, timeout, f"every built-in metric on {disk}")


def check_types(metrics: list[Metric], domains: tuple[Domain, ...]) -> None:
    uuids = {d.id: d.uuid for d in domains}
    seen = set()
    for m in metrics:
        key = (m.context, m.name, m.vm_id)
        assert key not in seen, f"{key} published twice"
        seen.add(key)
        table = {**SAP_HOST, **VHOSTMD_HOST} if m.context == "host" else {**SAP_VM}
        if m.name in table:
            assert (m.type, m.unit) == table[m.name], key
            assert check_value(m.type, m.value) == m.value
        if m.vm_id is not None:
            assert m.uuid == uuids[m.vm_id]


# The document order of the shipped config (<builtin set="sap"/>, then
# <builtin set="vhostmd"/>): each set in the order it defines, shared metrics
# once. Written out, so that a new collector module cannot reorder it unseen.
SHIPPED_HOST_ORDER = [
    "VirtProductInfo", "MemoryAllocatedToVirtualServers",  # sap, read through libvirt
    "HostName", "HostSystemInfo", "VirtualizationVendor", "NumberOfPhysicalCPUs",
    "TotalCPUTime", "FreePhysicalMemory", "FreeVirtualMemory", "UsedVirtualMemory",
    "PagedInMemory", "PagedOutMemory", "Time",  # the rest of sap
    "TotalPhyCPUs", "NumCPUs", "TotalPhyMem", "UsedMem", "FreeMem",
    "PageInRate", "PageFaultRate",  # vhostmd's own
]
SHIPPED_VM_ORDER = ["TotalCPUTime", "ResourceProcessorLimit",
                    "PhysicalMemoryAllocatedToVirtualSystem", "ResourceMemoryLimit"]


def test_sets_keep_their_defined_order_in_plans() -> None:
    plans = collectors.plan((BuiltinRef("sap", None, None, 10),
                             BuiltinRef("vhostmd", None, None, 11)))
    by_context: dict[str, list[str]] = {"host": [], "vm": []}
    for plan in sorted(plans, key=lambda p: (p.order, p.context == "host")):
        for name in plan.metric_names:
            spec = collectors.BY_KIND[plan.context][name][1]
            by_context[spec.context].append(name)
    assert by_context == {"host": SHIPPED_HOST_ORDER, "vm": SHIPPED_VM_ORDER}


def test_shipped_config_publishes_both_sets(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    conf = shipped("vhostmd.conf").read_text()
    conf = conf.replace("/dev/shm/vhostmd0", str(disk))
    conf = conf.replace("<update_period>5</update_period>", "<update_period>1</update_period>")
    with Daemon(tmp_path, conf, uri=DEFAULT_URI) as daemon:
        metrics = wait_complete(disk, expected_keys((TEST_DOMAIN,)))
        check_types(metrics, (TEST_DOMAIN,))
        values = {(m.context, m.name): m.typed_value() for m in metrics}
        assert values[("host", "HostName")] == socket.gethostname()
        assert values[("host", "MemoryAllocatedToVirtualServers")] == 2097152
        assert values[("vm", "ResourceMemoryLimit")] == 8388608
        assert [m.name for m in metrics if m.context == "host"] == SHIPPED_HOST_ORDER
        assert [m.name for m in metrics if m.vm_id == TEST_DOMAIN.id] == SHIPPED_VM_ORDER
        assert daemon.stop() == 0
    assert "left out:" not in daemon.log()


def test_daemon_mixes_shell_and_builtins_and_keeps_names_out_of_shells(
        tmp_path: Path, node: tuple[str, list]) -> None:
    uri, _ = node
    disk = tmp_path / "vhostmd0"
    metrics = "\n".join([
        metric_xml("Before", "echo first"),
        '    <builtin set="sap"/>',
        metric_xml("Between", "echo NAME", context="vm"),
        '    <builtin set="vhostmd"/>',
        metric_xml("After", "echo last"),
    ])
    domains = LibvirtConnection(uri).list_domains()
    with Daemon(tmp_path, config_xml(disk, metrics, period=1), uri=uri) as daemon:
        published = wait_complete(disk, expected_keys(domains))
        check_types(published, domains)
        host = [m.name for m in published if m.context == "host"]
        assert host[0] == "Before" and host[-1] == "After"  # config order
        assert host.index("HostName") < host.index("TotalPhyCPUs")
        shell = {m.vm_id for m in published if m.name == "Between"}
        plain = {d.id for d in domains if re.fullmatch(r"[A-Za-z0-9._+:@-]+", d.name)}
        assert shell == plain and len(plain) == len(domains) - 2
        assert daemon.stop() == 0
    assert not (Path.cwd() / "pwned").exists() and not (tmp_path / "pwned").exists()


def test_daemon_with_libvirt_down_publishes_host_metrics(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    with Daemon(tmp_path, config_xml(disk, '<builtin set="sap"/>', period=1),
                uri=f"test://{tmp_path}/missing.xml") as daemon:
        keys = {("host", n, None) for n in SAP_HOST} - {
            ("host", "VirtProductInfo", None), ("host", "MemoryAllocatedToVirtualServers", None)}
        published = wait_complete(disk, keys)
        assert not any(m.name == "VirtProductInfo" for m in published)
        daemon.wait_log("left out: cannot connect to libvirt")
        assert daemon.stop() == 0
