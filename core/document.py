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
of surrounding whitespace, checked against their type (an integer written as a
decimal with a zero fraction, ``400.000000``, is published as ``400``), never
empty, and a newline inside a value is written as ``&#10;`` so no response
carries an early blank line.

Readers meet documents other writers made (the C daemon writes ``236.000000``
for uint64, empty values, trailing newlines): :func:`read_document_metrics`
gives every metric with its raw text and, per metric, the typed value or the
reason there is none.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vhostmd.xmlsafe import has_entity_refs, safe_parser, syntax_error

if TYPE_CHECKING:  # lxml is imported where documents are parsed: the host's
    from lxml import etree  # children only render, and forking them is cheaper without it

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

# An integer, or a decimal whose fraction is checked separately: C configs print
# integers with printf("%f"), e.g. upstream's pagerate.pl gives "400.000000".
_INT_RE = re.compile(r"([+-]?[0-9]+)(?:\.([0-9]*))?\Z")
_REAL_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
# Characters XML 1.0 cannot carry at all (not even as references).
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_REAL32_MAX = 3.4028234663852886e38


class InvalidValue(ValueError):
    """A value that does not fit its metric type; the message says why."""


def check_value(mtype: str, text: str) -> str:
    """Return the value as it is published (stripped), or raise InvalidValue.

    Integer types take a decimal whose fraction is zero and publish the integer
    (``"400.000000"`` -> ``"400"``). A non-zero fraction is refused, not
    truncated as C's atoll would: the metric's type is wrong for what the action
    measures, and a published value must be what the action printed, so the
    operator is told (a real type keeps the fraction).
    """
    value = text.strip()
    if not value:
        # The C guest library crashes on an empty <value>, and no type has an empty value.
        raise InvalidValue("the value is empty")
    if value.isascii() and value.isdigit():
        # Plain digits, as nearly every value is: only the range is left to check.
        low, high = INT_RANGES.get(mtype, (0, 0))
        if mtype in INT_RANGES and low <= int(value) <= high and (
                value == "0" or value[0] != "0"):
            return value
        if mtype in REAL_TYPES or mtype == "string":
            return value
    if _XML_FORBIDDEN.search(value):
        raise InvalidValue("contains a control character XML cannot carry")
    if mtype in INT_RANGES:
        match = _INT_RE.match(value)
        if not match:
            raise InvalidValue(f"{_show(value)} is not an integer")
        whole, fraction = match.groups()
        if fraction is not None:
            if fraction.strip("0"):
                raise InvalidValue(
                    f"{_show(value)} has a fractional part; {mtype} takes whole numbers "
                    "(a real type keeps the fraction)"
                )
            value = str(int(whole))  # "-0.0" is "0", like any other integer
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


_NUMBER_TYPES = frozenset((*INT_RANGES, *REAL_TYPES))
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
    # A checked number holds nothing to escape: skip the scan for most values.
    text = value if mtype in _NUMBER_TYPES else escape(value)
    return f"{_head(mtype, context)}{vm_attrs}{_tail(name, unit)}{text}{_END}"


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


@dataclass(frozen=True, slots=True)
class ReadMetric(Metric):
    """A metric as a reader found it in a document, whoever wrote it.

    ``raw`` is the text of ``<value>`` exactly as written (the C daemon keeps an
    action's trailing newline); ``value`` is what this project would publish for
    it (stripped, integer decimals normalised) or, when ``problem`` is set, the
    stripped raw text. ``problem`` says in one line why there is no typed value.
    """

    raw: str = ""
    problem: str | None = None

    def __reduce__(self) -> tuple[type[ReadMetric], tuple]:
        return (ReadMetric, (self.name, self.type, self.context, self.value, self.unit,
                             self.vm_id, self.uuid, self.raw, self.problem))

    @property
    def typed(self) -> int | float | str | None:
        """The typed value, or None when there is none (``problem`` says why)."""
        return None if self.problem is not None else parse_value(self.type, self.value)

    def typed_value(self) -> int | float | str:
        if self.problem is not None:
            raise InvalidValue(self.problem)
        return parse_value(self.type, self.value)


