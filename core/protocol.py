"""virtio-serial framing, shared by the host channel manager and the guest client.

The guest writes ``GET /metrics/XML`` followed by a blank line (``\\n\\n`` or
``\\r\\n\\r\\n``). The host answers ``<metrics>\\n`` + host fragment + the
guest's own VM fragment + ``</metrics>\\n\\n``. Any other complete request (one
that ends in a blank line, or fills the 512-byte request buffer) gets
``INVALID REQUEST\\n\\n``. Rendered values never contain a raw newline, so the
first blank line in a response is its end.
"""

from __future__ import annotations

import enum
import re

CHANNEL_NAME = "org.github.vhostmd.1"
GUEST_PORT = f"/dev/virtio-ports/{CHANNEL_NAME}"
REQUEST = b"GET /metrics/XML\n\n"
REQUEST_LINE = b"GET /metrics/XML"
MAX_REQUEST = 512
INVALID_RESPONSE = b"INVALID REQUEST\n\n"
RESPONSE_OPEN = b"<metrics>\n"
RESPONSE_CLOSE = b"</metrics>\n\n"
RESPONSE_END = b"\n\n"
NOT_YET_HOST = b"  <!-- host metrics not available yet -->\n"
NOT_YET_VM = b"  <!-- metrics of this VM not available yet -->\n"

# The end of a request (and of a response): the first blank line.
BLANK_LINE = re.compile(rb"\r?\n\r?\n")


class Request(enum.Enum):
    METRICS = "metrics"
    INVALID = "invalid"


def parse_request(buf: bytes | bytearray) -> tuple[Request | None, int]:
    """Split the first request off ``buf``: (kind, bytes consumed).

    ``(None, 0)`` means the request is not complete yet: wait for more bytes.
    """
    match = BLANK_LINE.search(buf, 0, MAX_REQUEST)
    if match is None:
        if len(buf) >= MAX_REQUEST:
            return Request.INVALID, MAX_REQUEST
        return None, 0
    line = bytes(buf[: match.start()])
    kind = Request.METRICS if line == REQUEST_LINE else Request.INVALID
    return kind, match.end()


def build_response(host_fragment: bytes | None, vm_fragment: bytes | None) -> bytes:
    """The full response for one guest: host metrics, then its own VM's metrics."""
    return b"".join(
        (
            RESPONSE_OPEN,
            NOT_YET_HOST if host_fragment is None else host_fragment,
            NOT_YET_VM if vm_fragment is None else vm_fragment,
            RESPONSE_CLOSE,
        )
    )


def response_complete(buf: bytes | bytearray) -> bool:
    """True once ``buf`` holds a whole response (it ends with a blank line)."""
    return buf.endswith(RESPONSE_END)
