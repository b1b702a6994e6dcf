"""<textfile>: the daemon's health in Prometheus text format, against a real daemon.

prometheus_client's own parser reads the file; its values follow what really
happens (a killed worker, a failing metric); a write that fails leaves no
temporary or partial file and the daemon goes on publishing.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from vhostmd.supervisor.config import Config, ConfigError, load_config, parse_config_bytes

from daemon_harness import Daemon, config_xml, header, metric_xml, wait_for

NANOS = metric_xml("Nanos", "date +%s%N", mtype="uint64")
FAILING = metric_xml("Broken", "exit 3", mtype="uint32", context="vm")
REQUIRED = (
    "vhostmd_cycle_duration_seconds", "vhostmd_last_cycle_timestamp_seconds",
    "vhostmd_metrics_published", "vhostmd_metrics_left_out", "vhostmd_child_restarts",
    "vhostmd_virtio_channels", "vhostmd_document_bytes", "vhostmd_disk_bytes",
    "vhostmd_metric_failures",
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(prom: Path) -> Samples | None:
    """(sample name, labels) -> value, parsed by prometheus_client; None if not there."""
    try:
        text = prom.read_text()
    except FileNotFoundError:
        return None
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(prom: Path, name: str, **labels: str) -> float | None:
    got = samples(prom)
    return None if got is None else got.get((name, tuple(sorted(labels.items()))))


def test_textfile_is_parsed_and_follows_real_events(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    prom = tmp_path / "vhostmd.prom"
    conf = config_xml(disk, NANOS + FAILING, transports=("vbd", "virtio"),
                      globals_extra=f"<workers>2</workers><textfile>{prom}</textfile>"
                                    f"<virtio><channel_path>{tmp_path}</channel_path></virtio>")
    with Daemon(tmp_path, conf) as daemon:
        wait_for(lambda: (value(prom, "vhostmd_cycles_total") or 0) >= 2, 10, "two cycles")
        families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
        for name in REQUIRED:
            assert name in families, name
        assert families["vhostmd_child_restarts"].type == "counter"
        got = samples(prom)
        assert got is not None
        assert got[("vhostmd_metrics_published", ())] == 1  # Nanos; Broken fails for VM 1
        assert got[("vhostmd_metrics_left_out", ())] == 1
        assert got[("vhostmd_disk_bytes", ())] == 64 * 1024
        assert got[("vhostmd_virtio_channels", (("state", "connected"),))] == 0
        assert got[("vhostmd_virtio_channels", (("state", "refused"),))] == 0
        assert 0 < got[("vhostmd_cycle_duration_seconds", ())] < 1
        failures = {labels: v for (name, labels), v in got.items()
                    if name == "vhostmd_metric_failures"}
        # Labelled by metric and context; the test driver's VM is "test", never a label.
        assert failures == {(("context", "vm"), ("metric", "Broken")): 1}
        assert all("test" not in dict(labels).values() for _n, labels in got)
        wait_for(lambda: value(prom, "vhostmd_document_bytes") == header(disk).length, 5,
                 "the document size of the disk's document")
        for role in ("worker", "disk-writer", "virtio", "events"):
            assert got[("vhostmd_child_restarts_total", (("role", role),))] == 0

        before = value(prom, "vhostmd_last_cycle_timestamp_seconds")
        os.kill(daemon.child_pid("worker 1 "), signal.SIGKILL)
        wait_for(lambda: value(prom, "vhostmd_child_restarts_total", role="worker") == 1, 5,
                 "the worker restart counted")
        os.kill(daemon.child_pid("disk-writer"), signal.SIGKILL)
        wait_for(lambda: value(prom, "vhostmd_child_restarts_total", role="disk-writer") == 1,
                 5, "the disk-writer restart counted")
        assert value(prom, "vhostmd_child_restarts_total", role="worker") == 1
        assert (value(prom, "vhostmd_last_cycle_timestamp_seconds") or 0) > (before or 0)
        assert daemon.stop() == 0
    # The file stays: an old last-cycle timestamp is how a stopped daemon shows.
    assert samples(prom) is not None
    assert sorted(p.name for p in tmp_path.glob("vhostmd.prom*")) == ["vhostmd.prom"]


def test_failed_write_leaves_no_file_and_the_daemon_goes_on(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    where = tmp_path / "textfiles"
    where.mkdir()
    prom = where / "vhostmd.prom"
    prom.mkdir()  # the rename onto it fails, after the temporary file was written
    conf = config_xml(disk, NANOS, globals_extra=f"<textfile>{prom}</textfile>")
    with Daemon(tmp_path, conf) as daemon:
        daemon.wait_log("cannot write the health textfile")
        first = header(disk).checksum
        wait_for(lambda: header(disk).checksum != first, 5, "the disk updated regardless")
        wait_for(lambda: daemon.log().count("DEBUG: cycle ") >= 3, 5, "more failed writes")
        assert daemon.log().count("cannot write the health textfile") == 1  # once per episode
        assert os.listdir(where) == ["vhostmd.prom"]  # no temporary file left behind
        assert os.listdir(prom) == []
        prom.rmdir()
        daemon.wait_log("written again")
        wait_for(lambda: samples(prom), 5, "the textfile")
        assert os.listdir(where) == ["vhostmd.prom"]
        # A directory that disappears: nothing is created, the daemon goes on.
        prom.unlink()
        where.rmdir()
        daemon.wait_log("No such file or directory")
        assert not where.exists()
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()


def test_textfile_config(tmp_path: Path) -> None:
    conf = tmp_path / "v.conf"
    conf.write_text(config_xml(tmp_path / "d", globals_extra="<textfile>h/v.prom</textfile>"))
    loaded = load_config(conf)
    assert loaded.textfile == str(tmp_path / "h" / "v.prom") and loaded.warnings == ()
    assert load_config_text(tmp_path, "").textfile is None
    odd = load_config_text(tmp_path, "<textfile>/x/vhostmd.txt</textfile>")
    assert any("does not end in .prom" in w for w in odd.warnings)
    twice = "<textfile>/a.prom</textfile><textfile>/b.prom</textfile>"
    try:
        parse_config_bytes(config_xml(tmp_path / "d", globals_extra=twice).encode(), "t.conf")
    except ConfigError as exc:
        assert "<textfile> given more than once" in str(exc)
    else:
        raise AssertionError("a second <textfile> was accepted")


def load_config_text(tmp_path: Path, extra: str) -> Config:

    return parse_config_bytes(config_xml(tmp_path / "d", globals_extra=extra).encode(), "t.conf")