def _read_metric(elem: etree._Element) -> tuple[ReadMetric, str | None]:
    """One ``<metric>`` element, and what is wrong with its structure (None if nothing).

    A value that does not check against its type is the metric's ``problem``,
    not a structural one: strict callers decide whether values matter.
    """
    children = [c for c in elem if isinstance(c.tag, str)]
    name_elem = next((c for c in children if c.tag == "name"), None)
    value_elem = next((c for c in children if c.tag == "value"), None)
    name = (name_elem.text or "").strip() if name_elem is not None else ""
    raw = (value_elem.text or "") if value_elem is not None else ""
    mtype = elem.get("type", "")
    context = elem.get("context", "")
    wrong = None
    if mtype not in SCALAR_TYPES:
        wrong = f"metric type {mtype!r} is not a value type"
    elif context not in CONTEXTS:
        wrong = f"metric context {context!r} is not host or vm"
    elif [c.tag for c in children] != ["name", "value"]:
        wrong = "a metric needs exactly <name> then <value>"
    elif not name:
        wrong = "metric without a name"
    id_text = elem.get("id")
    vm_id = None
    if id_text is not None:
        try:
            vm_id = int(id_text)
        except ValueError:
            wrong = wrong or f"id {id_text!r} is not a number"
    value = raw.strip()
    problem = wrong
    if problem is None:
        try:
            value = check_value(mtype, raw)
        except InvalidValue as exc:
            problem = str(exc)
    metric = ReadMetric(name, mtype, context, value, elem.get("unit"), vm_id, elem.get("uuid"),
                        raw, problem)
    return metric, wrong


def _line(elem: etree._Element, where: str) -> str:
    return f"{where} line {elem.sourceline}" if elem.sourceline else where


def parse_metric_elements(
    root: etree._Element, *, where: str = "document", check_types: bool = True
) -> list[Metric]:
    """Metrics from the ``<metric>`` children of ``root``; raises DocumentError at
    the first problem (with ``check_types``, a value that does not fit counts)."""
    metrics = []
    for elem in root:
        if not isinstance(elem.tag, str):
            continue  # comments, e.g. "metrics not available yet"
        if elem.tag != "metric":
            raise DocumentError(f"{_line(elem, where)}: unexpected element <{elem.tag}>")
        m, wrong = _read_metric(elem)
        if wrong is not None:
            raise DocumentError(f"{_line(elem, where)}: {wrong}")
        if m.problem is not None and check_types:
            raise DocumentError(f"{_line(elem, where)}: metric {m.name}: {m.problem}")
        metrics.append(Metric(m.name, m.type, m.context, m.value, m.unit, m.vm_id, m.uuid))
    return metrics


def parse_xml(data: bytes, *, where: str = "document") -> etree._Element:
    """Parse with the safe parser; refuse DTDs and entity references."""
    from lxml import etree

    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as exc:
        line, message = syntax_error(exc)
        where = f"{where} line {line}" if line else where
        raise DocumentError(f"{where}: invalid XML: {message}") from None
    tree = root.getroottree()
    if tree.docinfo.internalDTD is not None or has_entity_refs(root):
        raise DocumentError(f"{where}: DTDs and entity references are not allowed")
    return root


def parse_document(data: bytes, *, where: str = "document") -> list[Metric]:
    """All metrics of a published document (disk content or virtio response);
    raises DocumentError for anything that is not exactly our layout."""
    root = parse_xml(data.strip(b"\0").rstrip(), where=where)
    if root.tag != "metrics":
        raise DocumentError(f"{where}: root element is <{root.tag}>, expected <metrics>")
    return parse_metric_elements(root, where=where, check_types=False)


def read_document_metrics(
    data: bytes, *, where: str = "document"
) -> tuple[list[ReadMetric], list[str]]:
    """Every metric of a well-formed document, as lenient as a reader must be.

    Returns the metrics in document order (each with its own ``problem``, if
    any) and one line per problem found, naming where. Raises DocumentError
    only when the bytes are not well-formed XML (or carry a DTD or entity
    references, which no vhostmd writes).
    """
    root = parse_xml(data.strip(b"\0").rstrip(), where=where)
    if root.tag != "metrics":
        return [], [f"{where}: root element is <{root.tag}>, expected <metrics>"]
    metrics: list[ReadMetric] = []
    problems: list[str] = []
    for elem in root:
        if not isinstance(elem.tag, str):
            continue
        if elem.tag != "metric":
            problems.append(f"{_line(elem, where)}: unexpected element <{elem.tag}> left out")
            continue
        metric, _wrong = _read_metric(elem)
        metrics.append(metric)
        if metric.problem is not None:
            problems.append(f"{_line(elem, where)}: {describe(metric)}: {metric.problem}")
    return metrics, problems


def describe(metric: Metric) -> str:
    """``metric NAME (host)`` or ``metric NAME (vm 7)``: how messages name a metric."""
    name = metric.name or "without a name"
    if metric.context == "vm" and metric.vm_id is not None:
        return f"metric {name} (vm {metric.vm_id})"
    return f"metric {name} ({metric.context or 'no context'})"
