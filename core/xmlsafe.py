"""One place that builds XML parsers: no entity expansion, no network, no DTD loading."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when used: most host processes never parse XML
    from lxml import etree


def safe_parser(*, remove_comments: bool = False) -> etree.XMLParser:
    """A parser that never expands entities, never loads a DTD and never touches the network.

    Except in attribute values: libxml2 expands entity references there
    whatever the options (has_entity_refs sees only those in content).
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
    """True when the tree keeps unexpanded entity references (which we refuse)."""
    from lxml import etree

    return any(isinstance(node, etree._Entity) for node in root.iter())


def one_line(text: object) -> str:
    """libxml2 messages may span lines; errors we report are one line."""
    return " ".join(str(text).split())
