"""Shipped configuration files and DTDs (installed as package data too)."""

from importlib import resources
from pathlib import Path


def shipped(name: str) -> Path:
    """Path of a file shipped in etc/ (vhostmd.conf, vhostmd.dtd, metric.dtd)."""
    return Path(str(resources.files(__name__).joinpath(name)))
