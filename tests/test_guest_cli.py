"""vm-dump-metrics as operators run it: a subprocess, real files, a real read-only loop device."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostmd.document import Metric, render_document
from vhostmd.mdisk import checksum_signed, pack_header

from daemon_harness import write_disk_image

CLI_SCRIPT = Path(sys.executable).parent / "vm-dump-metrics"
CLI = [str(CLI_SCRIPT)] if CLI_SCRIPT.exists() else [sys.executable, "-m", "vhostmd.guest"]
UPSTREAM_DISK = Path(__file__).parent / "data" / "compat" / "upstream-1.2-disk-4k.img"
UUID_7 = "6695eb01-f6a4-8304-79aa-97f2502e193f"
UUID_9 = "a70605c8-7d69-8c44-7e1a-5ecd092cb1e1"

METRICS = [
    Metric("NumCPUs", "uint32", "host", "16", unit="count"),
    Metric("TotalPhyMem", "uint64", "host", "7962", unit="MiB"),
    Metric("HostName", "string", "host", "node-1 & <co>"),
    Metric("Greeting", "string", "host", "Grüße"),
    Metric("TotalCPUTime", "real64", "vm", "42.5", "s", 7, UUID_7),
    Metric("TotalCPUTime", "real64", "vm", "69.25", "s", 9, UUID_9),
]
DOCUMENT = render_document(METRICS).encode()




def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=timeout, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], status: int = 1) -> str:
    assert result.returncode == status, result
    assert result.stdout == b""
    stderr = result.stderr.decode()
    assert stderr.startswith("vm-dump-metrics: ")
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    return stderr


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return write_disk_image(tmp_path / "vhostmd0", DOCUMENT)


def test_xml_output_is_the_document_byte_for_byte(disk: Path) -> None:
    result = run_cli("--disk", str(disk))
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == DOCUMENT


def test_c_original_disk_is_printed_unchanged() -> None:
    image = UPSTREAM_DISK.read_bytes()
    length = int.from_bytes(image[12:16], "big")
    result = run_cli("-b", "--disk", str(UPSTREAM_DISK))
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == image[16 : 16 + length]
    assert b"<value>16\n</value>" in result.stdout  # kept exactly as the C original wrote it


def test_json_output_has_typed_values(disk: Path) -> None:
    result = run_cli("--disk", str(disk), "--format", "json")
    assert result.returncode == 0, result.stderr
    objects = json.loads(result.stdout)
    assert objects[0] == {
        "name": "NumCPUs",
        "type": "uint32",
        "context": "host",
        "unit": "count",
        "id": None,
        "uuid": None,
        "value": 16,
        "raw": "16",
        "problem": None,
    }
    assert [o["value"] for o in objects] == [16, 7962, "node-1 & <co>", "Grüße", 42.5, 69.25]
    assert (objects[4]["id"], objects[4]["uuid"]) == (7, UUID_7)


def test_one_metric(disk: Path) -> None:
    assert run_cli("--disk", str(disk), "--metric", "NumCPUs").stdout == b"16\n"
    assert run_cli("--disk", str(disk), "--metric", "HostName").stdout == b"node-1 & <co>\n"
    result = run_cli("--disk", str(disk), "--metric", "TotalCPUTime", "--context", "vm",
                     "--uuid", UUID_9)  # fmt: skip
    assert result.stdout == b"69.25\n"
    result = run_cli("--disk", str(disk), "--metric", "TotalPhyMem", "--format", "json")
    assert json.loads(result.stdout)["value"] == 7962


def test_absent_metric_fails_with_one_line(disk: Path) -> None:
    stderr = assert_one_line_error(run_cli("--disk", str(disk), "--metric", "Nope"))
    assert "Nope" in stderr


def test_dest_file(disk: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out.xml"
    result = run_cli("--disk", str(disk), "-d", str(dest))
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert dest.read_bytes() == DOCUMENT
    stderr = assert_one_line_error(run_cli("--disk", str(disk), "--dest", str(tmp_path / "no/x")))
    assert "cannot write" in stderr


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("bad signature", "bad signature"),
        ("length past end", "past the end"),
        ("checksum mismatch", "checksum mismatch"),
        ("invalid XML", "invalid XML"),
        ("busy forever", "still busy"),
        ("missing file", "No such file"),
    ],
)
def test_bad_disks_fail_with_one_line(tmp_path: Path, kind: str, reason: str) -> None:
    path = tmp_path / "bad.img"
    if kind == "bad signature":
        path.write_bytes(b"\0" * 4096)
    elif kind == "length past end":
        write_disk_image(path, DOCUMENT, size=4096, length=1 << 20)
    elif kind == "checksum mismatch":
        write_disk_image(path, DOCUMENT, checksum=0xBAD)
    elif kind == "invalid XML":
        write_disk_image(path, DOCUMENT[:-20])
    elif kind == "busy forever":
        write_disk_image(path, DOCUMENT, busy=1)
    started = time.monotonic()
    result = run_cli("-b", "--disk", str(path), "--timeout", "0.3")
    assert time.monotonic() - started < 10
    assert reason in assert_one_line_error(result)


# What C daemons write: printf("%f") integers, empty values when an action
# failed, trailing newlines; and a value that fits no type.
C_STYLE = (
    b"<metrics>\n"
    b"  <metric type='uint64' context='host'>\n    <name>PageInRate</name>\n"
    b"    <value>400.000000\n</value>\n  </metric>\n"
    b"  <metric type='string' context='host'>\n    <name>VirtualizationVendor</name>\n"
    b"    <value></value>\n  </metric>\n"
    b"  <metric type='uint32' context='host'>\n    <name>NumCPUs</name>\n"
    b"    <value>16 cpus\n</value>\n  </metric>\n"
    b"  <metric type='string' context='host'>\n    <name>HostName</name>\n"
    b"    <value>c-host\n</value>\n  </metric>\n"
    b"</metrics>\n"
)


@pytest.fixture
def c_style_disk(tmp_path: Path) -> Path:
    return write_disk_image(tmp_path / "c-style.img", C_STYLE)


def test_xml_mode_prints_a_c_style_document_unchanged(c_style_disk: Path) -> None:
    result = run_cli("--disk", str(c_style_disk))
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == C_STYLE


def test_json_delivers_every_metric_and_names_each_problem(c_style_disk: Path) -> None:
    result = run_cli("--disk", str(c_style_disk), "--format", "json")
    assert result.returncode == 0, result.stderr
    objects = json.loads(result.stdout)
    got = {o["name"]: (o["value"], o["raw"], o["problem"]) for o in objects}
    assert got == {
        "PageInRate": (400, "400.000000\n", None),
        "VirtualizationVendor": (None, "", "the value is empty"),
        "NumCPUs": (None, "16 cpus\n", "'16 cpus' is not an integer"),
        "HostName": ("c-host", "c-host\n", None),
    }
    lines = result.stderr.decode().splitlines()
    assert lines == [
        f"vm-dump-metrics: {c_style_disk} line 7: metric VirtualizationVendor (host): "
        "the value is empty",
        f"vm-dump-metrics: {c_style_disk} line 11: metric NumCPUs (host): "
        "'16 cpus' is not an integer",
    ]


def test_one_metric_of_a_c_style_document(c_style_disk: Path) -> None:
    assert run_cli("--disk", str(c_style_disk), "--metric", "PageInRate").stdout == b"400\n"
    result = run_cli("--disk", str(c_style_disk), "--metric", "HostName", "--format", "json")
    assert json.loads(result.stdout)["value"] == "c-host"
    for fmt in ("xml", "json"):
        stderr = assert_one_line_error(
            run_cli("--disk", str(c_style_disk), "--metric", "NumCPUs", "--format", fmt))
        assert stderr == (f"vm-dump-metrics: {c_style_disk}: metric NumCPUs (host): "
                          "'16 cpus' is not an integer\n")


def test_c_original_disk_as_json_and_one_metric() -> None:
    result = run_cli("--disk", str(UPSTREAM_DISK), "--format", "json")
    assert (result.returncode, result.stderr) == (0, b"")
    objects = json.loads(result.stdout)
    assert [(o["name"], o["value"]) for o in objects] == [
        ("PageInRate", 12), ("PageFaultRate", 34), ("NumCPUs", 16), ("Greeting", "Grüße"),
        ("HostName", "compat-host"), ("TotalCPUTime", 42.5)]
    assert objects[2]["raw"] == "16\n"
    result = run_cli("--disk", str(UPSTREAM_DISK), "--metric", "TotalCPUTime", "--context", "vm")
    assert (result.returncode, result.stdout) == (0, b"42.5\n")


def test_without_transport_option_both_failures_are_reported(tmp_path: Path) -> None:
    result = run_cli("--disk", str(tmp_path / "absent"), "--port", str(tmp_path / "no-port"))
    stderr = assert_one_line_error(result)
    assert "vbd: " in stderr and "virtio: " in stderr


@pytest.mark.parametrize(
    "args",
    [
        ["-b", "-i"],
        ["-i", "--disk", "/dev/null"],
        ["-b", "--port", "/dev/null"],
        ["--context", "vm"],
        ["--metric", "X", "--uuid", UUID_7],
        ["--timeout", "0"],
        ["--format", "yaml"],
        ["--no-such-option"],
    ],
)
def test_usage_errors_are_one_line(args: list[str]) -> None:
    assert_one_line_error(run_cli(*args), status=2)


def test_help() -> None:
    result = run_cli("-h")
    assert result.returncode == 0
    for option in (
        b"--vbd",
        b"--virtio",
        b"--dest",
        b"--disk",
        b"--port",
        b"--format",
        b"--metric",
    ):
        assert option in result.stdout


# -- a real read-only block device, scanned through /sys/block ---------------------------


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if os.geteuid() != 0:
        pytest.skip("attaching a loop device needs root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = write_disk_image(tmp_path / "vhostmd0", DOCUMENT)
    attach = subprocess.run(
        ["losetup", "-r", "-f", "--show", str(backing)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if attach.returncode != 0:
        pytest.skip(f"no loop device available: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=20, check=False)


def _scan(*args: str) -> tuple[subprocess.CompletedProcess[bytes], str | None]:
    result = run_cli("-b", "-v", *args)
    found = [
        line.rsplit(" ", 1)[1]
        for line in result.stderr.decode().splitlines()
        if "metrics disk found on" in line
    ]
    return result, found[0] if found else None


def test_vbd_scan_finds_a_read_only_loop_device(loop_disk: tuple[str, Path]) -> None:
    device, backing = loop_disk
    result, found = _scan()
    if found != device:
        pytest.skip(f"another metrics disk ({found}) comes before {device} in /sys/block")
    assert result.returncode == 0, result.stderr
    assert result.stdout == DOCUMENT

    # The host rewrites the disk: the guest must see the new document, not a
    # cached copy of the old one (the reason for O_DIRECT). Another opener that
    # read the device through the page cache keeps that stale copy alive.
    with open(device, "rb") as cached_reader:
        assert cached_reader.read(len(DOCUMENT) + 16)[16:] == DOCUMENT
        updated = DOCUMENT.replace(b"<value>16</value>", b"<value>32</value>")
        with open(backing, "r+b") as image:
            image.write(pack_header(0, checksum_signed(updated), len(updated)) + updated)
        result, found = _scan("--metric", "NumCPUs")
    assert (result.returncode, found, result.stdout) == (0, device, b"32\n"), result.stderr


def test_disk_option_reads_the_loop_device(loop_disk: tuple[str, Path]) -> None:
    device, _ = loop_disk
    result = run_cli("--disk", device, "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[2]["value"] == "node-1 & <co>"
