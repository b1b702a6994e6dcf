"""Drop-in for the C vhostmd: its config keeps every metric, its helper script, no empty values."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vhostmd.supervisor.config import load_config

from daemon_harness import (
    Daemon,
    config_xml,
    disk_metrics,
    metric_xml,
    read_disk,
    ready_metrics,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
PAGERATE = REPO / "etc" / "scripts" / "pagerate.pl"
UPSTREAM_CONF = Path(__file__).parent / "data" / "compat" / "upstream-1.2-vhostmd.conf"
# Where the C package installs its scripts, and the upstream config's PATH names.
SCRIPT_DIR = "/usr/share/vhostmd/scripts"


def vmstat() -> dict[str, int]:
    counters = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, value = line.split()
        counters[key] = int(value)
    return counters


# -- the helper script ----------------------------------------------------------------


def test_pagerate_prints_page_in_and_fault_rates_as_upstream_does() -> None:
    before = vmstat()
    result = subprocess.run([str(PAGERATE)], capture_output=True, text=True, timeout=30,
                            check=False)
    after = vmstat()
    assert (result.returncode, result.stderr) == (0, "")
    # The contract of upstream's pagerate.pl: "PageInRate,PageFaultRate", printf %f style.
    match = re.fullmatch(r"([0-9]+)\.000000,([0-9]+)\.000000\n", result.stdout)
    assert match, result.stdout
    page_in, faults = (int(group) for group in match.groups())
    # Per second over one second, inside the window the test measured.
    assert page_in <= after["pgpgin"] - before["pgpgin"]
    assert faults <= after["pgfault"] - before["pgfault"]
    assert faults > 0  # starting `sleep` alone faults pages in


def test_pagerate_averages_over_the_interval_given() -> None:
    before = vmstat()
    result = subprocess.run([str(PAGERATE), "2"], capture_output=True, text=True, timeout=30,
                            check=False)
    after = vmstat()
    assert result.returncode == 0, result.stderr
    faults = int(result.stdout.strip().split(",")[1].split(".")[0])
    assert 0 < faults <= (after["pgfault"] - before["pgfault"]) // 2


@pytest.mark.parametrize(("arg", "reason"), [
    ("soon", "'soon' is not a whole number of seconds"),
    ("-1", "'-1' is not a whole number of seconds"),
    ("0", "the interval must be at least 1 second"),
])
def test_pagerate_bad_interval_is_one_line(arg: str, reason: str) -> None:
    result = subprocess.run([str(PAGERATE), arg], capture_output=True, text=True, timeout=30,
                            check=False)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"pagerate.pl: {reason}\n")


# -- the upstream config, on a real daemon ---------------------------------------------------


def upstream_config(tmp: Path) -> str:
    """The upstream file with only its host paths moved into ``tmp``: the disk, the
    virtio channel directory, and the C package's script directory (pointed at the
    checkout's copy, so the test installs nothing). Every metric stays as it is."""
    text = UPSTREAM_CONF.read_text()
    replacements = {
        "<path>/dev/shm/vhostmd0</path>": f"<path>{tmp / 'vhostmd0'}</path>",
        "<channel_path>/var/run/libvirt/qemu/channel</channel_path>":
            f"<channel_path>{tmp / 'channels'}</channel_path>",
        f":{SCRIPT_DIR}</path>": f":{PAGERATE.parent}</path>",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tmp / "channels").mkdir()
    return text


def test_upstream_config_publishes_its_page_rates(tmp_path: Path) -> None:
    for tool in ("virsh", "vmstat", "free", "awk"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed; the upstream config's actions need it")
    disk = tmp_path / "vhostmd0"
    config = upstream_config(tmp_path)
    (tmp_path / "check.conf").write_text(config)
    names = {m.name for m in load_config(tmp_path / "check.conf").metrics}
    assert "PageRates" in names  # the same metrics as the upstream file
    with Daemon(tmp_path, config) as daemon:
        # update_period 5 as upstream has it: the first cycle publishes once its
        # actions are done (pagerate.pl takes a second), at the latest after 4 s.
        wait_for(lambda: ready_metrics(disk), 20, "the first document")
        got = {(m.context, m.name): m for m in disk_metrics(disk)}
        raw = read_disk(disk).decode()
        for name in ("PageInRate", "PageFaultRate"):
            metric = got[("host", name)]
            assert metric.type == "uint64"
            assert re.fullmatch(r"[0-9]+", metric.value), metric.value  # "400.000000" -> "400"
        assert got[("host", "PageFaultRate")].typed_value() > 0
        assert "PageRates left out" not in daemon.log()
        # The rest of the file publishes too, except what needs tools Debian lacks
        # (rpm for VirtualizationVendor).
        expected = {("host", n) for n in (
            "HostName", "VirtualizationProductInfo", "TotalPhyCPUs", "NumCPUs", "TotalPhyMem",
            "UsedMem", "FreeMem", "PagedInMemory", "PagedOutMemory", "PageInRate",
            "PageFaultRate", "TotalCPUTime")} | {("vm", "TotalCPUTime")}
        assert expected <= set(got), sorted(expected - set(got))
        assert ".000000<" not in raw and "<value></value>" not in raw
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()


# -- never an empty value ----------------------------------------------------------------


def test_empty_and_blank_values_are_left_out_and_logged_once(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    flag = tmp_path / "flag"
    flag.write_text("")
    metrics = "\n".join([
        metric_xml("Good", "echo fine"),
        metric_xml("Silent", "true"),
        metric_xml("Blank", "printf ' \\n\\t\\n'"),
        metric_xml("SilentVm", "true", context="vm"),
        metric_xml("Later", f"cat {flag}"),
        metric_xml("HalfGroup", "echo 7,", mtype="group",
                   extra='<variable name="A" type="uint32"/><variable name="B" type="string"/>'),
        metric_xml("EmptyXml", "echo \"&lt;metric type='string' context='host'&gt;&lt;name&gt;E"
                   "&lt;/name&gt;&lt;value&gt;&lt;/value&gt;&lt;/metric&gt;\"", mtype="xml"),
    ])
    with Daemon(tmp_path, config_xml(disk, metrics)) as daemon:
        wait_for(lambda: ready_metrics(disk), 20, "the first document")
        daemon.wait_log("cycle 3:")
        assert {(m.context, m.name) for m in disk_metrics(disk)} == {("host", "Good")}
        assert "<value></value>" not in read_disk(disk).decode()
        log = daemon.log()
        for target in ("host metric Silent", "host metric Blank",
                       "vm metric SilentVm of domain id 1 ('test')", "host metric Later",
                       "host metric HalfGroup"):
            assert log.count(f"{target} left out: the value is empty\n") == 1, (target, log)
        assert log.count("host metric EmptyXml left out: action output line 1: metric E: "
                         "the value is empty\n") == 1
        flag.write_text("now\n")
        wait_for(lambda: any(m.name == "Later" for m in disk_metrics(disk)), 5, "Later")
        daemon.wait_log("host metric Later recovered")
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()
