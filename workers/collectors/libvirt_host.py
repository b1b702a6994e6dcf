"""The hypervisor product and version as libvirt reports it (`virsh version`).

Runs in the vm job (kind "vm") although its metric is a host metric: that job
talks to libvirt anyway, and host jobs then never touch libvirt, so a hung
libvirt cannot hold up the /proc metrics and fewer workers keep a connection.
"""

from __future__ import annotations

from vhostmd.workers.collectors.source import MetricSpec, Request, Sample, Source, SourceFailed


def version_text(number: int) -> str:
    """libvirt's packed version (major * 1e6 + minor * 1e3 + release) as text."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def collect(request: Request) -> Sample:
    import libvirt

    from vhostmd.workers.libvirt_conn import LibvirtUnavailable, error_message

    try:
        conn = request.libvirt.get()
        hypervisor = conn.getType()
        try:
            version = version_text(conn.getVersion())
        except libvirt.libvirtError:
            version = ""  # some drivers do not report a version
    except LibvirtUnavailable as exc:
        raise SourceFailed(str(exc)) from None
    except libvirt.libvirtError as exc:
        request.libvirt.reset()
        raise SourceFailed(f"libvirt: {error_message(exc)}") from None
    return Sample(host={"VirtProductInfo": f"{hypervisor} {version}".strip()})


SOURCE = Source(
    name="libvirt_host",
    kind="vm",
    metrics=(
        MetricSpec("VirtProductInfo", "string", "host", None,
                   "libvirt virConnectGetType + virConnectGetVersion, e.g. 'QEMU 8.2.2' "
                   "(virsh version: Running hypervisor)"),
    ),
    collect=collect,
)
