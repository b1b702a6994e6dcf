"""The supervisor <-> worker contract: plain data, like ``protocol`` is for virtio.

The supervisor plans jobs from metric definitions and the domains libvirt
listed; a worker runs one job and answers with one result. A result carries
its metrics already rendered (bytes in the document's exact layout, see
``vhostmd.document``): the supervisor only joins fragments, it never builds or
unpickles one object per metric.

Every other message a child sends is one of the small types at the end
(``Ready``, ``DiskWritten``, ``VirtioStatus``, ...; ``CHILD_MESSAGES``): both
directions are typed, and the supervisor replaces a child that sends
anything else.

Deadlines are CLOCK_MONOTONIC readings, which are the same in every process of
the machine. Nothing here imports libvirt, psutil or a process module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A VM name a shell action may see (as NAME or VHOSTMD_VM_NAME). The supervisor
# plans no shell job for any other name, and a worker refuses one it is sent.
PLAIN_NAME = re.compile(r"[A-Za-z0-9._+:@-]+\Z")


def is_plain_name(name: str) -> bool:
    return bool(PLAIN_NAME.match(name))


@dataclass(frozen=True, slots=True)
class Variable:
    """One value of a ``group`` metric."""

    name: str
    type: str


@dataclass(frozen=True, slots=True)
class MetricDef:
    """A shell-action metric as configured."""

    name: str
    type: str
    context: str
    action: str
    unit: str | None = None
    variables: tuple[Variable, ...] = ()
    timeout: float | None = None
    line: int = 0


@dataclass(frozen=True, slots=True)
class BuiltinRef:
    """A <builtin> element: a whole set, or one metric (optionally one context)."""

    set: str | None
    name: str | None
    context: str | None
    line: int = 0


@dataclass(frozen=True, slots=True)
class Domain:
    """A running libvirt domain, as listed at the start of a cycle."""

    id: int
    name: str
    uuid: str

    def __reduce__(self) -> tuple[type[Domain], tuple[int, str, str]]:
        return (Domain, (self.id, self.name, self.uuid))  # a plain tuple pickles fastest


@dataclass(frozen=True, slots=True)
class ListDomains:
    job_id: int
    deadline: float
    # Also list the defined domains that do not run (their UUIDs, for per-VM disks).
    inactive: bool = False
    context = "libvirt"

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

    @property
    def context(self) -> str:
        return self.metric.context

    def describe(self) -> str:
        if self.domain is None:
            return f"action {self.metric.name}"
        return f"action {self.metric.name} vm {self.domain.id}"


@dataclass(frozen=True, slots=True)
class Collect:
    """Run one built-in collector: a host job, or the vm job for all the cycle's domains."""

    job_id: int
    deadline: float
    collector: str
    metric_names: tuple[str, ...]
    # The one place that says what kind of job this is: a vm job carries the
    # cycle's domain list (possibly empty), a host job carries None.
    domains: tuple[Domain, ...] | None
    # Whatever the collector returned as `state` last cycle (e.g. counters for
    # rates): workers stay stateless, any worker can take the next sample.
    state: object = None
    # Sent to the worker that answered the cycle's listing: instead of the
    # domains (``domains`` is then empty), the id of that listing job; the
    # worker kept its answer, and 1000 domains need not cross the pipe again.
    domains_from: int = 0

    @property
    def context(self) -> str:
        return "host" if self.domains is None else "vm"

    def describe(self) -> str:
        return f"builtin {self.collector}"


Job = ListDomains | RunAction | Collect


def needs_libvirt(job: Job) -> bool:
    return isinstance(job, ListDomains) or (isinstance(job, Collect) and job.domains is not None)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one metric (or a whole job) is left out of this cycle."""

    metric: str
    context: str
    domain: Domain | None
    reason: str


@dataclass(frozen=True, slots=True)
class JobResult:
    """A worker's answer to one job.

    ``host`` is the rendered host-context metrics of the job, ``vms`` the
    rendered metrics of each VM (by domain id), both in document order.
    ``timed_out``: the job was stopped at its deadline (the supervisor runs
    such jobs after the others next time). A large ``vms`` travels through
    shared memory (``vms_in_region``); the supervisor restores ``vms`` on receipt.
    """

    job_id: int
    host: bytes = b""
    vms: tuple[tuple[int, bytes], ...] = ()
    timed_out: bool = False
    failures: tuple[Failure, ...] = ()
    domains: tuple[Domain, ...] | None = None
    error: str | None = None
    state: object = None  # a collector's state for its next Collect job
    inactive: tuple[str, ...] | None = None  # UUIDs of defined domains not running
    listed_at: float = 0.0  # time.time() just before the listing call (ListDomains)
    # Instead of ``vms``, for large results: the fragments are in the worker's
    # result region (see vhostmd.runtime.published), these are their (id, end) pairs.
    vms_in_region: bytes | None = None


# -- what children tell the supervisor (besides a worker's JobResult and log records) --


@dataclass(frozen=True, slots=True)
class Ready:
    """A child started and serves (every child, once)."""


@dataclass(frozen=True, slots=True)
class DiskReady:
    """The disk-writer mapped its disk(s) and waits for documents."""

    path: str


@dataclass(frozen=True, slots=True)
class DiskFailed:
    """The disk-writer cannot use its disk; it exits after saying why (one line)."""

    reason: str


@dataclass(frozen=True, slots=True)
class DiskWritten:
    """The disk-writer is done with publication ``seq`` (written, or ``error``)."""

    seq: int
    error_kind: str | None = None  # "too-large", "truncated", "os-error N"
    error: str | None = None


@dataclass(frozen=True, slots=True)
class VirtioTaken:
    """The virtio process copied publication ``seq`` out of shared memory."""

    seq: int


@dataclass(frozen=True, slots=True)
class VirtioStatus:
    """The virtio process's channels now."""

    connected: int
    known: int
    maximum: int
    refused: int  # VMs refused a channel for max_channels


@dataclass(frozen=True, slots=True)
class DomainsChanged:
    """libvirt said a domain started, stopped or crashed (``domain_id``), or the
    events connection came (back), when anything may have changed (None)."""

    event: str  # "started", "stopped", "crashed", "connected"
    domain_id: int | None


@dataclass(frozen=True, slots=True)
class EventsState:
    """Whether the events child receives lifecycle events, and why not."""

    connected: bool
    detail: str


ChildMessage = (Ready | DiskReady | DiskFailed | DiskWritten | VirtioTaken | VirtioStatus
                | DomainsChanged | EventsState)
# For isinstance(): every type a child may send besides JobResult.
CHILD_MESSAGES = (Ready, DiskReady, DiskFailed, DiskWritten, VirtioTaken, VirtioStatus,
                  DomainsChanged, EventsState)
