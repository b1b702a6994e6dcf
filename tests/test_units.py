"""Fast unit tests of the supervisor's parts: no process, no sleep, a fake clock.

The pool runs ``FakeChild`` (a stand-in for ``pool.Child`` that the test
ends, stops or lets beat) through its ``child_factory`` hook; everything else
is the real code: SeatHistory, ChildPool, CycleClock, the planning
functions, and a Supervisor stepped by hand.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from vhostmd.disk.handle import open_disk
from vhostmd.document import parse_document
from vhostmd.runtime.published import Placement
from vhostmd.supervisor import planning, pool
from vhostmd.supervisor.arbiter import Supervisor
from vhostmd.supervisor.children import DISK_SEAT, EVENTS_SEAT, VIRTIO_SEAT, wanted_children
from vhostmd.supervisor.config import Config, load_config, parse_config_bytes
from vhostmd.supervisor.cycle import Cycle, CycleClock, render
from vhostmd.supervisor.pool import ChildPool, ChildSpec, SeatHistory, describe_exit
from vhostmd.wire import (
    Collect,
    DiskReady,
    Domain,
    EventsState,
    JobResult,
    ListDomains,
    RunAction,
    VirtioStatus,
    needs_libvirt,
)
from vhostmd.workers.collectors import plan as plan_collectors
from vhostmd.workers.results import FragmentBuilder

from daemon_harness import config_xml, metric_xml, virtio_xml

HANG = 10.0  # the hang timeout the pool tests converge with


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeChild:
    """What ChildPool sees of a child, without a process.

    It beats when the test says so, exits when the test says so; ``abort``
    ends it (as faulthandler's SIGABRT would) unless it is ``stopped``;
    ``kill`` always ends it. ``signals`` records what the pool sent it.
    """

    pids = itertools.count(40000)

    def __init__(self, spec: ChildSpec, clock: FakeClock) -> None:
        self.spec = spec
        self.role = spec.role
        self.seat = spec.seat
        self.key = spec.key
        self.clock = clock
        self.started = clock()
        self.last_beat = clock()
        self.pid = next(self.pids)
        self.gone = False
        self.aborted_at: float | None = None
        self.busy_with: object = None
        self.ready = False
        self.stopped = False
        self.exit_code: int | None = None
        self.signals: list[str] = []
        self.sent: list[object] = []
        self.fail_send: Exception | None = None
        self.released = False

    sentinel = -1

    def exit(self, code: int) -> None:
        self.exit_code = code

    def beat(self) -> None:
        self.last_beat = self.clock()

    def heartbeat_age(self) -> float:
        return self.clock() - self.last_beat

    def take_result(self, result: JobResult) -> JobResult:
        return result  # fake workers send their fragments inline

    def send(self, message: object) -> None:
        if self.fail_send is not None:
            exc, self.fail_send = self.fail_send, None
            raise exc
        self.sent.append(message)

    def abort(self) -> None:
        if self.gone or self.aborted_at is not None:
            return
        self.aborted_at = self.clock()
        self.signals.append("ABRT")
        if not self.stopped:
            self.exit(-signal.SIGABRT)

    def kill(self) -> None:
        if self.gone:
            return
        self.signals.append("KILL")
        self.exit(-signal.SIGKILL)

    def terminate(self) -> None:
        if not self.gone:
            self.signals.append("TERM")
            self.exit(0)

    def crash_report(self) -> str:
        return "actions.py:12 run_shell <- worker.py:40 run" if self.aborted_at else ""

    def collect(self, timeout: float = 0.0) -> str | None:
        if self.gone or self.exit_code is None:
            return None
        self.gone = True
        return describe_exit(self.exit_code)

    def release(self) -> None:
        self.released = True


class Rig:
    """A ChildPool on a fake clock that makes FakeChild children."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.lost: list[tuple[FakeChild, str]] = []
        self.started: list[FakeChild] = []
        self.pool = ChildPool(level=logging.INFO, beat_interval=0.25,
                              on_message=lambda _c, _m: None,
                              on_lost=lambda c, why: self.lost.append((c, why)),  # type: ignore[arg-type]
                              clock=self.clock)
        self.pool.child_factory = self.make  # type: ignore[assignment]

    def make(self, spec: ChildSpec, *_args: object) -> FakeChild:
        child = FakeChild(spec, self.clock)
        self.started.append(child)
        return child

    def child(self, seat: int) -> FakeChild:
        return self.pool.children[seat]  # type: ignore[return-value]


def spec(seat: int = 0, key: tuple = ("worker",)) -> ChildSpec:
    return ChildSpec(f"worker {seat + 1}", seat, "x:y", {}, key)


# -- the pool: back-off, its cap and its reset --------------------------------------


def next_start_after_a_crash(rig: Rig, ran: float, limit: float = 120.0) -> float:
    """Let the child in seat 0 run ``ran`` s and exit 1; return how long until the next start."""
    wanted = {0: spec()}
    rig.clock.advance(ran)
    rig.child(0).exit(1)
    died_at = rig.clock()
    before = len(rig.started)
    rig.pool.converge(wanted, HANG)
    while len(rig.started) == before:
        assert rig.clock() - died_at < limit, "never restarted"
        rig.clock.advance(0.25)
        rig.pool.converge(wanted, HANG)
    return rig.clock() - died_at


def test_crash_loop_backoff_doubles_up_to_its_cap() -> None:
    rig = Rig()
    rig.pool.converge({0: spec()}, HANG)
    waits = [next_start_after_a_crash(rig, ran=0.25) for _ in range(11)]
    # Four quick restarts, then the fifth within CRASH_WINDOW is a loop:
    # 2, 4, 8, 16 s, then the cap, for as long as the loop goes on.
    assert pool.CRASH_LIMIT == 5 and pool.MAX_BACKOFF == 30.0
    assert waits == [0, 0, 0, 0, 2, 4, 8, 16, 30, 30, 30]
    assert rig.pool.restarts(0) == 11


def test_backoff_is_reset_by_a_long_enough_run() -> None:
    rig = Rig()
    rig.pool.converge({0: spec()}, HANG)
    assert [next_start_after_a_crash(rig, 0.25) for _ in range(6)] == [0, 0, 0, 0, 2, 4]
    # It ran longer than CRASH_WINDOW: a new problem, restarted at once ...
    assert next_start_after_a_crash(rig, pool.CRASH_WINDOW + 1) == 0
    # ... and a new loop (that restart is the first of its five) starts over at 2 s.
    assert [next_start_after_a_crash(rig, 0.25) for _ in range(5)] == [0, 0, 0, 2, 4]


def test_seat_history_alone() -> None:
    history = SeatHistory()
    now = 0.0
    waits = []
    for _ in range(7):
        now += 0.5
        waits.append(history.record(now, now - 0.5))
        now += waits[-1]
    assert waits == [0, 0, 0, 0, 2, 4, 8]
    assert history.not_before == now


def test_backoff_is_per_seat() -> None:
    rig = Rig()
    wanted = {0: spec(0), 1: spec(1)}
    rig.pool.converge(wanted, HANG)
    for _ in range(5):
        rig.clock.advance(0.25)
        rig.child(0).exit(1)
        rig.pool.converge(wanted, HANG)
    assert rig.pool.waiting(0) and 0 not in rig.pool.children
    rig.child(1).exit(1)
    rig.pool.converge(wanted, HANG)
    assert not rig.pool.waiting(1) and rig.pool.get(1) is not None


def test_hung_child_is_aborted_replaced_at_once_then_killed(
        caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    wanted = {0: spec()}
    rig.pool.converge(wanted, HANG)
    hung = rig.child(0)
    hung.stopped = True  # SIGABRT stays pending: only SIGKILL ends it
    rig.clock.advance(HANG + 0.5)
    rig.pool.converge(wanted, HANG)
    assert hung.signals == ["ABRT"]
    replacement = rig.child(0)
    assert replacement is not hung
    assert rig.lost == [(hung, "stopped responding for 10.5 s; aborted")]
    rig.clock.advance(pool.ABORT_GRACE / 2)
    replacement.beat()
    rig.pool.converge(wanted, HANG)
    assert hung.signals == ["ABRT"] and not hung.gone
    rig.clock.advance(pool.ABORT_GRACE)
    replacement.beat()
    with caplog.at_level(logging.ERROR, "vhostmd"):
        rig.pool.converge(wanted, HANG)  # SIGKILL now; reaped at the next round
        rig.pool.converge(wanted, HANG)
    assert hung.signals == ["ABRT", "KILL"] and hung.gone and hung.released
    assert f"worker 1 (pid {hung.pid}) was at: actions.py:12 run_shell" in caplog.text
    assert replacement.signals == [] and rig.child(0) is replacement
    assert rig.pool.dying == []


def test_changed_key_replaces_only_that_child() -> None:
    rig = Rig()
    rig.pool.converge({0: spec(0), 1: spec(1)}, HANG)
    first, second = rig.child(0), rig.child(1)
    rig.pool.converge({0: spec(0), 1: spec(1, ("worker", "new"))}, HANG)
    assert first.signals == [] and rig.child(0) is first
    assert second.signals == ["KILL"] and rig.child(1) is not second
    assert rig.lost == []  # a reload is not a crash: no restart counted
    rig.pool.converge({0: spec(0)}, HANG)
    assert 1 not in rig.pool.children and rig.child(0) is first


# -- the cycle clock ----------------------------------------------------------------


def test_cycle_clock_does_not_drift() -> None:
    clock = CycleClock(5, now=100.0)
    assert clock.next == 100.0
    # However long each cycle took (within its period), the k-th starts at 100 + 5k.
    for k, took in enumerate([0.3, 4.9, 0.0, 2.5, 4.99], start=1):
        start = clock.next
        assert clock.advance(start + took) == 0.0
        assert clock.next == 100.0 + 5 * k


def test_cycle_clock_reanchors_after_an_overrun() -> None:
    clock = CycleClock(5, now=100.0)
    clock.advance(101.0)
    assert clock.next == 105.0
    # The cycle that started at 105 ends at 112: 2 s after the next one was due.
    assert clock.advance(112.0) == pytest.approx(2.0)
    assert clock.next == 112.0  # the next one at once, not a burst of catch-up cycles
    clock.advance(113.0)
    assert clock.next == 117.0
    clock.advance(117.5)
    assert clock.next == 122.0


# -- planning ---------------------------------------------------------------------------


PLANNING_CONFIG = config_xml("/tmp/unused-disk", "\n".join([
    metric_xml("HostA", "echo 1", mtype="uint32"),
    metric_xml("VmA", "echo 2", mtype="uint32", context="vm"),
    '<builtin name="TotalPhyMem"/>',
    metric_xml("HostB", "echo 3", mtype="uint32"),
    '<builtin name="TotalCPUTime" context="vm"/>',
    metric_xml("VmB", "echo 4", mtype="uint32", context="vm"),
]))


def planning_config() -> Config:
    return parse_config_bytes(PLANNING_CONFIG.encode(), "/etc/p.conf")


def new_cycle() -> Cycle:
    cycle = Cycle(1, 0.0, 4.0)
    cycle.job_deadline = 3.75
    return cycle


def test_plan_start_lists_domains_then_host_jobs_in_config_order() -> None:
    config = planning_config()
    plans = plan_collectors(config.builtins)
    cycle = new_cycle()
    jobs = planning.plan_start(cycle, config, plans, planning.job_ids().__next__, {}, False)
    assert isinstance(jobs[0], ListDomains) and cycle.domains_job == jobs[0].job_id
    kinds = [(type(j).__name__, getattr(getattr(j, "metric", None), "name", None)
              or getattr(j, "collector", None)) for j in jobs[1:]]
    assert kinds == [("RunAction", "HostA"), ("RunAction", "HostB"),
                     ("Collect", "TotalPhyMem")]
    assert all(j.context == "host" and not needs_libvirt(j) for j in jobs[1:])
    assert len({j.job_id for j in jobs}) == len(jobs)
    assert all(j.deadline == 3.75 for j in jobs)
    assert set(cycle.outstanding) == {j.job_id for j in jobs}


def test_a_lone_worker_runs_host_builtins_before_the_listing() -> None:
    config = planning_config()
    cycle = new_cycle()
    jobs = planning.plan_start(cycle, config, plan_collectors(config.builtins),
                               planning.job_ids().__next__, {}, False)
    order = planning.WorkOrder()

    def names(ordered: list) -> list[str]:
        return [type(j).__name__ for j in ordered]

    # One worker: /proc first, so a hung libvirt holds back no host metric.
    assert names(order.sort(jobs, workers=1)) == ["Collect", "ListDomains", "RunAction",
                                                  "RunAction"]
    # More: the listing first (VM jobs wait for it), host built-ins beside it.
    assert names(order.sort(jobs, workers=2)) == ["ListDomains", "Collect", "RunAction",
                                                  "RunAction"]


def test_plan_start_skips_the_listing_while_the_last_one_hangs() -> None:
    config = planning_config()
    cycle = new_cycle()
    jobs = planning.plan_start(cycle, config, plan_collectors(config.builtins),
                               planning.job_ids().__next__, {}, True)
    assert not any(isinstance(j, ListDomains) for j in jobs)
    assert cycle.domains_error == "libvirt did not answer the previous domain listing"
    assert [f.metric for f in cycle.failures] == ["the domain list"]
    assert planning.plan_vms(cycle, config, [], planning.job_ids().__next__, {}) == []


def test_plan_vms_one_builtin_job_then_actions_per_plain_vm() -> None:
    config = planning_config()
    plans = plan_collectors(config.builtins)
    cycle = new_cycle()
    ids = planning.job_ids()
    planning.plan_start(cycle, config, plans, ids.__next__, {}, False)
    plain = Domain(3, "web-1.example", "u3")
    odd = Domain(4, "x;rm -rf /", "u4")
    cycle.domains = (plain, odd)
    jobs = planning.plan_vms(cycle, config, plans, ids.__next__, {})
    vm_job = jobs[0]
    assert isinstance(vm_job, Collect) and vm_job.domains == (plain, odd)
    assert vm_job.context == "vm" and needs_libvirt(vm_job)
    actions = jobs[1:]
    assert [(j.metric.name, j.domain) for j in actions if isinstance(j, RunAction)] == [
        ("VmA", plain), ("VmB", plain)]
    assert len(actions) == 2  # nothing for the VM whose name is not plain ...
    assert [(f.metric, f.domain) for f in cycle.failures] == [("shell metrics", odd)]
    assert ("vm", "shell metrics", 4, "x;rm -rf /") in cycle.attempted  # ... said once


def test_vm_job_without_domains_is_still_a_vm_job() -> None:
    config = planning_config()
    plans = plan_collectors(config.builtins)
    cycle = new_cycle()
    cycle.domains = ()
    jobs = planning.plan_vms(cycle, config, plans, planning.job_ids().__next__, {})
    assert len(jobs) == 1 and isinstance(jobs[0], Collect)
    assert jobs[0].domains == () and jobs[0].context == "vm" and needs_libvirt(jobs[0])


def fragment(name: str, value: str, vm: Domain | None = None) -> FragmentBuilder:
    out = FragmentBuilder()
    if vm is None:
        out.add_host(name, "uint32", value, None)
    else:
        out.add_vm(vm, name, "uint32", value, None)
    return out


def test_document_keeps_config_order_whatever_order_results_come_in() -> None:
    config = parse_config_bytes(config_xml("/tmp/unused-disk", "\n".join([
        metric_xml("H1", "echo 1", mtype="uint32"),
        metric_xml("V1", "echo 2", mtype="uint32", context="vm"),
        metric_xml("H2", "echo 3", mtype="uint32"),
        metric_xml("V2", "echo 4", mtype="uint32", context="vm"),
    ])).encode())
    cycle = new_cycle()
    ids = planning.job_ids()
    jobs = planning.plan_start(cycle, config, [], ids.__next__, {}, False)
    domains = (Domain(7, "b", "u7"), Domain(2, "a", "u2"))
    cycle.accept(JobResult(jobs[0].job_id, domains=domains))
    jobs += planning.plan_vms(cycle, config, [], ids.__next__, {})
    for job in reversed(jobs[1:]):
        assert isinstance(job, RunAction)
        frags = fragment(job.metric.name, str(job.job_id), job.domain)
        assert cycle.accept(frags.result(job.job_id)) is job
    assert cycle.complete
    got = [(m.name, m.vm_id) for m in parse_document(render(cycle.fresh, domains, None).document)]
    assert got == [("H1", None), ("H2", None), ("V1", 2), ("V2", 2), ("V1", 7), ("V2", 7)]


# -- the supervisor loop, stepped by hand -----------------------------------------------


class SupervisorRig:
    """A Supervisor on a fake clock whose pool makes FakeChild children."""

    def __init__(self, conf: Path, config_text: str) -> None:
        conf.write_text(config_text)
        self.conf = conf
        self.clock = FakeClock()
        self.started: list[FakeChild] = []
        config = load_config(conf)
        # The supervisor opens and locks the disk (a real file, no process) and
        # hands it to the disk-writer.
        disk = open_disk(config.disk_path, config.disk_size) if config.vbd else None
        self.sup = Supervisor(config, uri=None, config_path=str(conf), disk=disk,
                              clock=self.clock)
        self.sup.pool.child_factory = self.make  # type: ignore[assignment]

    def make(self, spec: ChildSpec, *_args: object) -> FakeChild:
        child = FakeChild(spec, self.clock)
        self.started.append(child)
        return child

    def child(self, seat: int) -> FakeChild:
        return self.sup.pool.children[seat]  # type: ignore[return-value]

    def run_once(self) -> None:
        """One turn of Supervisor.run's loop: step, and recover if it raised."""
        try:
            self.sup.step()
        except Exception:
            self.sup.recover()

    def say(self, child: FakeChild, message: object) -> None:
        self.sup.on_message(child, message)  # type: ignore[arg-type]

    def answer_jobs(self) -> None:
        """Every worker answers what it was sent (listing: no domains; actions: "1")."""
        for seat in range(self.sup.config.workers):
            worker = self.child(seat)
            for job in worker.sent:
                if isinstance(job, ListDomains):
                    self.say(worker, JobResult(job.job_id, domains=()))
                elif isinstance(job, RunAction):
                    self.say(worker, fragment(job.metric.name, "1").result(job.job_id))
            worker.sent.clear()

    def close(self) -> None:
        os.close(self.sup.wake_r)
        os.close(self.sup.wake_w)
        self.sup.slots.close()
        if self.sup.disk is not None:
            self.sup.disk.close()


@pytest.fixture
def sup_rig(tmp_path: Path) -> Iterator[Callable[[str], SupervisorRig]]:
    made: list[SupervisorRig] = []

    def make(config_text: str) -> SupervisorRig:
        made.append(SupervisorRig(tmp_path / "v.conf", config_text))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


def written(rig: SupervisorRig, disk: FakeChild) -> list[bytes]:
    """The documents the disk-writer was sent, read from the slots they were placed in."""
    return [rig.sup.slots.read(m[1], 0, m[1].document_end) for m in disk.sent
            if isinstance(m, tuple) and isinstance(m[1], Placement)]


def test_loop_recovers_from_an_internal_error(sup_rig: Callable[[str], SupervisorRig],
                                              tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    period = 5
    rig = sup_rig(config_xml(tmp_path / "disk", metric_xml("A", "echo 1", mtype="uint32"),
                             period=period, globals_extra="<workers>1</workers>"))
    rig.run_once()  # cycle 1 planned; the children start
    assert rig.sup.cycles.cycle is not None and rig.sup.cycles.cycle.number == 1
    worker, disk = rig.child(0), rig.child(DISK_SEAT)
    rig.say(disk, DiskReady(str(tmp_path / "disk")))
    rig.run_once()  # the listing goes out
    [listing] = worker.sent
    worker.sent.clear()
    rig.say(worker, JobResult(listing.job_id, domains=()))
    rig.run_once()  # the action goes out
    [action] = worker.sent
    worker.sent.clear()
    # A result the loop chokes on (a worker out of step with us, or a bug).
    rig.say(worker, JobResult(action.job_id, vms=None))  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, "vhostmd"):
        rig.run_once()
    assert "internal error in the supervisor loop; skipping this cycle" in caplog.text
    assert "TypeError" in caplog.text
    # The cycle is dropped and the next one is a whole period away.
    error_at = rig.clock()
    assert rig.sup.cycles.cycle is None and not rig.sup.cycles.pending
    assert rig.sup.cycles.cycle_clock.next == error_at + period
    rig.clock.advance(period - 0.25)
    rig.run_once()
    assert rig.sup.cycles.cycle is None
    rig.clock.advance(0.25)
    rig.run_once()  # cycle 2, dispatched this time
    assert rig.sup.cycles.cycle is not None and rig.sup.cycles.cycle.number == 2
    assert {type(j) for j in worker.sent} == {ListDomains}  # one job per worker at a time
    for _ in range(3):
        rig.answer_jobs()
        rig.run_once()
    # Cycle 2 published (the worker did not die: the loop's bug cost one cycle).
    assert rig.sup.cycles.cycle is None and rig.sup.cycles.stats["cycles"] == 1
    [document] = written(rig, disk)
    assert [(m.name, m.value) for m in parse_document(document)] == [("A", "1")]
    assert worker.signals == [] and rig.child(0) is worker


def reload(rig: SupervisorRig, config_text: str) -> None:
    rig.conf.write_text(config_text)
    rig.sup._queue_signal(signal.SIGHUP, None)  # what the signal handler does
    rig.run_once()


def test_reload_changing_workers_and_virtio_replaces_exactly_those(
        sup_rig: Callable[[str], SupervisorRig], tmp_path: Path) -> None:
    def conf(workers: int, max_channels: int, period: int = 5) -> str:
        return config_xml(tmp_path / "disk", metric_xml("A", "echo 1"), period=period,
                          transports=("vbd", "virtio"),
                          globals_extra=f"<workers>{workers}</workers>"
                          + virtio_xml(tmp_path / "ch", max_channels=max_channels))

    rig = sup_rig(conf(2, 8))
    rig.run_once()
    before = dict(rig.sup.pool.children)
    assert set(before) == {0, 1, DISK_SEAT, VIRTIO_SEAT, EVENTS_SEAT}
    old_specs = wanted_children(rig.sup.config, None, rig.sup.disk)

    reload(rig, conf(3, 8))  # one more worker
    wanted = wanted_children(rig.sup.config, None, rig.sup.disk)
    assert set(wanted) == {0, 1, 2, DISK_SEAT, VIRTIO_SEAT, EVENTS_SEAT}
    assert all(rig.sup.pool.children[s] is c for s, c in before.items())
    assert all(c.signals == [] for c in before.values())
    assert 2 in rig.sup.pool.children

    reload(rig, conf(3, 9))  # a virtio setting
    new_specs = wanted_children(rig.sup.config, None, rig.sup.disk)
    changed = {s for s in new_specs if s in old_specs and new_specs[s].key != old_specs[s].key}
    assert changed == {VIRTIO_SEAT}
    old_virtio = before[VIRTIO_SEAT]
    assert old_virtio.signals == ["KILL"]  # type: ignore[attr-defined]
    assert rig.child(VIRTIO_SEAT) is not old_virtio
    assert rig.child(VIRTIO_SEAT).spec.kwargs["max_channels"] == 9
    assert all(rig.sup.pool.children[s] is before[s] for s in (0, 1, DISK_SEAT))

    third = rig.child(2)
    reload(rig, conf(1, 9, period=2))  # fewer workers, another period
    assert third.signals == ["KILL"] and before[1].signals == ["KILL"]  # type: ignore[attr-defined]
    assert set(rig.sup.pool.children) == {0, DISK_SEAT, VIRTIO_SEAT, EVENTS_SEAT}
    assert rig.child(0) is before[0] and rig.child(0).signals == []
    assert rig.sup.pool.beat_interval == pytest.approx(0.5)  # hang_timeout(2) / 6
    assert rig.sup.config.update_period == 2


def test_rejected_reload_keeps_every_child(sup_rig: Callable[[str], SupervisorRig],
                                           tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    text = config_xml(tmp_path / "disk", metric_xml("A", "echo 1"),
                      globals_extra="<workers>2</workers>")
    rig = sup_rig(text)
    rig.run_once()
    before = dict(rig.sup.pool.children)
    with caplog.at_level(logging.ERROR, "vhostmd"):
        reload(rig, text.replace("<workers>2", "<workers>x"))
    assert "reload rejected, keeping the running config" in caplog.text
    assert rig.sup.pool.children == before and rig.sup.config.workers == 2


def test_kept_values_last_two_rounds_of_shell_work_within_bounds() -> None:
    from vhostmd.supervisor.scheduler import max_value_age

    assert max_value_age(5) == 60.0  # at least 60 s
    assert max_value_age(30) == 360.0  # 12 periods
    assert max_value_age(5, refresh=200.0) == 400.0  # two rounds when work lags
    assert max_value_age(5, refresh=5000.0) == 3600.0  # never more than an hour


def test_the_events_childs_state_leaves_the_virtio_refused_count_alone(
        sup_rig: Callable[[str], SupervisorRig], tmp_path: Path) -> None:
    rig = sup_rig(config_xml(tmp_path / "disk", metric_xml("A", "echo 1", mtype="uint32"),
                             transports=("vbd", "virtio"),
                             globals_extra="<workers>1</workers>" + virtio_xml(tmp_path)))
    rig.run_once()  # the children start
    virtio, events = rig.child(VIRTIO_SEAT), rig.child(EVENTS_SEAT)
    rig.say(virtio, VirtioStatus(connected=2, known=3, maximum=2, refused=1))
    rig.run_once()
    assert rig.sup.virtio_status == (2, 3, 2) and rig.sup.virtio_refused == 1
    # The events child connecting (or losing libvirt) says nothing about channels;
    # the virtio process reports only changes, so a reset would stick.
    rig.say(events, EventsState(True, "watching"))
    rig.run_once()
    assert rig.sup.virtio_refused == 1
    rig.say(events, EventsState(False, "lost"))
    rig.run_once()
    assert rig.sup.virtio_status == (2, 3, 2) and rig.sup.virtio_refused == 1


def test_a_child_message_of_no_known_type_replaces_the_child(
        sup_rig: Callable[[str], SupervisorRig], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    rig = sup_rig(config_xml(tmp_path / "disk", metric_xml("A", "echo 1", mtype="uint32"),
                             globals_extra="<workers>1</workers>"))
    rig.run_once()  # the children start
    worker = rig.child(0)
    rig.say(worker, ("ready",))  # a plain tuple: not part of the contract (core/wire.py)
    with caplog.at_level(logging.WARNING, "vhostmd"):
        rig.run_once()
    assert "sent a message of unknown type tuple; killed" in caplog.text
    assert rig.child(0) is not worker


def test_freed_memory_goes_back_only_after_a_long_enough_idle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from vhostmd.runtime import child

    trims: list[float] = []
    clock = FakeClock()
    monkeypatch.setattr(child, "release_free_memory", lambda: trims.append(clock()))
    trim = child.IdleTrim(clock)
    assert trim.wait(1.0) == 1.0  # nothing freed: sleep as long as the caller likes
    trim.poll()
    assert trims == []
    # A cycle every second: the pages are reused at once, never given back.
    for _ in range(5):
        trim.worked()
        assert trim.wait(5.0) == child.TRIM_AFTER_IDLE
        clock.advance(1.0)
        trim.poll()
    assert trims == []
    # Then a long pause: given back once, when it has lasted TRIM_AFTER_IDLE.
    clock.advance(child.TRIM_AFTER_IDLE - 1.0 - 0.01)
    trim.poll()
    assert trims == [] and 0 < trim.wait(5.0) <= 0.011
    clock.advance(0.01)
    trim.poll()
    trim.poll()
    assert trims == [clock()] and trim.wait(5.0) == 5.0


def test_the_worker_that_listed_the_domains_is_not_sent_them_again(
        sup_rig: Callable[[str], SupervisorRig], tmp_path: Path) -> None:
    from vhostmd.workers.worker import Worker

    rig = sup_rig(config_xml(tmp_path / "disk", '<builtin set="vhostmd"/>',
                             globals_extra="<workers>1</workers>"))
    rig.run_once()  # cycle 1 planned; the children start
    rig.run_once()  # the first job goes out
    worker = rig.child(0)
    domains = (Domain(1, "test", "6695eb01-f6a4-8304-79aa-97f2502e193f"),)
    for _ in range(4):  # the host built-ins first, then the listing
        [job] = worker.sent
        worker.sent.clear()
        if isinstance(job, ListDomains):
            listing = job
            rig.say(worker, JobResult(job.job_id, domains=domains))
        else:
            assert job.context == "host"
            rig.say(worker, JobResult(job.job_id))
        rig.run_once()
        if worker.sent and isinstance(worker.sent[0], Collect) and worker.sent[0].domains == ():
            break
    [vm_job] = worker.sent
    assert vm_job.context == "vm" and vm_job.domains == ()
    assert vm_job.domains_from == listing.job_id

    # The worker side: it answers with the domains it listed (the test driver's "test").
    real = Worker(None, 1, "test:///default")  # type: ignore[arg-type]
    listed = real.run(listing)
    assert [d.name for d in listed.domains or ()] == ["test"]
    vm_job = replace(vm_job, deadline=time.monotonic() + 30)  # the rig's clock is fake
    result = real.run(vm_job)
    assert result.error is None and [vm for vm, _f in result.vms] == [1]
    stale = real.run(replace(vm_job, domains_from=listing.job_id + 1000))
    assert stale.error is not None and "did not answer listing job" in stale.error
