"""Text from outside (VM names, paths under guests' control) as it may appear in a log line."""

from __future__ import annotations

# A libvirt domain name may be hundreds of characters; a log line stays readable
# when such a name is cut (the VM id next to it still says which VM it is).
LOG_NAME_MAX = 64


def loggable(name: str) -> str:
    """``name`` escaped (repr: no newlines or control characters) and at most 64 characters."""
    if len(name) > LOG_NAME_MAX:
        name = name[:LOG_NAME_MAX] + "..."
    return repr(name)
