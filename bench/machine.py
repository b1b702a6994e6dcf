"""The machine a benchmark ran on, as one line for its results table."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import psutil


def describe() -> str:
    """CPUs and their model, memory, kernel, Python and libvirt versions."""
    match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    memory = psutil.virtual_memory().total / 2**30
    try:
        import libvirt

        packed = libvirt.getVersion()
        version = f", libvirt {packed // 1_000_000}.{packed // 1000 % 1000}.{packed % 1000}"
    except Exception:  # the line is still useful without it
        version = ""
    return (f"{os.cpu_count()} CPUs ({match.group(1) if match else '?'}), {memory:.1f} GiB, "
            f"{platform.platform()}, Python {platform.python_version()}{version}")
