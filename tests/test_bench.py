"""Every benchmark still runs: each bench/ script in its --quick mode.

A benchmark nobody runs rots (bench_virtio.py once looked for the virtio
process among the supervisor's direct children, long after children came
from the forkserver). This runs them all at once, briefly: it checks that each
still works and prints its table, not what it measures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# Script -> a line its table must have.
EXPECTED = {
    "bench_cycle.py": "| builtin | 10 |",
    "bench_events.py": "destroy -> metrics off the disk",
    "bench_floor.py": "with the worker's connection",
    "bench_host_collectors.py": "same CPU count: True",
    "bench_mechanisms.py": "| VM template rendering |",
    "bench_starvation.py": "| every VM had a value after |",
    "bench_virtio.py": "| virtio process title | vhostmd: virtio 16/16/16 channels |",
    "bench_vmdisks.py": "| shared disk + vm_disks |",
}


def why_not_runnable(script: str) -> str | None:
    if script == "bench_events.py":
        if os.geteuid() != 0:
            return "bench_events.py starts a private libvirtd: needs root"
        if shutil.which("libvirtd") is None or shutil.which("virsh") is None:
            return "bench_events.py needs libvirtd and virsh"
    return None


def test_every_bench_script_is_covered() -> None:
    scripts = {p.name for p in BENCH.glob("bench_*.py")}
    assert scripts == set(EXPECTED)


def test_every_bench_runs_in_quick_mode() -> None:
    runs: dict[str, subprocess.Popen[str]] = {}
    skipped = {}
    for script in sorted(EXPECTED):
        reason = why_not_runnable(script)
        if reason is not None:
            skipped[script] = reason
            continue
        # All at once: each mostly waits for its daemon's cycles.
        runs[script] = subprocess.Popen(
            [sys.executable, str(BENCH / script), "--quick"], cwd=BENCH.parent,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    failed = []
    try:
        for script, proc in runs.items():
            out, err = proc.communicate(timeout=240)
            if proc.returncode != 0 or EXPECTED[script] not in out:
                failed.append(f"{script}: exit status {proc.returncode}\n{out}\n{err}")
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not failed, "\n\n".join(failed)
    if skipped:
        pytest.skip("; ".join(skipped.values()))
