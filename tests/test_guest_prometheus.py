"""vm-dump-metrics --format prometheus and --textfile (issue 23).

A real daemon on libvirt's test driver publishes the built-in sets on a
metrics disk and over virtio (the guest's port is a socat pty bridged to the
channel socket, as in test_virtio); the guest tool reads both, and the
exposition, parsed with prometheus_client's own parser, equals --format json
for the same document. Fixed documents cover what a daemon never writes
(empty values, several VMs on one disk, unusable names).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostmd.document import Metric, escape, render_document
from vhostmd.guest.api import parse_metrics
from vhostmd.guest.prometheus import prometheus_text
from vhostmd.protocol import CHANNEL_NAME

import nodes
from daemon_harness import (
    Daemon,
    config_xml,
    metric_xml,
    ready_metrics,
    virtio_xml,
    wait_for,
    write_disk_image,
)
from prometheus_check import assert_same_as_json, host_clock, parse

CLI_SCRIPT = Path(sys.executable).parent / "vm-dump-metrics"
CLI = [str(CLI_SCRIPT)] if CLI_SCRIPT.exists() else [sys.executable, "-m", "vhostmd.guest"]
PERIOD = 2
NASTY = 'say "hi" \\ back'  # quotes and a backslash: escaped in a label value
METRICS = "\n".join([
    '<builtin set="sap"/>',
    '<builtin set="vhostmd"/>',
    metric_xml("Motto", "printf '%s' 'say \"hi\" \\ back'"),
    metric_xml("Role", "echo guest-NAME", context="vm"),
])
EXTRA_LABELS = {"Motto": "motto"}
UUID_A = "6695eb01-f6a4-8304-79aa-97f2502e193f"
UUID_B = "a70605c8-7d69-8c44-7e1a-5ecd092cb1e1"


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


@dataclass
class Host:
    daemon: Daemon
    disk: Path
    port: Path  # the guest's end of the virtio channel
    uuid: str


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed")
    root = Path(tempfile.mkdtemp(prefix="vhp"))  # unix socket paths must stay short
    bridge = None
    try:
        uri, domains = nodes.write_node(root / "node.xml", 0, names=["alpha"])
        channel = root / "channels" / "1-alpha"
        channel.mkdir(parents=True)
        port = root / "vport"
        # QEMU's side of the channel listens; the guest's side is the pty.
        bridge = subprocess.Popen(
            ["socat", f"PTY,link={port},raw,echo=0", f"UNIX-LISTEN:{channel / CHANNEL_NAME}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: (channel / CHANNEL_NAME).exists() and port.exists(), 10, "socat")
        disk = root / "vhostmd0"
        config = config_xml(disk, METRICS, period=PERIOD, size_k=256,
                            transports=("vbd", "virtio"),
                            globals_extra=virtio_xml(root / "channels"))
        with Daemon(root, config, uri=uri) as daemon:
            wait_for(lambda: ready_metrics(disk), 20, "the first document")
            yield Host(daemon, disk, port, domains[0].uuid)
    finally:
        if bridge is not None:
            bridge.terminate()
            bridge.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def same_document(*transport: str) -> tuple[str, list[dict]]:
    """The prometheus and json output of one document: read both until the host's
    Time metric (seconds, new every period) agrees."""

    def pair() -> tuple[str, list[dict]] | None:
        prom = run_cli(*transport, "--format", "prometheus")
        as_json = run_cli(*transport, "--format", "json")
        if prom.returncode != 0 or as_json.returncode != 0:
            return None
        objects = json.loads(as_json.stdout)
        exposition = parse(prom.stdout)
        if exposition.value("vhostmd_host_time_seconds") != host_clock(objects):
            return None
        return prom.stdout, objects

    return wait_for(pair, 30, f"one document read twice over {transport}", interval=0.1)


def test_disk_read_equals_json(host: Host) -> None:
    text, objects = same_document("--disk", str(host.disk))
    exposition = parse(text)
    assert_same_as_json(exposition, objects, uuid=host.uuid, extra_labels=EXTRA_LABELS)
    assert exposition.labels_of("vhostmd_host_info")[0]["motto"] == NASTY
    assert exposition.labels_of("vhostmd_vm_info") == [{"uuid": host.uuid, "role": "guest-alpha"}]
    assert exposition.value("vhostmd_guest_read_success") == 1
    assert exposition.labels_of("vhostmd_guest_read_info") == [
        {"transport": "vbd", "source": str(host.disk)}]
    assert abs(exposition.value("vhostmd_guest_read_timestamp_seconds") - time.time()) < 60
    assert exposition.comments == []
    # A few names spelled out, as the docs' table has them.
    assert exposition.type_of("vhostmd_host_total_cpu_time_seconds_total") == "counter"
    assert exposition.type_of("vhostmd_host_paged_in_memory_bytes_total") == "counter"
    assert exposition.type_of("vhostmd_host_total_phy_mem_bytes") == "gauge"
    assert exposition.type_of("vhostmd_vm_total_cpu_time_seconds_total") == "counter"


def test_virtio_read_equals_json(host: Host) -> None:
    text, objects = same_document("--virtio", "--port", str(host.port))
    exposition = parse(text)
    assert_same_as_json(exposition, objects, uuid=host.uuid, extra_labels=EXTRA_LABELS)
    assert exposition.labels_of("vhostmd_guest_read_info") == [
        {"transport": "virtio", "source": str(host.port)}]
    assert {labels["uuid"] for labels in exposition.labels_of(
        "vhostmd_vm_resource_memory_limit_bytes")} == {host.uuid}


def test_textfile_is_written_and_says_when_nothing_could_be_read(
        host: Host, tmp_path: Path) -> None:
    directory = tmp_path / "node-exporter"
    directory.mkdir()
    os.chmod(directory, 0o755)
    textfile = directory / "vhostmd-guest.prom"
    done = run_cli("--disk", str(host.disk), "--textfile", str(textfile), "--max-age", "60")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    written = parse(textfile.read_text())
    assert written.value("vhostmd_guest_read_success") == 1
    assert written.value("vhostmd_host_num_cpus") == os.cpu_count()
    # The host is gone (here: no disk, no port): the file no longer holds its values.
    done = run_cli("--disk", str(host.disk) + ".gone", "--port", str(host.port) + ".gone",
                   "--textfile", str(textfile), "--timeout", "1")
    assert (done.returncode, done.stdout) == (0, "")
    assert done.stderr.count("\n") == 1 and "vhostmd_guest_read_success 0" in done.stderr
    failed = parse(textfile.read_text())
    assert failed.value("vhostmd_guest_read_success") == 0
    assert not [name for name, _ in failed.samples if name.startswith("vhostmd_host_")]
    assert failed.comments[0].startswith("# vhostmd: no metrics read: vbd: ")
    assert sorted(os.listdir(directory)) == ["vhostmd-guest.prom"]


def test_old_document_counts_as_not_read(tmp_path: Path) -> None:
    """A stopped host leaves its last document on the disk: its Time metric gives it away."""
    sampled = int(time.time()) - 300
    disk = write_disk_image(tmp_path / "disk", render_document([
        Metric("Time", "uint64", "host", str(sampled), "s"),
        Metric("NumCPUs", "uint32", "host", "4"),
    ]).encode())
    fresh = parse(run_cli("--disk", str(disk), "--format", "prometheus",
                          "--max-age", "600").stdout)
    assert fresh.value("vhostmd_host_num_cpus") == 4
    stale = run_cli("--disk", str(disk), "--format", "prometheus", "--max-age", "60")
    assert stale.returncode == 1
    assert "more than --max-age 60 s" in stale.stderr and stale.stderr.count("\n") == 1
    exposition = parse(stale.stdout)
    assert exposition.value("vhostmd_guest_read_success") == 0
    assert not [name for name, _ in exposition.samples if name.startswith("vhostmd_host_")]
    no_clock = write_disk_image(tmp_path / "no-clock", render_document([
        Metric("NumCPUs", "uint32", "host", "4")]).encode())
    unknown = parse(run_cli("--disk", str(no_clock), "--format", "prometheus",
                            "--max-age", "60").stdout)
    assert unknown.value("vhostmd_host_num_cpus") == 4
    assert "age is unknown" in unknown.comments[0]


def test_textfile_into_an_unsafe_directory_is_one_error_and_nothing_written(
        tmp_path: Path) -> None:
    disk = write_disk_image(tmp_path / "disk", render_document([
        Metric("NumCPUs", "uint32", "host", "4")]).encode())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "node-exporter"
    link.symlink_to(elsewhere)
    done = run_cli("--disk", str(disk), "--textfile", str(link / "g.prom"))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"vm-dump-metrics: {link} is a symbolic link: "
                           "refusing to write through it\n")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    done = run_cli("--disk", str(disk), "--textfile", str(open_dir / "g.prom"))
    assert done.returncode == 1 and "writable by group or others" in done.stderr
    assert os.listdir(elsewhere) == [] and os.listdir(open_dir) == []


# -- fixed documents -----------------------------------------------------------------

C_STYLE = (  # as the C daemon writes a failed action: an empty value
    b"<metrics>\n"
    b"  <metric type='uint64' context='host'>\n    <name>PageInRate</name>\n"
    b"    <value>400.000000\n</value>\n  </metric>\n"
    b"  <metric type='string' context='host'>\n    <name>VirtualizationVendor</name>\n"
    b"    <value></value>\n  </metric>\n"
    b"  <metric type='uint32' context='host'>\n    <name>NumCPUs</name>\n"
    b"    <value></value>\n  </metric>\n"
    b"</metrics>\n"
)


def test_unreadable_values_are_left_out_with_a_comment(tmp_path: Path) -> None:
    disk = write_disk_image(tmp_path / "disk", C_STYLE)
    done = run_cli("--disk", str(disk), "--format", "prometheus")
    assert done.returncode == 0
    exposition = parse(done.stdout)
    objects = json.loads(run_cli("--disk", str(disk), "--format", "json").stdout)
    # No unit in a C document: no suffix, no conversion.
    assert_same_as_json(exposition, objects, uuid=None,
                        extra_host={"PageInRate": ("page_in_rate", "gauge", 1, None)})
    assert exposition.value("vhostmd_host_page_in_rate") == 400
    assert exposition.comments == [
        "# vhostmd: metric VirtualizationVendor (host) left out: the value is empty",
        "# vhostmd: metric NumCPUs (host) left out: the value is empty",
    ]
    assert "num_cpus" not in done.stdout and "virtualization_vendor" not in done.stdout


def test_shared_disk_gives_one_vm_and_odd_names_are_left_out(tmp_path: Path) -> None:
    metrics = [
        Metric("NumCPUs", "uint32", "host", "16"),
        Metric("NumCPUs", "uint32", "host", "17"),  # twice: the first one counts
        Metric("Num-CPUs", "uint32", "host", "18"),  # the same Prometheus name
        Metric("ÄÖÜ", "uint32", "host", "1"),  # no Prometheus name at all
        Metric("Info", "uint32", "host", "1"),  # vhostmd_host_info is the info series'
        Metric("Note", "string", "host", 'line one\nline "two"'),
        Metric("2ndNote", "string", "host", "x"),  # a label name cannot start with a digit
        Metric("UUID", "string", "vm", "spoof", None, 7, UUID_A),  # the uuid label is taken
        Metric("TotalCPUTime", "real64", "vm", "42.5", "s", 7, UUID_A),
        Metric("TotalCPUTime", "real64", "vm", "69.25", "s", 9, UUID_B),
    ]
    disk = write_disk_image(tmp_path / "disk", render_document(metrics).encode())
    picked = parse(run_cli("--disk", str(disk), "--format", "prometheus", "--uuid",
                           UUID_B.upper()).stdout)
    assert picked.labels_of("vhostmd_vm_total_cpu_time_seconds_total") == [{"uuid": UUID_B}]
    assert picked.value("vhostmd_vm_total_cpu_time_seconds_total", uuid=UUID_B) == 69.25
    assert picked.value("vhostmd_host_num_cpus") == 16
    assert picked.labels_of("vhostmd_host_info") == [{"note": 'line one\nline "two"'}]
    assert picked.labels_of("vhostmd_vm_info") == [{"uuid": UUID_B}]
    assert [line.split(" left out: ")[1] for line in picked.comments] == [
        "published twice, the first one is kept",
        "its name vhostmd_host_num_cpus is taken by metric NumCPUs (host)",
        "its name gives no Prometheus name",
        "its name vhostmd_host_info is taken by the host info series",
        "its name gives no Prometheus label name",
    ]
    own = parse(run_cli("--disk", str(disk), "--format", "prometheus", "--uuid", UUID_A).stdout)
    assert own.labels_of("vhostmd_vm_info") == [{"uuid": UUID_A}]
    assert own.comments[-1].endswith("left out: label uuid is the VM's own UUID")
    # Without --uuid this machine's SMBIOS UUID decides; it is neither VM's here.
    unknown = parse(run_cli("--disk", str(disk), "--format", "prometheus").stdout)
    assert not unknown.labels_of("vhostmd_vm_total_cpu_time_seconds_total")
    assert any("VM metrics left out" in line for line in unknown.comments)


@pytest.mark.parametrize("args", [
    ["--format", "prometheus", "--metric", "NumCPUs"],
    ["--format", "prometheus", "--context", "vm"],
    ["--textfile", "x.prom", "--format", "json"],
    ["--textfile", "x.prom", "-d", "y"],
    ["--max-age", "5"],
    ["--format", "prometheus", "--max-age", "0"],
])
def test_usage_errors(args: list[str]) -> None:
    done = run_cli(*args)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1


def test_guest_side_loads_only_core_and_guest_modules(tmp_path: Path) -> None:
    """The guest package ships core/ and guest/ only; libvirt and psutil are not there."""
    disk = write_disk_image(tmp_path / "disk", render_document([
        Metric("NumCPUs", "uint32", "host", "4")]).encode())
    os.chmod(tmp_path, 0o755)
    code = (
        "import sys\n"
        "sys.modules['libvirt'] = None\n"
        "sys.modules['psutil'] = None\n"
        "from vhostmd.guest.cli import main\n"
        "assert main(['--disk', sys.argv[1], '--textfile', sys.argv[2]]) == 0\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('vhostmd'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(disk), str(tmp_path / "g.prom")],
                          capture_output=True, text=True, timeout=30, check=True)
    host_side = ("vhostmd.supervisor", "vhostmd.workers", "vhostmd.disk", "vhostmd.virtio",
                 "vhostmd.runtime", "vhostmd.etc")
    loaded = done.stdout.split()
    assert "vhostmd.textfile" in loaded and "vhostmd.guest.prometheus" in loaded
    assert not [m for m in loaded if m.startswith(host_side)]
    assert parse((tmp_path / "g.prom").read_text()).value("vhostmd_host_num_cpus") == 4


# -- any document: a valid exposition ----------------------------------------------------

# What XML 1.0 can carry (a document with anything else is refused whole).
XML_CHARS = st.characters(blacklist_categories=("Cs", "Cc"),
                          blacklist_characters="\ufffe\uffff") | st.sampled_from("\t\n\r")
NAME_TEXT = st.text(XML_CHARS, max_size=12) | st.sampled_from(
    ["TotalCPUTime", "Info", "UUID", "CPUs", "Total-CPU-Time", "x_total", "9lives",
     "Two\nLines\\"])
VALUE_TEXT = (st.text(XML_CHARS, max_size=10) | st.integers(-2**65, 2**65).map(str)
              | st.floats().map(str))
FUZZ_METRIC = st.builds(
    Metric,
    name=NAME_TEXT,
    type=st.sampled_from(["int32", "uint32", "int64", "uint64", "real32", "real64", "string"]),
    context=st.sampled_from(["host", "vm"]),
    value=VALUE_TEXT,
    unit=st.sampled_from([None, "s", "KiB", "MiB/s", "1/s", "%", "furlongs"]),
    vm_id=st.just(7),
    uuid=st.sampled_from([UUID_A, UUID_B]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FUZZ_METRIC, max_size=12))
def test_any_document_gives_an_exposition_the_parser_reads(metrics: list[Metric]) -> None:
    """Whatever names, values and units a host publishes: every line parses, no sample
    twice, and every string value comes back exactly as a label value."""
    # The renderer escapes string values only (it is given checked numbers): escape the rest.
    metrics = [Metric(m.name, m.type, m.context,
                      m.value if m.type == "string" else escape(m.value), m.unit,
                      *((m.vm_id, m.uuid) if m.context == "vm" else ()))
               for m in metrics]
    document = parse_metrics(render_document(metrics).encode(), source="fuzz")
    text = prometheus_text(document, read_at=1.0, uuid=UUID_A).decode()
    exposition = parse(text)  # asserts no sample twice
    assert text.endswith("\n")
    for line in text[:-1].split("\n"):  # the format's only line break (not U+2028...)
        assert line.startswith(("# ", "vhostmd_")), line
    labels = [*exposition.labels_of("vhostmd_host_info"), *exposition.labels_of("vhostmd_vm_info")]
    given_strings = {str(m.typed_value()) for m in document.metrics
                     if m.type == "string" and m.problem is None}
    assert {v for found in labels for k, v in found.items() if k != "uuid"} <= given_strings
