"""The host collectors' /proc (and DMI, os-release) parsers on fixture files.

The fixtures in tests/data/proc/ are written for these tests: a machine with
an offline CPU (cpu2 missing), an old kernel without MemAvailable, files with
missing or garbled fields. Values are checked to the byte, as published.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vhostmd.workers.collectors.host_cpu import read_cpu_stat
from vhostmd.workers.collectors.host_info import host_system_info, os_vendor
from vhostmd.workers.collectors.host_memory import memory_values, read_meminfo
from vhostmd.workers.collectors.host_paging import per_second, read_vmstat
from vhostmd.workers.collectors.source import SourceFailed, seconds_from_ticks

PROC = Path(__file__).parent / "data" / "proc"


def fixture(name: str) -> str:
    return str(PROC / name)


def test_cpu_stat_counts_online_cpus_and_sums_user_nice_system() -> None:
    online, ticks = read_cpu_stat(fixture("stat"))
    assert online == 3  # cpu0, cpu1, cpu3: cpu2 is offline; nothing after the cpu lines counts
    assert ticks == 10132153 + 290696 + 3084719
    assert seconds_from_ticks(ticks, 100) == "135075.680000"
    assert seconds_from_ticks(7, 100) == "0.070000"
    assert seconds_from_ticks(1, 3) == "0.333333"  # truncated, never rounded up


@pytest.mark.parametrize("name", ["stat-no-cpu", "stat-garbled"])
def test_cpu_stat_without_usable_cpu_lines_fails(name: str) -> None:
    with pytest.raises((SourceFailed, ValueError)):
        read_cpu_stat(fixture(name))


def test_meminfo_values() -> None:
    mem = read_meminfo(fixture("meminfo"))
    assert mem == {"total": 16318540, "available": 9876544,
                   "swap_total": 2097148, "swap_free": 2000000}
    assert memory_values(mem) == {
        "TotalPhyMem": 15936,  # MiB, rounded down
        "UsedMem": 6291,
        "FreeMem": 9645,
        "FreePhysicalMemory": 9876544,  # KiB
        "FreeVirtualMemory": 9876544 + 2000000,
        "UsedVirtualMemory": 16318540 + 2097148 - 9876544 - 2000000,
    }


def test_meminfo_before_memavailable_estimates_it() -> None:
    mem = read_meminfo(fixture("meminfo-3.10"))
    assert mem["available"] == 1000000 + 200000 + 3000000  # MemFree + Buffers + Cached
    assert memory_values(mem)["UsedVirtualMemory"] == 8000000 - 4200000


def test_meminfo_without_total_fails() -> None:
    with pytest.raises(SourceFailed, match="has no MemTotal"):
        read_meminfo(fixture("meminfo-no-total"))


def test_vmstat_counters_and_rates() -> None:
    assert read_vmstat(fixture("vmstat")) == {
        "pgpgin": 5518362, "pgpgout": 93718852, "pgfault": 3346021731}
    with pytest.raises(SourceFailed, match="has no pgpgout, pgfault"):
        read_vmstat(fixture("vmstat-old"))
    assert per_second(1500, 1000, 2.0) == 250
    assert per_second(1001, 1000, 2.0) == 1  # 0.5 rounds up
    assert per_second(1000, 1000, 2.0) == 0


def test_dmi_and_os_release() -> None:
    assert host_system_info(str(PROC / "dmi")) == "Example Corp Model 42 (rev 3)"
    assert os_vendor((fixture("missing-os-release"), fixture("os-release"))) == \
        "Debian GNU/Linux"


def test_without_dmi_or_os_release_uname_is_used() -> None:
    uname = os.uname()
    assert host_system_info(fixture("no-dmi")) == \
        f"{uname.sysname} {uname.release} {uname.machine}"
    assert os_vendor((fixture("missing-os-release"),)) == uname.sysname
