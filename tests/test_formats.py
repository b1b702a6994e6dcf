"""The byte formats: disk header and checksum, document layout, escaping, value types."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from vhostmd import mdisk
from vhostmd.document import InvalidValue, Metric, check_value, parse_document, render_document

COMPAT_DISK = Path(__file__).parent / "data" / "compat" / "upstream-1.2-disk-4k.img"


def test_signed_checksum_matches_the_c_original() -> None:
    raw = COMPAT_DISK.read_bytes()
    head = mdisk.unpack_header(raw)
    content = raw[16 : 16 + head.length]
    assert head.signature == b"mvbd" and head.busy == 0
    assert mdisk.checksum_signed(content) == head.checksum == 0xDDB0
    assert mdisk.checksum_unsigned(content) == 0xE1B0
    # the C original's disk parses with the same reader guests use
    metrics = parse_document(content)
    assert [m.name for m in metrics][-1] == "TotalCPUTime"
    assert metrics[-1].vm_id == 1 and metrics[-1].typed_value() == 42.5


def test_layout_is_byte_identical_to_the_c_original_for_clean_values() -> None:
    raw = COMPAT_DISK.read_bytes()
    content = raw[16 : 16 + mdisk.unpack_header(raw).length].decode()
    ours = render_document([
        Metric("PageInRate", "uint64", "host", "12"),
        Metric("PageFaultRate", "uint64", "host", "34"),
        Metric("NumCPUs", "uint32", "host", "16\n", unit="count"),
        Metric("Greeting", "string", "host", "Grüße"),
        Metric("HostName", "string", "host", "compat-host\n"),
        Metric("TotalCPUTime", "real64", "vm", "42.5\n", unit="s", vm_id=1,
               uuid="6695eb01-f6a4-8304-79aa-97f2502e193f"),
    ])
    # The C original keeps the action's trailing newline raw; we write &#10;.
    assert ours.replace("&#10;", "\n") == content


@pytest.mark.parametrize("value", ["a&b<c>", "it's \"quoted\"", "Grüße ☃", "two\nlines",
                                   "]]> and &amp; literally"])
def test_escaped_values_round_trip(value: str) -> None:
    doc = render_document([Metric("S", "string", "host", value)]).encode()
    root = etree.fromstring(doc)
    assert root.findtext("metric/value") == value
    assert b"\n\n" not in doc  # no early blank line for virtio readers


@pytest.mark.parametrize(("mtype", "text"), [
    ("uint32", "-1"), ("uint32", "4294967296"), ("int32", "2147483648"), ("int32", "12abc"),
    ("uint64", "18446744073709551616"), ("int64", "1.5"), ("uint64", ""), ("real64", "nan"),
    ("real64", "1e999"), ("real32", "1e39"), ("real64", "12,5"), ("string", "bell\x07"),
    ("uint64", "236.5"), ("int32", "-0.000001"), ("uint32", "4294967296.000000"),
    ("uint32", "-1.0"), ("uint64", ".0"), ("uint64", "1.0e3"), ("string", ""),
    ("string", " \n\t"), ("real64", "\n"),
])
def test_values_outside_their_type_are_rejected(mtype: str, text: str) -> None:
    with pytest.raises(InvalidValue):
        check_value(mtype, text)


@pytest.mark.parametrize(("mtype", "text", "published"), [
    ("uint32", " 42\n", "42"), ("int32", "-2147483648", "-2147483648"),
    ("uint64", "18446744073709551615", "18446744073709551615"),
    ("real64", "846.600000", "846.600000"),
    ("real32", "-1.5e3", "-1.5e3"), ("string", "  padded  \n", "padded"),
    # C configs print integers with printf("%f"): the integer is published.
    ("uint64", "400.000000", "400"), ("uint64", "236.000000\n", "236"), ("int32", "-7.0", "-7"),
    ("int64", "-0.000", "0"), ("uint32", "4294967295.", "4294967295"), ("uint32", "007.00", "7"),
])
def test_values_inside_their_type_are_published_stripped(mtype: str, text: str,
                                                          published: str) -> None:
    assert check_value(mtype, text) == published


def test_reasons_for_fractions_and_empty_values_are_clear() -> None:
    with pytest.raises(InvalidValue, match=r"^'236\.5' has a fractional part; uint64 takes whole"):
        check_value("uint64", "236.5")
    for mtype in ("string", "uint64", "real64"):
        with pytest.raises(InvalidValue, match=r"^the value is empty$"):
            check_value(mtype, "  \n")


def test_header_round_trip_and_busy_reader_gives_up() -> None:
    content = b"<metrics>\n</metrics>\n"
    disk = bytearray(mdisk.pack_header(0, mdisk.checksum_signed(content), len(content)) + content)
    disk += bytes(1024 - len(disk))
    assert mdisk.read_document(lambda o, n: bytes(disk[o:o + n]), len(disk)) == content
    disk[4:8] = (1).to_bytes(4, "big")
    with pytest.raises(mdisk.DiskBusyError):
        mdisk.read_document(lambda o, n: bytes(disk[o:o + n]), len(disk), timeout=0.1)
    disk[4:8] = bytes(4)
    disk[20] ^= 1
    with pytest.raises(mdisk.DiskFormatError, match="checksum"):
        mdisk.read_document(lambda o, n: bytes(disk[o:o + n]), len(disk), timeout=0.1)
