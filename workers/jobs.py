"""What the supervisor and the collector workers say to each other.

One job per message, one result per job. Deadlines are CLOCK_MONOTONIC
readings, which are the same in every process of the machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhostmd.document import Metric
from vhostmd.supervisor.config import MetricDef


@dataclass(frozen=True, slots=True)
class Domain:
    """A running libvirt domain, as listed at the start of a cycle."""

    id: int
    name: str
    uuid: str

    def __reduce__(self) -> tuple[type[Domain], tuple[int, str, str]]:
        return (Domain, (self.id, self.name, self.uuid))  # fast pickling, as Metric


@dataclass(frozen=True, slots=True)
class ListDomains:
    job_id: int
    deadline: float

    def describe(self) -> str:
        return "list-domains"


@dataclass(frozen=True, slots=True)
class RunAction:
    """Run one shell-action metric, for the host or for one domain."""

    job_id: int
    deadline: float
    metric: MetricDef
    domain: Domain | None
    exec_path: str

    def describe(self) -> str:
        if self.domain is None:
            return f"action {self.metric.name}"
        return f"action {self.metric.name} vm {self.domain.id}"


@dataclass(frozen=True, slots=True)
class Collect:
    """Run one built-in collector (host, or all the cycle's domains at once)."""

    job_id: int
    deadline: float
    collector: str
    metric_names: tuple[str, ...]
    domains: tuple[Domain, ...] | None
    # Whatever the collector returned as `state` last cycle (e.g. counters for
    # rates): workers stay stateless, any worker can take the next sample.
    state: object = None

    def describe(self) -> str:
        return f"builtin {self.collector}"


Job = ListDomains | RunAction | Collect


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one metric (or a whole job) is left out of this cycle."""

    metric: str
    context: str
    domain: Domain | None
    reason: str


@dataclass(frozen=True, slots=True)
class JobResult:
    job_id: int
    metrics: tuple[Metric, ...] = ()
    failures: tuple[Failure, ...] = ()
    domains: tuple[Domain, ...] | None = None
    error: str | None = None
    state: object = None  # a collector's state for its next Collect job
