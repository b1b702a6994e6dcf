#!/usr/bin/env python3
"""Each mechanism of the cycle on its own, against the plain way it replaced.

At N VMs (default 1000), each mechanism does one cycle's work, measured as
CPU (user + system, every thread of every process involved), back to back
and at the daemon's period (1 s and the shipped 5 s: between cycles the
caches go as cold as the machine's neighbours make them):

- publication slots: a cycle's document and VM fragments reach a reader
  process through a shared memfd slot and a small Placement on a queue;
  plainly, pickled through the queue;
- result regions: a worker's VM fragments reach the supervisor through its
  memfd region and the ids and ends on a queue; plainly, pickled;
- domains_from: the VM job names the listing job the worker answered, which
  kept its domains; plainly, the job carries the N domains;
- the ctypes mapping of per-VM disks: N disk files written with the disk
  protocol through mappings that keep no descriptor (ctypes mmap); plainly,
  each file opened, mapped with Python's mmap, written and closed each cycle
  (keeping N mappings open would hold N descriptors: Python's mmap keeps a dup);
- the VM template: one %-format per VM for all its built-in metrics;
  plainly, each metric checked and rendered on its own.

Usage: .venv/bin/python bench/bench_mechanisms.py [--domains 1000] [--rounds 6]
       [--periods 1,5] [--only "result regions"]
Prints a markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402

from vhostmd.disk.handle import open_disk  # noqa: E402
from vhostmd.disk.mapped import MetricsDisk  # noqa: E402
from vhostmd.disk.vmwriter import VmDisk  # noqa: E402
from vhostmd.document import assemble, check_value, render_metric, vm_attributes  # noqa: E402
from vhostmd.runtime.published import (  # noqa: E402
    SharedSlots,
    pack_fragments,
    unpack_fragments,
)
from vhostmd.wire import Collect, Domain  # noqa: E402
from vhostmd.workers.collectors import METRICS, _vm_template  # noqa: E402
from vhostmd.workers.collectors.source import int_text  # noqa: E402

VM_DISK_SIZE = 64 * 1024


def cpu() -> float:
    """CPU seconds of this process, all its threads (the queues' feeder threads too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def vm_specs() -> tuple:
    return tuple(spec for (context, _name), (_source, spec) in METRICS.items() if context == "vm")


def vm_rows(n: int) -> list[tuple[Domain, tuple[int, ...]]]:
    specs = vm_specs()
    return [(Domain(i, f"vm{i}", f"{i:08x}-0000-4000-8000-000000000000"),
             tuple(1_000_000 + i * 7 + k for k in range(len(specs)))) for i in range(1, n + 1)]


def fragments(n: int) -> dict[int, bytes]:
    template, arguments = _vm_template(vm_specs())
    return {d.id: (template % arguments((vm_attributes(d.id, d.uuid), *row))).encode()
            for d, row in vm_rows(n)}


class Peer:
    """A child process on two queues, as the daemon's are: it answers each message
    on ``done`` and, after None, its CPU seconds."""

    def __init__(self, target: Callable[..., None], *args: object,
                 shared: SharedSlots | None = None) -> None:
        self.inbox: multiprocessing.Queue = multiprocessing.Queue()
        self.done: multiprocessing.Queue = multiprocessing.Queue()
        self.shared = shared
        self.process = multiprocessing.Process(target=target,
                                               args=(*args, self.inbox, self.done))
        self.process.start()

    def ask(self, message: object) -> object:
        self.inbox.put(message)
        return self.done.get()

    def finish(self) -> float:
        spent = self.ask(None)
        self.process.join()
        if self.shared is not None:
            self.shared.close()
        return float(spent)  # type: ignore[arg-type]


# Each mechanism: a reader (or sender) in a child process (a Peer), and the
# parent's side of one cycle.

def _publication_reader(shared: SharedSlots | None, inbox: multiprocessing.Queue,
                        done: multiprocessing.Queue) -> None:
    start = cpu()
    while (message := inbox.get()) is not None:
        if shared is not None:  # as the disk-writer and virtio do: copy it out
            shared.read(message, 0, message.document_end)
            shared.take(message)
        else:
            _document, _host, _vms = message
        done.put(True)
    done.put(cpu() - start)


def publication(n: int, with_it: bool) -> tuple[Callable[[], None], Callable[[], float]]:
    vms = fragments(n)
    host = b"<metric type='string' context='host'><name>HostName</name><value>h</value></metric>\n"
    document = assemble([host, *vms.values()])
    shared = SharedSlots() if with_it else None
    reader = Peer(_publication_reader, shared, shared=shared)
    ids, values = list(vms), list(vms.values())
    seq = [0]

    def cycle() -> None:
        seq[0] += 1
        if shared is not None:
            reader.ask(shared.write(seq[0] % 3, seq[0], document, len(b"<metrics>\n"), host,
                                    ids, values, len(values)))
        else:
            reader.ask((document, host, vms))

    return cycle, reader.finish


def _result_sender(region: SharedSlots | None, n: int, inbox: multiprocessing.Queue,
                   done: multiprocessing.Queue) -> None:
    items = tuple(fragments(n).items())
    start = cpu()
    while inbox.get() is not None:
        done.put(pack_fragments(region, items) if region is not None else items)
    done.put(cpu() - start)


def result_region(n: int, with_it: bool) -> tuple[Callable[[], None], Callable[[], float]]:
    region = SharedSlots(slots=1, writable=True) if with_it else None
    sender = Peer(_result_sender, region, n, shared=region)

    def cycle() -> None:
        got = sender.ask(True)
        if region is not None:
            unpack_fragments(region, got)  # type: ignore[arg-type]

    return cycle, sender.finish


def _job_taker(inbox: multiprocessing.Queue, done: multiprocessing.Queue) -> None:
    listed: dict[int, tuple[Domain, ...]] = {}
    start = cpu()
    while (job := inbox.get()) is not None:
        if isinstance(job, tuple):  # the listing's answer, as the worker keeps it
            listed = {job[0]: job[1]}
        elif job.domains_from:
            _domains = listed[job.domains_from]
        done.put(True)
    done.put(cpu() - start)


def domains_from(n: int, with_it: bool) -> tuple[Callable[[], None], Callable[[], float]]:
    domains = tuple(d for d, _row in vm_rows(n))
    names = tuple(spec.name for spec in vm_specs())
    taker = Peer(_job_taker)
    taker.ask((1, domains))

    def cycle() -> None:
        if with_it:
            taker.ask(Collect(2, time.time() + 5, "libvirt_domains", names, (), domains_from=1))
        else:
            taker.ask(Collect(2, time.time() + 5, "libvirt_domains", names, domains))

    return cycle, taker.finish


def vm_disk_mapping(n: int, with_it: bool, where: Path) -> tuple[Callable[[], None],
                                                                 Callable[[], float]]:
    vms = fragments(n)
    contents = {vm: assemble([fragment]) for vm, fragment in vms.items()}
    paths = {vm: where / f"vm{vm}" for vm in vms}
    kept: dict[int, VmDisk] = {}
    def opened(vm: int) -> tuple[MetricsDisk, object]:
        handle = open_disk(str(paths[vm]), VM_DISK_SIZE, lock=False)
        return (VmDisk(handle) if with_it else MetricsDisk(handle)), handle

    for vm in paths:
        disk, handle = opened(vm)
        handle.close()  # a VmDisk's mapping keeps no descriptor
        if with_it:
            kept[vm] = disk
        else:
            disk.close()

    def cycle() -> None:
        for vm, content in contents.items():
            if with_it:
                kept[vm].write(content)
            else:
                disk, handle = opened(vm)
                disk.write(content)
                disk.close()
                handle.close()

    def finish() -> float:
        for disk in kept.values():
            disk.close()
        return 0.0

    return cycle, finish


def vm_template(n: int, with_it: bool) -> tuple[Callable[[], None], Callable[[], float]]:
    specs = vm_specs()
    rows = vm_rows(n)

    def cycle() -> None:
        template, arguments = _vm_template(specs)
        if with_it:
            for domain, row in rows:
                template % arguments((vm_attributes(domain.id, domain.uuid), *row))
            return
        for domain, row in rows:
            attrs = vm_attributes(domain.id, domain.uuid)
            "".join(render_metric(spec.name, spec.type, "vm",
                                  check_value(spec.type, int_text(raw, spec.scale)),
                                  spec.unit, attrs)
                    for spec, raw in zip(specs, row, strict=True))

    return cycle, lambda: 0.0


def measure(make: Callable[[], tuple[Callable[[], None], Callable[[], float]]],
            rounds: int, period: float) -> float:
    """CPU ms per cycle, both sides: ``rounds`` cycles, ``period`` s apart (0: back to back)."""
    cycle, finish = make()
    cycle()  # warm: imports, first mappings, the child's start
    start = cpu()
    for _ in range(rounds):
        if period:
            time.sleep(period)
        cycle()
    mine = cpu() - start
    theirs = finish()
    return (mine + theirs) * 1000 / rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=6,
                        help="cycles measured at each period (back to back: 5x as many)")
    parser.add_argument("--periods", default="1,5", help="seconds between cycles, comma-separated")
    parser.add_argument("--only", default="", help="only the mechanisms whose label has this")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds that only shows the bench still works "
                             "(tests/test_bench.py runs every bench so)")
    args = parser.parse_args()
    if args.quick:
        args.domains, args.rounds, args.periods = 50, 2, "0.1"
    periods = [float(p) for p in args.periods.split(",") if p]
    multiprocessing.set_start_method("fork")
    with tempfile.TemporaryDirectory(prefix="vhostmd-mech-", dir="/dev/shm") as name:
        tmp = Path(name)
        mechanisms: dict[str, Callable[[bool], tuple[Callable[[], None], Callable[[], float]]]]
        mechanisms = {
            "publication slots (supervisor -> a reader)": lambda w: publication(args.domains, w),
            "result regions (a worker -> supervisor)": lambda w: result_region(args.domains, w),
            "domains_from (supervisor -> a worker)": lambda w: domains_from(args.domains, w),
            "per-VM disks through ctypes mappings": lambda w: vm_disk_mapping(
                args.domains, w, tmp / ("with" if w else "without")),
            "VM template rendering": lambda w: vm_template(args.domains, w),
        }
        for sub in ("with", "without"):
            (tmp / sub).mkdir()
        header = ["mechanism", "back to back"] + [f"every {p:g} s" for p in periods]
        print(f"Machine: {machine.describe()}; {time.strftime('%Y-%m-%d')}\n")
        print(f"{args.domains} VMs; CPU ms per cycle, all processes involved: "
              "with the mechanism / the plain way\n")
        print("| " + " | ".join(header) + " |")
        print("|---|" + "---:|" * (len(header) - 1))
        for label, make in mechanisms.items():
            if args.only not in label:
                continue
            cells = []
            for period in [0.0, *periods]:
                rounds = args.rounds * (5 if period == 0 else 1)
                with_ms = measure(lambda make=make: make(True), rounds, period)
                plain_ms = measure(lambda make=make: make(False), rounds, period)
                cells.append(f"{with_ms:.2f} / {plain_ms:.2f}")
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
