"""One place that builds XML parsers: no entity expansion, no network, no DTD loading."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when used: most host processes never parse XML
    from lxml import etree


def safe_parser(*, remove_comments: bool = False) -> etree.XMLParser:
    """A parser that never expands entities, never loads a DTD and never touches the network.

    Except in attribute values: libxml2 expands entity references there
    whatever the options. So has_entity_refs also refuses a document whose
    internal DTD declares any entity: what was expanded is never used.
    """
    from lxml import etree

    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=remove_comments,
        remove_pis=True,
    )


def has_entity_refs(root: etree._Element) -> bool:
    """True when the document declares entities or keeps references to them (we refuse both).

    References in content stay in the tree, unexpanded; references in
    attribute values are expanded by libxml2 whatever the options, so the
    declarations themselves are refused too.
    """
    from lxml import etree

    dtd = root.getroottree().docinfo.internalDTD
    if dtd is not None and any(True for _ in dtd.iterentities()):
        return True
    return any(isinstance(node, etree._Entity) for node in root.iter())


def one_line(text: object) -> str:
    """libxml2 messages may span lines; errors we report are one line."""
    return " ".join(str(text).split())


_LXML_LOCATION = re.compile(r", line \d+, column \d+\Z")


def syntax_error(exc: etree.XMLSyntaxError) -> tuple[int | None, str]:
    """(line, message) of a document that is not well-formed, the line given once.

    lxml appends ", line L, column C" to libxml2's message, and libxml2 ends
    some messages with the line where the broken construct began: callers
    put the line in front, so both go when they say the same.
    """
    line = exc.lineno or (exc.position[0] if exc.position else None)
    message = one_line(_LXML_LOCATION.sub("", str(exc.msg)))
    if line and message.endswith(f" line {line}"):
        message = message[: -len(f" line {line}")]
    return line, message
