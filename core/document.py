"""The metrics XML document: value types, checks, and the exact layout guests parse.

Layout (same as the C original, so existing guest parsers keep working)::

    <metrics>
      <metric type='uint32' context='host'>
        <name>NumCPUs</name>
        <value>16</value>
      </metric>
      <metric type='real64' context='vm' id='7' uuid='...' unit='s'>
        <name>TotalCPUTime</name>
        <value>42.5</value>
      </metric>
    </metrics>

Deliberate differences from the C original: values are XML-escaped, stripped
of surrounding whitespace, checked against their type, and a newline inside a
value is written as ``&#10;`` so no response carries an early blank line.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from lxml import etree

from vhostmd.xmlsafe import has_entity_refs, one_line, safe_parser

INT_RANGES: dict[str, tuple[int, int]] = {
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
REAL_TYPES = ("real32", "real64")
SCALAR_TYPES = (*INT_RANGES, *REAL_TYPES, "string")
METRIC_TYPES = (*SCALAR_TYPES, "group", "xml")
CONTEXTS = ("host", "vm")

_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_REAL_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
# Characters XML 1.0 cannot carry at all (not even as references).
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_REAL32_MAX = 3.4028234663852886e38


class InvalidValue(ValueError):
    """A value that does not fit its metric type; the message says why."""


def check_value(mtype: str, text: str) -> str:
    """Return the value as it is published (stripped), or raise InvalidValue."""
    value = text.strip()
    if _XML_FORBIDDEN.search(value):
        raise InvalidValue("contains a control character XML cannot carry")
    if mtype in INT_RANGES:
        if not _INT_RE.match(value):
            raise InvalidValue(f"{_show(value)} is not an integer")
        low, high = INT_RANGES[mtype]
        if not low <= int(value) <= high:
            raise InvalidValue(f"{value} is out of range for {mtype}")
        return value
    if mtype in REAL_TYPES:
        if not _REAL_RE.match(value):
            raise InvalidValue(f"{_show(value)} is not a number")
        number = float(value)
        if math.isinf(number) or (mtype == "real32" and abs(number) > _REAL32_MAX):
            raise InvalidValue(f"{value} is out of range for {mtype}")
        return value
    if mtype == "string":
        return value
    raise InvalidValue(f"{mtype} is not a value type")


def parse_value(mtype: str, text: str) -> int | float | str:
    """The typed Python value of a published value."""
    value = check_value(mtype, text)
    if mtype in INT_RANGES:
        return int(value)
    if mtype in REAL_TYPES:
        return float(value)
    return value


def _show(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


_NEEDS_ESCAPE = re.compile("[&<>'\"\r\n]")


def escape(text: str) -> str:
    if not _NEEDS_ESCAPE.search(text):
        return text  # nearly every value is a plain number: skip six replaces
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&apos;")
        .replace('"', "&quot;")
        .replace("\r", "&#13;")
        .replace("\n", "&#10;")
    )


# A metric's type, context, name and unit are the same every cycle: their
# escaped text is built once, not once per value.
@functools.lru_cache(maxsize=8192)
def _head(mtype: str, context: str) -> str:
    return f"  <metric type='{escape(mtype)}' context='{escape(context)}'"


@functools.lru_cache(maxsize=8192)
def _tail(name: str, unit: str | None) -> str:
    unit_attr = f" unit='{escape(unit)}'" if unit else ""
    return f"{unit_attr}>\n    <name>{escape(name)}</name>\n    <value>"


_END = "</value>\n  </metric>\n"


def vm_attributes(vm_id: int | None, uuid: str | None) -> str:
    """The ``id`` and ``uuid`` attributes of a vm metric (empty for host metrics)."""
    attrs = "" if vm_id is None else f" id='{vm_id}'"
    if uuid is not None:
        attrs += f" uuid='{escape(uuid)}'"
    return attrs


def render_metric(name: str, mtype: str, context: str, value: str, unit: str | None = None,
                  vm_attrs: str = "") -> str:
    """One ``<metric>`` element in the exact layout guests parse (the only renderer)."""
    return f"{_head(mtype, context)}{vm_attrs}{_tail(name, unit)}{escape(value)}{_END}"


@dataclass(frozen=True, slots=True)
class Metric:
    """One published metric. ``value`` is the checked text as published."""

    name: str
    type: str
    context: str
    value: str
    unit: str | None = None
    vm_id: int | None = None
    uuid: str | None = None

    def typed_value(self) -> int | float | str:
        return parse_value(self.type, self.value)

    def render(self) -> str:
        return render_metric(self.name, self.type, self.context, self.value, self.unit,
                             vm_attributes(self.vm_id, self.uuid))


DOCUMENT_OPEN = "<metrics>\n"
DOCUMENT_CLOSE = "</metrics>\n"
_OPEN = DOCUMENT_OPEN.encode()
_CLOSE = DOCUMENT_CLOSE.encode()


def render_fragment(metrics: Iterable[Metric]) -> str:
    return "".join(m.render() for m in metrics)


def assemble(fragments: Iterable[bytes]) -> bytes:
    """The whole document from rendered fragments (host first, then each VM's)."""
    return b"".join((_OPEN, *fragments, _CLOSE))


def render_document(metrics: Iterable[Metric]) -> str:
    return assemble([render_fragment(metrics).encode()]).decode()


class DocumentError(ValueError):
    """A metrics document (or metric XML from an action) that does not parse."""


def parse_metric_elements(
    root: etree._Element, *, where: str = "document", check_types: bool = True
) -> list[Metric]:
    """Metrics from the ``<metric>`` children of ``root``; raises DocumentError."""
    metrics = []
    for elem in root:
        if not isinstance(elem.tag, str):
            continue  # comments, e.g. "metrics not available yet"
        line = f"{where} line {elem.sourceline}" if elem.sourceline else where
        if elem.tag != "metric":
            raise DocumentError(f"{line}: unexpected element <{elem.tag}>")
        mtype = elem.get("type", "")
        context = elem.get("context", "")
        if mtype not in SCALAR_TYPES:
            raise DocumentError(f"{line}: metric type {mtype!r} is not a value type")
        if context not in CONTEXTS:
            raise DocumentError(f"{line}: metric context {context!r} is not host or vm")
        children = [c for c in elem if isinstance(c.tag, str)]
        if [c.tag for c in children] != ["name", "value"]:
            raise DocumentError(f"{line}: a metric needs exactly <name> then <value>")
        name = (children[0].text or "").strip()
        if not name:
            raise DocumentError(f"{line}: metric without a name")
        raw_value = children[1].text or ""
        try:
            value = check_value(mtype, raw_value) if check_types else raw_value.strip()
        except InvalidValue as exc:
            raise DocumentError(f"{line}: metric {name}: {exc}") from None
        vm_id = elem.get("id")
        try:
            parsed_id = int(vm_id) if vm_id is not None else None
        except ValueError:
            raise DocumentError(f"{line}: metric {name}: id {vm_id!r} is not a number") from None
        metrics.append(
            Metric(name, mtype, context, value, elem.get("unit"), parsed_id, elem.get("uuid"))
        )
    return metrics


def parse_xml(data: bytes, *, where: str = "document") -> etree._Element:
    """Parse with the safe parser; refuse DTDs and entity references."""
    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as exc:
        raise DocumentError(f"{where}: invalid XML: {one_line(exc)}") from None
    tree = root.getroottree()
    if tree.docinfo.internalDTD is not None or has_entity_refs(root):
        raise DocumentError(f"{where}: DTDs and entity references are not allowed")
    return root


def parse_document(data: bytes, *, where: str = "document") -> list[Metric]:
    """All metrics of a published document (disk content or virtio response)."""
    root = parse_xml(data.strip(b"\0").rstrip(), where=where)
    if root.tag != "metrics":
        raise DocumentError(f"{where}: root element is <{root.tag}>, expected <metrics>")
    return parse_metric_elements(root, where=where, check_types=False)
