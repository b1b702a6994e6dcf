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

import operator
from collections.abc import Callable, Sequence
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
    # A vm value given as an int counts 1/scale of the unit (e.g. 10**9: ns of
    # a value in s): published with six decimals when scale > 1 (see int_text).
    scale: int = 1


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
    """What a source returns: unchecked values, per-metric problems, state.

    VM values come as one row per VM, a value per name of ``vm_names``: an
    int (exact, rendered by int_text with the metric's scale: most VM values
    are counters libvirt gives as ints, and a row of non-negative ints needs
    no check), a text (unchecked, like host values) or None (missing).
    """

    host: dict[str, str] = field(default_factory=dict)
    vm_names: tuple[str, ...] = ()
    vms: list[tuple[Domain, tuple[int | str | None, ...]]] = field(default_factory=list)
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


def tuple_getter(indexes: Sequence[int | str]) -> Callable[[Any], tuple[Any, ...]]:
    """operator.itemgetter that always returns a tuple (of one index it does not)."""
    if len(indexes) == 1:
        index = indexes[0]
        return lambda values: (values[index],)
    if not indexes:
        return lambda _values: ()
    return operator.itemgetter(*indexes)


def int_text(value: int, scale: int) -> str:
    """An int counting 1/scale of a unit as published: six decimals if scaled, exactly."""
    return str(value) if scale == 1 else seconds_from_ticks(value, scale)


def seconds_from_ticks(ticks: int, hz: int) -> str:
    """Clock ticks as seconds with six decimals, exactly (no float rounding).

    Like the original's printf "%f" of a time: truncated, never rounded up.
    """
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
