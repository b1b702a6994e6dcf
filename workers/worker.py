"""The collector worker process: runs one job at a time under its deadline.

The worker beats its heartbeat while it waits for work and while an action
runs; a call that hangs (libvirt) stops the beat, and the supervisor replaces
the worker (after asking it for its stacks, see ``vhostmd.supervisor.pool``).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import replace

from vhostmd.runtime.child import ChildContext, serve
from vhostmd.runtime.published import PublicationTooLarge, SharedSlots, pack_fragments
from vhostmd.wire import Collect, Domain, Failure, Job, JobResult, ListDomains, RunAction
from vhostmd.workers import strays
from vhostmd.workers.actions import (
    ActionFailed,
    ActionTimedOut,
    action_env,
    metrics_from_output,
    run_shell,
    substitute,
)
from vhostmd.workers.collectors import run_collector
from vhostmd.workers.libvirt_conn import LibvirtConnection, LibvirtUnavailable
from vhostmd.workers.results import FragmentBuilder

log = logging.getLogger("vhostmd")


class Worker:
    def __init__(self, ctx: ChildContext, index: int, uri: str | None) -> None:
        self.ctx = ctx
        self.index = index
        self.uri = uri
        self.libvirt = LibvirtConnection(uri)
        self.listed: tuple[int, tuple[Domain, ...]] = (0, ())  # the last listing answered
        # Leftovers of actions (strays.py): the last job's action, if it was one,
        # our children after it, and the actions already logged.
        self.previous_action: str | None = None
        self.after_previous: set[int] = set()
        self.said_killed: set[str] = set()
        self.said_stuck: set[str] = set()

    def run(self, job: Job) -> JobResult:
        if isinstance(job, RunAction):
            return self.run_action(job)
        self.previous_action = None  # children from now on are not an action's
        if isinstance(job, ListDomains):
            listed_at = time.time()  # before the call: the listing is no older than this
            try:
                running, inactive = self.libvirt.list_all_domains(inactive=job.inactive)
            except LibvirtUnavailable as exc:
                return JobResult(job.job_id, error=str(exc))
            self.listed = (job.job_id, running)
            return JobResult(job.job_id, domains=running,
                             inactive=inactive if job.inactive else None, listed_at=listed_at)
        if isinstance(job, Collect):
            if job.domains_from:
                if job.domains_from != self.listed[0]:  # the supervisor never does this
                    return JobResult(job.job_id, error=f"worker {self.index} did not answer "
                                                       f"listing job {job.domains_from}")
                job = replace(job, domains=self.listed[1], domains_from=0)
            return run_collector(job, self.libvirt)
        return JobResult(getattr(job, "job_id", -1), error=f"unknown job {job!r}")

    def run_action(self, job: RunAction) -> JobResult:
        before = strays.children()
        if self.previous_action is not None and before - self.after_previous:
            # Came to us since the previous action ended (a process that
            # left it late): that action's, whatever runs now.
            self.end_strays(self.previous_action, self.after_previous)
            before = strays.children()
        self.previous_action = job.metric.name
        try:
            return self._run_action(job)
        finally:
            # An action may have left processes in sessions of their own
            # (setsid, daemonizing): the kill of its process group missed
            # them, but as orphans they became ours (a subreaper).
            self.end_strays(job.metric.name, before)
            self.after_previous = strays.children()

    def end_strays(self, action: str, before: set[int]) -> None:
        """Kill what ``action`` left behind; say so once per action (every cycle would flood)."""
        killed, stuck = strays.kill_new(before)
        if killed and action not in self.said_killed:
            self.said_killed.add(action)
            log.warning("action %s left %d process(es) behind in other sessions; killed "
                        "them (said once per action)", action, len(killed),
                        extra={"once": ("strays killed", action)})
        if stuck and action not in self.said_stuck:
            self.said_stuck.add(action)
            log.warning("action %s left %d process(es) that vhostmd cannot end (pid %s)",
                        action, len(stuck), " ".join(map(str, sorted(stuck))),
                        extra={"once": ("strays stuck", action)})

    def _run_action(self, job: RunAction) -> JobResult:
        metric = job.metric
        deadline = job.deadline
        if metric.timeout is not None:
            deadline = min(deadline, time.monotonic() + metric.timeout)
        try:
            command = substitute(metric.action, self.uri, job.domain)
            output = run_shell(
                command,
                action_env(job.exec_path, self.uri, job.domain),
                deadline,
                on_start=self.ctx.set_action_group,
                beat=self.ctx.beat,
            )
            metrics = metrics_from_output(metric, output, job.domain)
        except ActionFailed as exc:
            failure = Failure(metric.name, metric.context, job.domain, str(exc))
            return JobResult(job.job_id, failures=(failure,),
                             timed_out=isinstance(exc, ActionTimedOut))
        out = FragmentBuilder()
        for m in metrics:
            out.add(m)
        return out.result(job.job_id)


# Below this, VM fragments are pickled with the result; above, they go through
# the worker's result region (a pickled 700 KB result costs the worker and the
# supervisor milliseconds in copies and pipe wake-ups).
REGION_THRESHOLD = 64 * 1024


def worker_main(ctx: ChildContext, index: int, uri: str | None,
                results: SharedSlots | None = None) -> None:
    strays.become_subreaper()
    worker = Worker(ctx, index, uri)

    def stop(_signum: int, _frame: object) -> None:
        # Unwinds through the running action's cleanup: its process group,
        # then what escaped it, are killed before the worker exits (dying at
        # once, it would hand them to init, and they would outlive the daemon).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)

    def handle(job: Job) -> None:
        ctx.title(f"worker {index} {job.describe()}")
        result = worker.run(job)
        if results is not None and sum(len(f) for _vm, f in result.vms) > REGION_THRESHOLD:
            try:
                packed = pack_fragments(results, result.vms)
            except PublicationTooLarge as exc:
                result = JobResult(result.job_id, error=str(exc))
            else:
                result = replace(result, vms=(), vms_in_region=packed)
        ctx.send(result)

    serve(ctx, handle, f"worker {index} idle")
