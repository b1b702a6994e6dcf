"""PVC's way with vhostmd, for the real-hypervisor tests (issue 21).

PVC starts every VM with ``createXML`` (transient domains), live-migrates
them, and attaches the metrics disk as a USB disk. With per-VM disks the file
must exist before QEMU opens it, which the libvirt hook
(``vhostmd-libvirt-hook``) sees to. Here:

- :func:`install_hook`: the hook as the package installs it
  (``/etc/libvirt/hooks/qemu.d/``), pointed at the test daemon's configuration
  through a defaults file like ``/etc/default/vhostmd``, and picked up by the
  rig's libvirtd with SIGHUP (``systemctl reload libvirtd``); every call is
  logged for the tests to see;
- :func:`pvc_disk`: PVC's metrics disk element, its source changed to a file;
- :func:`create_xml`: a transient domain created as PVC creates it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import qemu_rig
from qemu_rig import QemuHost

HOOK = str(Path(sys.executable).parent / "vhostmd-libvirt-hook")
HOOK_NAME = "vhostmd-test"  # the package's is qemu.d/vhostmd


def install_hook(host: QemuHost, config: Path) -> tuple[Path | None, str | None]:
    """Install the hook for ``config``'s <vm_disks>: (the log of its calls, "DOMAIN
    OPERATION SUB-OPERATION" lines; why it is not installed). Never raises: the
    other tests' guests start either way, the hook's tests fail with the reason."""
    if not host.libvirt.own:
        return None, None
    calls = host.work / "hook-calls.log"
    defaults = host.work / "hook-default"
    defaults.write_text(f"# as /etc/default/vhostmd\nVHOSTMD_CONFIG={config}\n")
    try:
        host.libvirt.add_hook(HOOK_NAME, f"""#!/bin/sh
echo "$1 $2 $3" >> {calls}
VHOSTMD_DEFAULTS={defaults} exec {HOOK} "$@"
""")
    except (OSError, RuntimeError, TimeoutError) as exc:
        qemu_rig.log(f"the libvirt hook is not installed: {exc}")
        return None, f"the libvirt hook could not be installed: {exc}"
    return calls, None


def hook_calls(log: Path, domain: str, operation: str = "prepare begin") -> int:
    """How many times the hook ran for ``domain`` and ``operation``."""
    lines = log.read_text().splitlines() if log.exists() else []
    return lines.count(f"{domain} {operation}")


def pvc_disk(source: Path) -> str:
    """PVC's metrics disk element (libvirt_schema.py, devices_vhostmd) with ``source``
    instead of /dev/shm/vhostmd0."""
    return f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{source}'/>
      <target dev='sdz' bus='usb'/>
      <readonly/>
    </disk>"""


def create_xml(xml: str) -> None:
    """``virConnect.createXML(xml, 0)``, as PVC starts its VMs (libvirt-python)."""
    import libvirt

    conn = libvirt.open(qemu_rig.URI)
    try:
        conn.createXML(xml, 0)
    finally:
        conn.close()
