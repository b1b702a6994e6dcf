"""The guest tool against the real daemon: what it reads is exactly what was written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_harness import (
    Daemon,
    config_xml,
    metric_xml,
    read_disk,
    ready_metrics,
    wait_for,
)

GUEST = str(Path(sys.executable).parent / "vm-dump-metrics")
# Constant values: the document is the same every cycle, so reads can be compared.
METRICS = "".join([
    metric_xml("Greeting", "printf 'Gr\\303\\274\\303\\237e &amp; &lt;co&gt;'"),
    metric_xml("Cores", "echo 16", mtype="uint32", attrs=' unit="count"'),
    metric_xml("Ratio", "echo 0.25", mtype="real64"),
    metric_xml("VmName", "echo NAME", context="vm"),
])


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    os.chmod(tmp_path, 0o755)
    disk = tmp_path / "vhostmd0"
    with Daemon(tmp_path, config_xml(disk, METRICS)) as running:
        wait_for(lambda: ready_metrics(disk), 20, "the first document")
        yield running, disk
        assert running.stop() == 0


def guest(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([GUEST, *args], capture_output=True, timeout=30, check=False)


def test_disk_option_reads_what_the_daemon_wrote(daemon: tuple[Daemon, Path]) -> None:
    _, disk = daemon
    result = guest("--disk", str(disk))
    assert result.returncode == 0, result.stderr
    assert result.stdout == read_disk(disk)
    as_json = json.loads(guest("--disk", str(disk), "--format", "json").stdout)
    values = {(m["context"], m["name"]): m["value"] for m in as_json}
    assert values[("host", "Greeting")] == "Grüße & <co>"
    assert values[("host", "Cores")] == 16
    assert values[("host", "Ratio")] == 0.25
    assert values[("vm", "VmName")] == "test"
    vm = next(m for m in as_json if m["name"] == "VmName")
    assert (vm["id"], vm["uuid"]) == (1, "6695eb01-f6a4-8304-79aa-97f2502e193f")
    assert guest("--disk", str(disk), "--metric", "Cores").stdout == b"16\n"


def test_vbd_scan_of_a_loop_device_reads_what_the_daemon_wrote(
        daemon: tuple[Daemon, Path]) -> None:
    _, disk = daemon
    if os.geteuid() != 0:
        pytest.skip("attaching a loop device needs root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    attach = subprocess.run(["losetup", "-r", "-f", "--show", str(disk)], capture_output=True,
                            text=True, timeout=20, check=False)
    if attach.returncode != 0:
        pytest.skip(f"no loop device available: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        result = guest("-b", "-v")
        found = [line.rsplit(" ", 1)[1] for line in result.stderr.decode().splitlines()
                 if "metrics disk found on" in line]
        if found[:1] != [device]:
            pytest.skip(f"another metrics disk ({found[:1]}) comes before {device}")
        assert result.returncode == 0, result.stderr
        assert result.stdout == read_disk(disk)
        direct = guest("--disk", device)
        assert direct.returncode == 0 and direct.stdout == read_disk(disk)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=20, check=False)
