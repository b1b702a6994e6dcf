"""How the suite runs on two processes (``./dev.sh test`` passes ``-n 2 --dist loadgroup``).

Most tests wait on a daemon's cycle, not on the CPU, so two pytest workers
halve the suite's time. A module runs whole on one worker (its fixtures are
made once). The modules that use the machine itself run one after the other
on one worker, and first, because they are the longest: the system libvirtd
with real QEMU guests, the systemd container, the .deb build and install.
Loop devices are taken by two modules: they share a worker too.
"""

from __future__ import annotations

import pytest

MACHINE = ("test_packaging", "test_installed_layout", "test_systemd", "test_qemu")
LOOP_DEVICES = ("test_guest_cli", "test_guest_daemon")
# Pure, quick modules: the machine group's worker takes one more unit at the
# start (xdist hands out two), so that one must not hold anything long up.
QUICK = ("test_proc_parsers", "test_formats")


def group_of(item: pytest.Item) -> str:
    module = item.path.stem
    if module in MACHINE:
        return "machine"
    if module in LOOP_DEVICES:
        return "loop-devices"
    return module


def rank(group: str) -> int:
    if group == "machine":
        return 0
    if group in QUICK:
        return 1
    return 2


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group_of(item)))
    # Stable: within a rank, the usual order (and within the machine group,
    # MACHINE's, so that the packages are built before they are booted).
    items.sort(key=lambda item: (rank(group_of(item)),
                                 MACHINE.index(item.path.stem) if item.path.stem in MACHINE
                                 else 0))
