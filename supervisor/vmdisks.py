"""Per-VM disks (<vm_disks>) on the supervisor's side: the directory at start and on reload.

The supervisor opens the directory as root before anything else drops
privileges, and hands its descriptor to the disk-writer (children.py); the
writer makes, writes and removes the files (disk/vmwriter.py). Under ``-u``
the writer runs as that user and could not make root's files, so
``<vm_disks>`` together with ``-u`` is refused at start, and a reload that
adds ``<vm_disks>`` to a daemon running under ``-u`` is rejected (one line).

On reload: a new size of the same directory replaces the writer, which
resizes every file as it maps it; a new path opens the new directory first
(a directory that cannot be used keeps the old one, with one line); removing
``<vm_disks>`` stops writing the files. Files left behind (old path, or
``<vm_disks>`` removed) stay where they are with their last document: a
domain whose XML names one still starts. Remove them by hand once no domain
names them.
"""

from __future__ import annotations

import dataclasses
import logging

from vhostmd.disk.handle import DiskRefused
from vhostmd.disk.vmdir import VmDir, open_vm_dir, switch_vm_dir
from vhostmd.supervisor.config import Config

log = logging.getLogger("vhostmd")


def vm_disks_refusal(config: Config, user: str | None) -> str | None:
    """Why ``config`` cannot run as ``user`` (-u), or None."""
    if config.vm_disks_path is None or user is None:
        return None
    return (f"<vm_disks> needs vhostmd to run as root (the disk-writer makes root's files in "
            f"{config.vm_disks_path}); remove -u {user} or <vm_disks>")


def prepare_vm_dir(config: Config) -> VmDir | None:
    """Open and lock the VM disk directory at start (as root); DiskRefused with one line."""
    if config.vm_disks_path is None:
        return None
    return open_vm_dir(config.vm_disks_path, config.vm_disks_size)


def reload_vm_dir(current: VmDir | None, new: Config, *,
                  dropped_to: str | None) -> tuple[VmDir | None, Config]:
    """The directory to use after a reload to ``new``, and ``new`` as it then applies."""
    try:
        vm_dir = switch_vm_dir(current, new.vm_disks_path, new.vm_disks_size,
                               dropped_to=dropped_to)
    except DiskRefused as exc:
        if current is None:
            log.error("reload: %s; not writing per-VM disks", exc)
            return None, dataclasses.replace(new, vm_disks_path=None)
        log.error("reload: %s; still writing the VM disks in %s (%d bytes each)", exc,
                  current.path, current.size)
        return current, dataclasses.replace(new, vm_disks_path=current.path,
                                            vm_disks_size=current.size)
    if current is not None and (vm_dir is None or vm_dir.dir is not current.dir):
        current.close()  # the old writer, killed at the next converge, keeps its own copy
        log.info("no longer writing the VM disks in %s; their files stay there",
                 current.path)
    return vm_dir, new
