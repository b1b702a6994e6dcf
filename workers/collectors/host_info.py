"""Host identity: host name, hardware model and the OS vendor (uname, DMI, os-release)."""

from __future__ import annotations

import os

from vhostmd.workers.collectors.source import MetricSpec, Request, Sample, Source

DMI_DIR = "/sys/class/dmi/id"
OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def host_system_info(dmi_dir: str = DMI_DIR) -> str:
    """DMI vendor and product of the machine; the kernel's uname where there is no DMI."""
    vendor = _read_text(f"{dmi_dir}/sys_vendor")
    product = _read_text(f"{dmi_dir}/product_name")
    described = " ".join(part for part in (vendor, product) if part)
    if described:
        return described
    uname = os.uname()
    return f"{uname.sysname} {uname.release} {uname.machine}"


def os_vendor(os_release: tuple[str, ...] = OS_RELEASE) -> str:
    """NAME from os-release: the distribution that ships the virtualization stack."""
    for path in os_release:
        for line in _read_text(path).splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "NAME":
                return value.strip().strip("\"'")
    return os.uname().sysname


def collect(request: Request) -> Sample:
    sample = Sample()
    if "HostName" in request.wanted:
        sample.host["HostName"] = os.uname().nodename
    if "HostSystemInfo" in request.wanted:
        sample.host["HostSystemInfo"] = host_system_info()
    if "VirtualizationVendor" in request.wanted:
        sample.host["VirtualizationVendor"] = os_vendor()
    return sample


SOURCE = Source(
    name="host_info",
    kind="host",
    metrics=(
        MetricSpec("HostName", "string", "host", None,
                   "uname(2) nodename (the kernel host name, no DNS lookup)"),
        MetricSpec("HostSystemInfo", "string", "host", None,
                   f"{DMI_DIR}/sys_vendor + product_name; else uname sysname release machine"),
        MetricSpec("VirtualizationVendor", "string", "host", None,
                   "NAME= of /etc/os-release (the distribution shipping KVM/libvirt)"),
    ),
    collect=collect,
)
