"""Fuzzing the parsers that take outside input: each may raise only its documented error."""

from __future__ import annotations

import contextlib
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostmd import mdisk
from vhostmd.guest import MetricsError
from vhostmd.guest.api import parse_metrics
from vhostmd.guest.vbd import read_disk
from vhostmd.protocol import MAX_REQUEST, Request, parse_request
from vhostmd.supervisor.config import ConfigError, MetricDef, Variable, parse_config_bytes
from vhostmd.wire import Domain
from vhostmd.workers.actions import ActionFailed, metrics_from_output

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

CONFIG = b"""<?xml version="1.0"?>
<vhostmd><globals><disk><name>d</name><path>/tmp/d</path><size unit="k">64</size></disk>
<virtio><max_channels>8</max_channels></virtio>
<update_period>5</update_period><path>/bin</path><transport>vbd</transport></globals>
<metrics><metric type="group" context="vm" unit="s"><name>G</name><action>echo 1,2</action>
<variable name="A" type="uint32"/><variable name="B" type="real64"/></metric></metrics>
</vhostmd>"""

XML_BITS = st.sampled_from([
    b"<", b">", b"</", b"/>", b"&", b"&amp;", b"&x;", b"<!DOCTYPE a [<!ENTITY x 'y'>]>",
    b"<metric>", b"</metric>", b"<name>", b"</name>", b"<value>", b"</value>", b"type='",
    b"context='vm'", b"uint32", b"group", b"xml", b"-1", b"99999999999999999999", b"\x00",
    b"\xff", b"<size unit='m'>", b"</size>", b"<update_period>", b"<transport>xenstore",
    b"<builtin set='x'/>", b"]]>", b"<![CDATA[", b"<?pi?>", b"\n", b" ",
])


def mutate(base: bytes, cuts: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(base)
    for position, piece in cuts:
        at = position % (len(data) + 1)
        data[at:at + len(piece) % 7] = piece
    return bytes(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), XML_BITS | st.binary(max_size=12)),
                max_size=6))
def test_config_parser_raises_only_config_errors(cuts: list[tuple[int, bytes]]) -> None:
    try:
        cfg = parse_config_bytes(mutate(CONFIG, cuts), "fuzz.conf")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.conf")
        assert "\n" not in str(exc).strip()
    else:
        assert cfg.update_period >= 1 and mdisk.MIN_SIZE <= cfg.disk_size <= mdisk.MAX_SIZE


@FUZZ
@given(st.binary(max_size=300))
def test_config_parser_on_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ConfigError):
        parse_config_bytes(data, "fuzz.conf")


METRICS = [
    MetricDef("I", t, "vm", "true") for t in
    ("int32", "uint32", "int64", "uint64", "real32", "real64", "string", "xml")
] + [MetricDef("G", "group", "host", "true",
               variables=(Variable("A", "uint32"), Variable("B", "real64")))]
OUTPUT_BITS = st.sampled_from([
    b"1", b"-", b"+", b".", b"e", b"5", b",", b"\n", b" ", b"nan", b"inf", b"\xc3\xa9", b"\xff",
    b"<metric type='uint32' context='vm'><name>X</name><value>", b"</value></metric>",
    b"<metric type='group' context='host'>", b"&", b"&lt;", b"<!DOCTYPE x>", b"\x07",
])


@FUZZ
@given(st.sampled_from(METRICS), st.lists(OUTPUT_BITS | st.binary(max_size=8), max_size=12))
def test_action_output_parser_raises_only_action_failed(metric: MetricDef,
                                                        parts: list[bytes]) -> None:
    domain = Domain(3, "vm3", "00000000-0000-0000-0000-000000000003")
    try:
        metrics = metrics_from_output(metric, b"".join(parts), domain)
    except ActionFailed as exc:
        assert "\n" not in str(exc).strip()
    else:
        for m in metrics:
            assert m.vm_id == (3 if metric.context == "vm" else None) or metric.type == "group"
            m.render()


@FUZZ
@given(st.lists(st.sampled_from([b"GET /metrics/XML", b"\n", b"\r\n", b"\r", b"GET", b"x",
                                 b"\x00", b"\n\n"]) | st.binary(max_size=40), max_size=40))
def test_virtio_request_parser(parts: list[bytes]) -> None:
    buf = b"".join(parts)
    kind, consumed = parse_request(buf)
    if kind is None:
        assert consumed == 0 and len(buf) < MAX_REQUEST
    else:
        assert 0 < consumed <= min(len(buf), MAX_REQUEST)
        if kind is Request.METRICS:
            assert buf[:consumed].rstrip(b"\r\n") == b"GET /metrics/XML"


HEADER = st.builds(
    lambda sig, busy, checksum, length: mdisk.HEADER.pack(sig, busy, checksum, length),
    st.sampled_from([b"mvbd", b"mvbe", b"\0\0\0\0"]), st.sampled_from([0, 0, 0, 1]),
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1) | st.integers(0, 2000))


@FUZZ
@given(HEADER, st.binary(max_size=1500), st.booleans())
def test_guest_disk_reader_raises_only_metrics_errors(header: bytes, content: bytes,
                                                      fix_checksum: bool) -> None:
    if fix_checksum:
        sig, busy, _, length = mdisk.HEADER.unpack(header)
        header = mdisk.HEADER.pack(sig, busy, mdisk.checksum_signed(content[:length]), length)
    image = (header + content).ljust(1024, b"\0")
    fd, path = tempfile.mkstemp(prefix="fuzzdisk")
    try:
        os.write(fd, image)
        os.close(fd)
        try:
            raw = read_disk(path, timeout=0.05)
            parse_metrics(raw, source=path)
        except MetricsError as exc:
            assert "\n" not in str(exc).strip()
    finally:
        os.unlink(path)
