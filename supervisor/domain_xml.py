"""`vhostmd --domain-xml VM`: the libvirt device elements that give a domain its metrics.

Prints, for the configured transports, each element on its own (usable as is
with ``virsh attach-device DOMAIN FILE --config``, or pasted into the
domain's ``<devices>``):

- the metrics disk, read-only, raw, as ``vdz`` on the virtio bus (the last
  virtio disk name, unlikely to clash with a domain's own disks): the VM's
  own file ``DIR/<uuid>`` with ``<vm_disks>`` (made now if missing, with the
  daemon's safety rules), else the shared disk, ``<shareable/>``;
- the virtio-serial channel ``org.github.vhostmd.1``, its socket placed by
  libvirt (under the default ``channel_path``).

This runs in the command-line process, never in the daemon: it may talk to
libvirt itself (read-only).
"""

from __future__ import annotations

import os
import stat
from xml.sax.saxutils import escape

from vhostmd.disk.handle import DiskRefused
from vhostmd.disk.vmdir import UNKNOWN_GRACE, UUID_RE, open_vm_dir, prepare_vm_disk
from vhostmd.supervisor.config import Config

TARGET_DEV = "vdz"
CHANNEL_NAME = "org.github.vhostmd.1"
DEVICES = ("disk", "channel")


class DomainXmlError(Exception):
    """One line saying why no XML can be given."""


def _attr(value: str) -> str:
    return escape(value, {"'": "&apos;", '"': "&quot;"})


def disk_element(path: str, *, shared: bool) -> str:
    try:
        block = stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        block = False
    kind, source = ("block", f"dev='{_attr(path)}'") if block else ("file", f"file='{_attr(path)}'")
    return (f"<disk type='{kind}' device='disk'>\n"
            "  <driver name='qemu' type='raw'/>\n"
            f"  <source {source}/>\n"
            f"  <target dev='{TARGET_DEV}' bus='virtio'/>\n"
            "  <readonly/>\n"
            + ("  <shareable/>\n" if shared else "")
            + "</disk>\n")


def channel_element() -> str:
    return ("<channel type='unix'>\n"
            "  <source mode='bind'/>\n"
            f"  <target type='virtio' name='{CHANNEL_NAME}'/>\n"
            "</channel>\n")


def lookup_uuid(uri: str | None, vm: str) -> tuple[str, str | None]:
    """(UUID, note): the domain named or identified by ``vm``, asked of libvirt.

    A UUID libvirt does not know is accepted, with a note: a transient domain
    does not exist before it starts, but its disk must.
    """
    import libvirt

    from vhostmd.workers.libvirt_conn import error_message

    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        raise DomainXmlError(f"cannot connect to libvirt {uri or '(default)'}: "
                             f"{error_message(exc)}") from None
    try:
        is_uuid = UUID_RE.match(vm.lower()) is not None
        try:
            dom = conn.lookupByUUIDString(vm) if is_uuid else conn.lookupByName(vm)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise DomainXmlError(f"looking up domain {vm}: {error_message(exc)}") from None
            if not is_uuid:
                raise DomainXmlError(f"no domain named {vm!r} in libvirt "
                                     f"{uri or '(default)'}") from None
            return vm.lower(), (f"no domain {vm.lower()} is defined: its disk is kept for "
                                f"{UNKNOWN_GRACE:.0f} s for a transient domain to start")
        return dom.UUIDString(), None
    finally:
        conn.close()


def domain_xml(config: Config, uri: str | None, vm: str,
               device: str | None = None) -> tuple[str, list[str]]:
    """(the elements, separated by blank lines; notes for stderr). DomainXmlError if none."""
    uuid, note = lookup_uuid(uri, vm)
    own_disk = config.vm_disks_path is not None and device in (None, "disk")
    notes = [note] if note and own_disk else []
    elements: list[str] = []
    if device in (None, "disk"):
        if config.vm_disks_path is not None:
            if os.geteuid() != 0:
                raise DomainXmlError("--domain-xml makes the VM's disk, root's like the "
                                     "daemon's: run it as root")
            try:
                vm_dir = open_vm_dir(config.vm_disks_path, config.vm_disks_size, lock=False)
                try:
                    if prepare_vm_disk(vm_dir, uuid):
                        notes.append(f"created {vm_dir.file(uuid)}")
                finally:
                    vm_dir.close()
            except DiskRefused as exc:
                raise DomainXmlError(str(exc)) from None
            elements.append(disk_element(vm_dir.file(uuid), shared=False))
        elif config.vbd:
            elements.append(disk_element(config.disk_path, shared=True))
    if device in (None, "channel") and config.virtio:
        elements.append(channel_element())
    if not elements:
        raise DomainXmlError(f"no {device or 'device'} to attach: the configuration's "
                             f"transports are {', '.join(config.transports)}")
    return "\n".join(elements), notes
