"""What a metric source is: the one small interface every collector module fills in.

Like node_exporter's collectors: one module per source of data (host_memory,
libvirt_domains, ...), each defining ``SOURCE = Source(...)`` with the metrics
it can produce and a ``collect`` function. The package finds the modules by
itself, so a new source is one new file.

A source runs in one of two kinds of job:

- ``host`` jobs (once per cycle, no domain list);
- ``vm`` jobs (once per cycle, with every domain the cycle listed). A vm-kind
  source may also produce host-context metrics computed from the same data
  (e.g. the memory allocated to all VMs).

This module must stay importable without libvirt or psutil.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vhostmd.wire import Domain


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One built-in metric: how it is published, and where its value comes from."""

    name: str
    type: str
    context: str  # "host" or "vm"
    unit: str | None
    origin: str  # for --list-builtins: the exact reading behind the value
    sets: tuple[str, ...] = ()  # the standard sets that include it


@dataclass(frozen=True, slots=True)
class Request:
    """What a source gets for one job."""

    wanted: frozenset[str]  # names of this source's metrics to produce
    domains: tuple[Domain, ...] | None  # vm jobs: the cycle's running domains
    state: Any  # what this source returned as state last time (None at first)
    libvirt: Any  # the worker's LibvirtConnection
    deadline: float  # CLOCK_MONOTONIC


@dataclass(slots=True)
class Sample:
    """What a source returns: unchecked value texts, per-metric problems, state."""

    host: dict[str, str] = field(default_factory=dict)
    vms: list[tuple[Domain, dict[str, str]]] = field(default_factory=list)
    # (metric name, domain or None, reason): left out this cycle
    failures: list[tuple[str, Domain | None, str]] = field(default_factory=list)
    state: Any = None


class SourceFailed(Exception):
    """The whole source failed this time (e.g. libvirt down); str() is one line."""


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "host" or "vm": which job runs it
    metrics: tuple[MetricSpec, ...]
    collect: Callable[[Request], Sample]


def seconds_from_ns(ns: int) -> str:
    """Nanoseconds as seconds with six decimals (like the original's printf "%f"), exactly."""
    whole, rest = divmod(int(ns), 1_000_000_000)
    return f"{whole}.{rest // 1000:06d}"


def seconds_from_ticks(ticks: int, hz: int) -> str:
    """Clock ticks as seconds with six decimals, exactly (no float rounding)."""
    whole, rest = divmod(int(ticks), hz)
    return f"{whole}.{rest * 1_000_000 // hz:06d}"


def read_key_values(path: str) -> dict[str, int]:
    """``key value`` (or ``Key: value kB``) lines of a /proc file as integers."""
    values: dict[str, int] = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                try:
                    values[parts[0].rstrip(":")] = int(parts[1])
                except ValueError:
                    continue
    return values
