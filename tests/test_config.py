"""Config loading: the real-world files load unchanged; broken ones get one clear line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vhostmd.etc import shipped
from vhostmd.supervisor.config import ConfigError, load_config, parse_config_bytes

from daemon_harness import VHOSTMD, config_xml, metric_xml

DATA = Path(__file__).parent / "data" / "compat"


def test_upstream_config_loads_unchanged() -> None:
    cfg = load_config(DATA / "upstream-1.2-vhostmd.conf")
    assert cfg.disk_path == "/dev/shm/vhostmd0"
    assert cfg.disk_size == 256 * 1024
    assert cfg.update_period == 5
    assert cfg.transports == ("vbd", "virtio")
    assert cfg.channel_paths == ("/var/run/libvirt/qemu/channel",)
    assert cfg.max_channels == 1024 and cfg.expiration_time == 15
    names = [(m.context, m.name) for m in cfg.metrics]
    assert ("vm", "TotalCPUTime") in names and ("host", "PageRates") in names
    group = next(m for m in cfg.metrics if m.type == "group")
    assert [(v.name, v.type) for v in group.variables] == [
        ("PageInRate", "uint64"), ("PageFaultRate", "uint64")]
    # '&amp;&amp;' in the file is a shell '&&' in the action
    used = next(m for m in cfg.metrics if m.name == "UsedMem")
    assert "&&" in used.action


def test_pvc_config_loads_unchanged() -> None:
    cfg = load_config(DATA / "pvc-vhostmd.conf")
    # no <channel_path>: both libvirt locations are searched
    assert cfg.channel_paths == ("/var/run/libvirt/qemu/channel",
                                 "/var/lib/libvirt/qemu/channel/target")
    assert [m.name for m in cfg.metrics][:2] == ["HostName", "VirtualizationVendor"]
    assert cfg.metrics[0].action == "cat /etc/hostname"


def test_shipped_default_config_loads() -> None:
    cfg = load_config(shipped("vhostmd.conf"))
    assert cfg.vbd and cfg.update_period >= 1


def test_expiration_below_floor_is_raised_with_warning() -> None:
    text = config_xml("/tmp/x", period=5, globals_extra=(
        "<virtio><expiration_time>4</expiration_time></virtio>"))
    cfg = parse_config_bytes(text.encode(), "t.conf")
    assert cfg.expiration_time == 15
    assert any("expiration_time 4" in w for w in cfg.warnings)


def test_malformed_xml_names_its_line_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config_bytes(b"<vhostmd>\n<globals>\n<update_period", "x.conf")
    assert str(err.value) == "x.conf:3: malformed XML: Couldn't find end of Start Tag update_period"
    with pytest.raises(ConfigError) as err:
        parse_config_bytes(b"<vhostmd>\n<globals>\n</vhostmd>\n", "x.conf")
    # libxml2's own "line 2" is where <globals> began: another line, so it stays.
    assert str(err.value) == ("x.conf:3: malformed XML: Opening and ending tag mismatch: "
                              "globals line 2 and vhostmd")


GOOD_METRIC = metric_xml("A", "echo 1", mtype="uint32")
BROKEN = {
    "malformed": (config_xml("/tmp/d", GOOD_METRIC).replace("</globals>", "</global>"),
                  "malformed XML"),
    "unknown type": (config_xml("/tmp/d", metric_xml("A", "echo 1", mtype="uint33")),
                     "uint33"),
    "unknown context": (config_xml("/tmp/d", metric_xml("A", "echo 1", context="guest")),
                        "guest"),
    "size too small": (config_xml("/tmp/d", GOOD_METRIC).replace('<size unit="k">64</size>',
                                                                 "<size>1000</size>"),
                       "out of range"),
    "size too large": (config_xml("/tmp/d", GOOD_METRIC).replace('<size unit="k">64</size>',
                                                                 '<size unit="m">257</size>'),
                       "out of range"),
    "period zero": (config_xml("/tmp/d", GOOD_METRIC, period=0), "update_period"),
    "period negative": (config_xml("/tmp/d", GOOD_METRIC, period=-3), "update_period"),
    "missing name": (config_xml("/tmp/d", '<metric type="uint32" context="host">'
                                          "<action>echo 1</action></metric>"), "metric"),
    "missing action": (config_xml("/tmp/d", '<metric type="uint32" context="host">'
                                            "<name>A</name></metric>"), "metric"),
    "xenstore": (config_xml("/tmp/d", GOOD_METRIC, transports=("vbd", "xenstore")),
                 "xenstore"),
    "entity": ('<?xml version="1.0"?><!DOCTYPE vhostmd [<!ENTITY x "boom">]>'
               + config_xml("/tmp/d", metric_xml("A", "echo &x;")).split("?>", 1)[1],
               "entit"),
    # libxml2 expands entities in attribute values whatever the parser's options:
    # the declaration itself is refused.
    "entity in an attribute": (
        '<?xml version="1.0"?><!DOCTYPE vhostmd [<!ENTITY t "uint32">]>'
        + config_xml("/tmp/d", metric_xml("A", "echo 1", mtype="&t;")).split("?>", 1)[1],
        "entit"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_config_is_one_clear_line(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    conf = tmp_path / "broken.conf"
    conf.write_text(text)
    proc = subprocess.run([VHOSTMD, "-d", "-f", str(conf), "-p", str(tmp_path / "pid")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith(f"vhostmd: {conf}:"), lines[0]
    assert expected in lines[0], lines[0]


def test_entity_declared_for_an_attribute_is_refused() -> None:
    text = ('<?xml version="1.0"?><!DOCTYPE vhostmd [<!ENTITY t "uint32">]>'
            + config_xml("/tmp/d", metric_xml("A", "echo 1", mtype="&t;")).split("?>", 1)[1])
    with pytest.raises(ConfigError, match="entity declarations and references are not allowed"):
        parse_config_bytes(text.encode(), "t.conf")


def test_broken_config_names_the_line(tmp_path: Path) -> None:
    text = config_xml("/tmp/d", "\n\n" + metric_xml("A", "echo 1", mtype="bogus"))
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "bogus" in t)
    with pytest.raises(ConfigError, match=rf"^t.conf:{line}: "):
        parse_config_bytes(text.encode(), "t.conf")


def test_missing_config_file_is_clear(tmp_path: Path) -> None:
    proc = subprocess.run([VHOSTMD, "-d", "-f", str(tmp_path / "nope.conf"), "-p",
                           str(tmp_path / "pid")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert proc.stderr.strip() == (f"vhostmd: {tmp_path / 'nope.conf'}: cannot read config: "
                                   "No such file or directory")


def test_check_option_validates(tmp_path: Path) -> None:
    conf = tmp_path / "ok.conf"
    conf.write_text(config_xml(tmp_path / "disk", GOOD_METRIC))
    proc = subprocess.run([VHOSTMD, "--check", "-f", str(conf), "-p", str(tmp_path / "pid")],
                          capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and "OK" in proc.stdout
