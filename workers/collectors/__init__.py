"""Built-in collectors: metrics gathered in-process, no process spawned per metric or VM.

Interface used by the rest of the daemon (kept small on purpose):

- ``validate_ref(ref) -> str | None``: why a <builtin> element is wrong, or None.
- ``plan(refs) -> list[CollectorPlan]``: which collector jobs a config needs.
- ``run_collector(job, libvirt) -> JobResult``: run one Collect job (in a worker).
- ``describe_builtins() -> str``: the table printed by ``vhostmd --list-builtins``.

This package must not import libvirt or psutil at the top level: the
supervisor imports it to plan cycles and validate configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhostmd.workers.jobs import Collect, JobResult


@dataclass(frozen=True, slots=True)
class CollectorPlan:
    collector: str
    context: str  # "host": one job per cycle; "vm": one job per cycle for all domains
    metric_names: tuple[str, ...]
    order: int  # position in the document (the config line of the first <builtin>)


def validate_ref(ref: object) -> str | None:
    return "built-in metrics are not available yet"


def plan(refs: tuple) -> list[CollectorPlan]:
    return []


def run_collector(job: Collect, libvirt: object) -> JobResult:
    return JobResult(job.job_id, error=f"unknown built-in collector {job.collector!r}")


def describe_builtins() -> str:
    return "no built-in metrics yet"
