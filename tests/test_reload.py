"""A reload publishes exactly the new configuration, with a real daemon and SIGHUP.

A reader watches every document the daemon writes across the reload: each
one is the old configuration's or the new one's, never a mix, and once the
new one shows, the old never comes back. Values kept from earlier cycles
are kept by what they are, not by config line, so a reload that moves,
changes or removes a metric takes the old values with it at once.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from vhostmd.document import Metric
from vhostmd.wire import BuiltinRef
from vhostmd.workers.collectors import BY_KIND, plan

from daemon_harness import VHOSTMD, Daemon, config_xml, metric_xml, ready_metrics, wait_for

# A document's shape: each (context, name, VM id) with how often it is there,
# and the value of Gen (which says which config's action ran).
Shape = tuple[frozenset[tuple[tuple[str, str, int | None], int]], str | None]


def shape(metrics: list[Metric]) -> Shape:
    counts = Counter((m.context, m.name, m.vm_id) for m in metrics)
    gen = [m.value for m in metrics if m.name == "Gen"]
    return frozenset(counts.items()), ",".join(gen) or None


def within(document: Shape, config: Shape) -> bool:
    """Nothing in ``document`` that ``config`` does not publish (each metric at most as
    often, Gen from its action). A metric whose action has not answered yet in a
    loaded machine's cycle may be missing: that is the daemon's rule at any time."""
    allowed = dict(config[0])
    return (all(count <= allowed.get(key, 0) for key, count in document[0])
            and document[1] in (None, config[1]))


def expected(sets: tuple[str, ...], shell: tuple[str, ...], gen: str, vm_ids: set[int]) -> Shape:
    """The shape a config with these built-in sets and host shell metrics publishes."""
    names: Counter[tuple[str, str, int | None]] = Counter(("host", name, None) for name in shell)
    for p in plan(tuple(BuiltinRef(s, None, None, i) for i, s in enumerate(sets, 1))):
        for name in p.metric_names:
            # The VM job also publishes host totals (over every VM).
            if BY_KIND[p.context][name][1].context == "host":
                names[("host", name, None)] += 1
            else:
                names.update(("vm", name, vm_id) for vm_id in vm_ids)
    return frozenset(names.items()), gen


class Watcher(threading.Thread):
    """Every distinct document on the disk (its metrics), in the order they appeared."""

    def __init__(self, disk: Path) -> None:
        super().__init__(daemon=True)
        self.disk = disk
        self.documents: list[list[Metric]] = []
        self.error: Exception | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                metrics = ready_metrics(self.disk)
            except Exception as exc:  # a corrupt document: the test reports it
                self.error = exc
                return
            if metrics and (not self.documents or metrics != self.documents[-1]):
                self.documents.append(metrics)
            self.halt.wait(0.01)  # a poll interval: documents change once a second

    def stop(self) -> list[list[Metric]]:
        self.halt.set()
        self.join(10)
        return self.documents


def test_a_reload_publishes_exactly_the_new_configuration(tmp_path: Path) -> None:
    """Issue 19, section 2: changed, removed and built-in metrics after SIGHUP."""
    disk = tmp_path / "vhostmd0"
    old = config_xml(disk, '<builtin set="vhostmd"/>'
                     + metric_xml("Gen", "echo 1", mtype="uint32")
                     + metric_xml("Gone", "echo 5", mtype="uint32")
                     + '<builtin set="sap"/>')
    # Gen's action changes and it moves down a line; Gone and the sap set go;
    # Added comes.
    new = config_xml(disk, '<builtin set="vhostmd"/>\n'
                     + metric_xml("Added", "echo 3", mtype="uint32") + "\n"
                     + metric_xml("Gen", "echo 2", mtype="uint32"))
    with Daemon(tmp_path, old) as daemon:
        watcher = Watcher(disk)
        watcher.start()
        wait_for(lambda: len(watcher.documents) >= 2, 10, "documents of the first config")
        vm_ids = {m.vm_id for m in watcher.documents[-1] if m.vm_id is not None}
        assert vm_ids, "the test driver's domain publishes no VM metric"
        before = expected(("vhostmd", "sap"), ("Gen", "Gone"), "1", vm_ids)
        after = expected(("vhostmd",), ("Added", "Gen"), "2", vm_ids)
        wait_for(lambda: any(shape(d) == before for d in watcher.documents), 10,
                 "a whole document of the first config")

        daemon.conf.write_text(new)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        line = daemon.wait_log_match(r"reloaded \S+: (\d+) metrics")
        # The new config stays long after a value kept from the old one would
        # have aged out of a document (a period: 1 s; kept values: 60 s).
        try:
            first_new = wait_for(lambda: next((i for i, d in enumerate(watcher.documents)
                                               if shape(d) == after), None), 10,
                                 "a document of the new config")
        except AssertionError:
            last = shape(watcher.documents[-1])
            raise AssertionError(
                f"no document of the new config; the last one has {sorted(last[0] - after[0])} "
                f"too many, {sorted(after[0] - last[0])} missing, Gen={last[1]}") from None
        wait_for(lambda: len(watcher.documents) >= first_new + 3, 10, "later documents")
        documents = watcher.stop()
        assert watcher.error is None, watcher.error

        shapes = [shape(d) for d in documents]
        mixed = [s for s in shapes if not within(s, before) and not within(s, after)]
        assert not mixed, f"documents of neither config: {mixed[0]}"
        # Once a document shows something of the new config only, no later one
        # shows anything of the old config only.
        first_new = next(i for i, s in enumerate(shapes) if not within(s, before))
        back = [s for s in shapes[first_new:] if not within(s, after)]
        assert not back, f"the old config came back: {back[0]}"

        # The log counts what `vhostmd --check` counts for the same file.
        check = subprocess.run([VHOSTMD, "--check", "-f", str(daemon.conf)],
                               capture_output=True, text=True, timeout=30)
        counted = re.search(r"OK \((\d+) metrics", check.stdout)
        assert counted is not None, check.stdout + check.stderr
        assert line.group(1) == counted.group(1)
        assert daemon.stop() == 0


def test_a_value_kept_across_a_reload_stays_while_young(tmp_path: Path) -> None:
    """A metric the reload only moved keeps its value while its action has not answered."""
    disk = tmp_path / "vhostmd0"
    flag = tmp_path / "slow"
    # Slow answers once the flag exists: the value it had is kept meanwhile.
    slow = metric_xml("Slow", f"if [ -e {flag} ]; then sleep 5; fi; echo 7", mtype="uint32",
                      attrs=' timeout="10"')
    with Daemon(tmp_path, config_xml(disk, slow)) as daemon:
        wait_for(lambda: any(m.name == "Slow" and m.value == "7"
                             for m in ready_metrics(disk) or ()), 10, "Slow's first value")
        flag.touch()
        daemon.conf.write_text(config_xml(disk, "\n\n" + slow
                                          + metric_xml("Other", "echo 1", mtype="uint32")))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reloaded")
        reloaded_at = time.monotonic()
        wait_for(lambda: any(m.name == "Other" for m in ready_metrics(disk) or ()), 10,
                 "the new config")
        # Slow is still running (5 s); its last value is still published.
        assert time.monotonic() - reloaded_at < 5
        names = [m.name for m in ready_metrics(disk) or ()]
        assert names == ["Slow", "Other"]
        assert daemon.stop() == 0
