"""`vhostmd-libvirt-hook` run as libvirtd runs it, and the claims that keep a starting
domain's per-VM disk from being removed under it.

The hook is the installed console script in a real subprocess: arguments
``DOMAIN OPERATION SUB-OPERATION EXTRA``, the domain XML on stdin, the
configuration found through a defaults file (``VHOSTMD_DEFAULTS``). The
real-libvirtd runs (transient domains, save and restore, PVC's USB disk) are
in test_qemu.py.
"""

from __future__ import annotations

import fcntl
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhostmd import mdisk
from vhostmd.disk import vmdir
from vhostmd.disk.handle import DiskRefused
from vhostmd.disk.vmdir import (
    CLAIM_LOCK_WAIT,
    CLAIM_MARGIN,
    VmDir,
    open_claims_lock,
    open_vm_dir,
    prepare_vm_disk,
)
from vhostmd.disk.vmwriter import VmDisks
from vhostmd.runtime.locks import LOCK_DIR, lock_name_for_file
from vhostmd.supervisor import libvirt_hook
from vhostmd.supervisor.config import DEFAULT_CONFIG, UNITS, parse_config_bytes

from daemon_harness import config_xml, wait_for

HOOK = str(Path(sys.executable).parent / "vhostmd-libvirt-hook")
OTHER_OPERATIONS = [("start", "begin"), ("started", "begin"), ("stopped", "end"),
                    ("release", "end"), ("migrate", "begin"), ("restore", "begin"),
                    ("reconnect", "begin"), ("attach", "begin"), ("prepare", "end")]
# PVC's metrics disk element (its libvirt_schema.py), with the per-VM file as source.
PVC_DISK = """<disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{source}'/>
      <target dev='sdz' bus='usb'/>
      <readonly/>
    </disk>"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the hook makes root's files")


class Setup:
    """A configuration with <vm_disks>, a defaults file naming it, and what runs the hook."""

    def __init__(self, tmp_path: Path, vm_disks: str | None = None) -> None:
        self.root = tmp_path
        tmp_path.mkdir(mode=0o755, exist_ok=True)
        tmp_path.chmod(0o755)
        self.vms = tmp_path / "vms"
        self.conf = tmp_path / "vhostmd.conf"
        extra = vm_disks if vm_disks is not None else (
            f'<vm_disks><path>{self.vms}</path><size unit="k">128</size></vm_disks>')
        self.conf.write_text(config_xml(tmp_path / "vhostmd0", globals_extra=extra))
        self.defaults = tmp_path / "default"
        self.defaults.write_text(f"# as /etc/default/vhostmd\nVHOSTMD_CONFIG={self.conf}\n")

    def run(self, xml: str | bytes, name: str = "web1", operation: str = "prepare",
            sub: str = "begin") -> subprocess.CompletedProcess[bytes]:
        data = xml.encode() if isinstance(xml, str) else xml
        return subprocess.run([HOOK, name, operation, sub, "-"], input=data,
                              capture_output=True, timeout=60,
                              env=dict(os.environ, VHOSTMD_DEFAULTS=str(self.defaults)))


def domain(uuid: str, *sources: str, name: str = "web1") -> str:
    disks = "\n    ".join(PVC_DISK.format(source=s) for s in sources)
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>1024</memory>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' discard='unmap'/>
      <source protocol='rbd' name='vms/{name}_sda'/>
      <target dev='sda' bus='scsi'/>
    </disk>
    {disks}
  </devices>
</domain>
"""


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def one_line(done: subprocess.CompletedProcess[bytes]) -> str:
    text = done.stderr.decode()
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text


# --------------------------------------------------------------------------- the hook


def test_prepare_makes_the_domains_own_disk_quickly(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    uuid = new_uuid()
    xml = domain(uuid, f"{setup.vms}/{uuid}")
    assert not setup.vms.exists()
    done = setup.run(xml)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"" and done.stderr == b""
    # The directory (its parent exists) and the file, as the daemon makes them.
    assert (setup.vms.stat().st_mode & 0o777, setup.vms.stat().st_uid) == (0o755, 0)
    disk = setup.vms / uuid
    st = disk.stat()
    assert (st.st_size, st.st_mode & 0o777, st.st_uid, st.st_nlink) == (128 * 1024, 0o644, 0, 1)
    head = mdisk.unpack_header(disk.read_bytes())
    assert head.signature == mdisk.SIGNATURE and head.busy  # the guest waits for a document
    assert sorted(os.listdir(setup.vms)) == [uuid]

    # Again (a restart): a document the daemon wrote is kept; the file is claimed.
    content = b"<metrics>\n</metrics>\n"
    document = mdisk.pack_header(0, sum(content), len(content)) + content
    with open(disk, "r+b") as file:
        file.write(document)
    os.utime(disk, (1, 1))
    started = time.time()
    assert setup.run(xml).returncode == 0
    assert disk.read_bytes()[:len(document)] == document
    assert disk.stat().st_mtime >= started - CLAIM_MARGIN

    # libvirt waits for the hook at every start: time it (the last of 5 runs each).
    times = {}
    for operation, sub in (("prepare", "begin"), ("started", "begin")):
        runs = []
        for _ in range(5):
            began = time.monotonic()
            assert setup.run(xml, operation=operation, sub=sub).returncode == 0
            runs.append(time.monotonic() - began)
        times[operation] = statistics.median(runs)
    print(f"hook run time, median of 5: prepare begin {times['prepare'] * 1000:.0f} ms, "
          f"other operations {times['started'] * 1000:.0f} ms")
    assert times["prepare"] < 1.0  # far above the ~60 ms measured idle: load only slows it


@pytest.mark.parametrize(("operation", "sub"), OTHER_OPERATIONS)
def test_other_operations_do_nothing(tmp_path: Path, operation: str, sub: str) -> None:
    setup = Setup(tmp_path)
    uuid = new_uuid()
    done = setup.run(domain(uuid, f"{setup.vms}/{uuid}"), operation=operation, sub=sub)
    # Nothing on stdout: for migrate and restore libvirt would take it as the new XML.
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    assert not setup.vms.exists()


def test_domains_not_using_our_disks_are_left_alone(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.vms.mkdir(mode=0o755)
    uuid = new_uuid()
    for xml in (domain(uuid),  # no metrics disk at all
                domain(uuid, str(tmp_path / "vhostmd0")),  # the shared disk
                domain(uuid, f"{setup.vms}/sub/{uuid}"),  # below the directory, not in it
                domain(uuid, f"{tmp_path}/vms2/{uuid}"),
                domain(uuid, f"{setup.vms}/notes.txt")):  # not a per-VM disk's name
        done = setup.run(xml)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b""), xml
    assert os.listdir(setup.vms) == []

    # With the shared disk in the VM disk directory itself: still not ours to judge.
    shared_here = Setup(tmp_path / "b", f"<vm_disks><path>{tmp_path / 'b'}</path></vm_disks>")
    assert shared_here.run(domain(uuid, str(tmp_path / "b/vhostmd0"))).returncode == 0

    # No <vm_disks>, or a configuration that cannot be read: the domain starts as it
    # would without the hook (a missing file is QEMU's to report).
    plain = Setup(tmp_path / "c", "")
    (tmp_path / "c/vms").mkdir()
    done = plain.run(domain(uuid, f"{tmp_path}/c/vms/{uuid}"))
    assert (done.returncode, done.stderr) == (0, b"")
    plain.conf.write_text("<vhostmd><globals>")
    done = plain.run(domain(uuid, f"{tmp_path}/c/vms/{uuid}"))
    assert done.returncode == 0 and "not well-formed" in one_line(done)
    plain.conf.unlink()
    done = plain.run(domain(uuid, f"{tmp_path}/c/vms/{uuid}"))
    assert done.returncode == 0 and "cannot read" in one_line(done)
    assert os.listdir(tmp_path / "c/vms") == []


def test_a_domain_may_name_only_its_own_disk(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.vms.mkdir(mode=0o755)
    mine, other = new_uuid(), new_uuid()
    (setup.vms / other).write_bytes(b"another VM's metrics")
    os.chmod(setup.vms / other, 0o644)
    os.symlink(setup.vms, tmp_path / "link")
    for xml in (domain(mine, f"{setup.vms}/{other}"),
                domain(mine, f"{setup.vms}/{mine}", f"{setup.vms}/../vms/{other}"),
                domain(mine, f"/{setup.vms}/{other}"),  # '//' at the start
                domain(mine, f"{tmp_path}/link/{other}"),
                domain(mine, f"{setup.vms}/{other}").replace("source file=", "source dev=")):
        done = setup.run(xml)
        assert done.returncode == 1
        assert f"per-VM metrics disk of domain {other}, not its own" in one_line(done)
    assert sorted(os.listdir(setup.vms)) == [other]


def test_unsafe_files_fail_only_the_domain_that_names_them(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.vms.mkdir(mode=0o755)
    target = tmp_path / "target"
    target.write_bytes(b"not a metrics disk")
    linked, writable, given, fine = new_uuid(), new_uuid(), new_uuid(), new_uuid()
    os.symlink(target, setup.vms / linked)
    (setup.vms / writable).write_bytes(b"x" * 65536)
    os.chmod(setup.vms / writable, 0o666)
    done = setup.run(domain(linked, f"{setup.vms}/{linked}"))
    assert done.returncode == 1 and "is a symbolic link" in one_line(done)
    done = setup.run(domain(writable, f"{setup.vms}/{writable}"))
    assert done.returncode == 1 and "can be written by group or others" in one_line(done)
    assert target.read_bytes() == b"not a metrics disk"
    assert (setup.vms / writable).read_bytes() == b"x" * 65536
    assert setup.run(domain(fine, f"{setup.vms}/{fine}")).returncode == 0

    # A domain's second start: libvirt gave its read-only disk to QEMU's user at the
    # first and never gave it back. The hook takes it back; the content stays.
    assert setup.run(domain(given, f"{setup.vms}/{given}")).returncode == 0
    content = (setup.vms / given).read_bytes()
    os.chown(setup.vms / given, 65534, 65534)
    done = setup.run(domain(given, f"{setup.vms}/{given}"))
    assert (done.returncode, done.stderr) == (0, b"")
    st = (setup.vms / given).stat()
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert (setup.vms / given).read_bytes() == content

    # The directory: writable by others, or a symlink, or its parent missing (the
    # hook makes the directory only, never what is above it).
    setup.vms.chmod(0o777)
    done = setup.run(domain(fine, f"{setup.vms}/{fine}"))
    assert done.returncode == 1 and "can be written by group or others" in one_line(done)
    setup.vms.chmod(0o755)
    deep = Setup(tmp_path / "d", f"<vm_disks><path>{tmp_path}/d/no/vms</path></vm_disks>")
    done = deep.run(domain(fine, f"{tmp_path}/d/no/vms/{fine}"))
    assert done.returncode == 1 and "cannot create" in one_line(done)
    assert not (tmp_path / "d/no").exists()


def test_untrusted_xml_is_never_expanded_or_followed(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    uuid = new_uuid()
    secret = tmp_path / "secret"
    secret.write_text(uuid)
    laughs = ("<?xml version='1.0'?><!DOCTYPE domain [<!ENTITY a 'aaaaaaaaaa'>"
              + "".join(f"<!ENTITY {chr(98 + i)} '{('&' + chr(97 + i) + ';') * 10}'>"
                        for i in range(8))
              + f"]><domain><uuid>{uuid}</uuid><devices><disk><source file='{setup.vms}/"
              + "&i;'/></disk></devices></domain>")
    external = (f"<?xml version='1.0'?><!DOCTYPE domain [<!ENTITY u SYSTEM 'file://{secret}'>]>"
                f"<domain><uuid>&u;</uuid><devices><disk><source file='{setup.vms}/{uuid}'/>"
                "</disk></devices></domain>")
    simple = (f"<!DOCTYPE domain [<!ENTITY u '{uuid}'>]><domain><uuid>&u;</uuid><devices>"
              f"<disk><source file='{setup.vms}/&u;'/></disk></devices></domain>")
    refused = "declares or references entities"
    for xml, why in ((laughs, refused), (external, refused), (simple, refused),
                     ("<domain><uuid>", "not well-formed"),
                     (f"<network><uuid>{uuid}</uuid></network>", "not a <domain>")):
        done = setup.run(xml, name="x'; touch /tmp/pwned; '")
        assert done.returncode == 0 and why in one_line(done), xml
    assert not setup.vms.exists() and not Path("/tmp/pwned").exists()
    # Larger than the bound: not read on, and the domain is not failed for it.
    done = setup.run(b"<domain>" + b" " * libvirt_hook.MAX_XML + b"</domain>")
    assert done.returncode == 0 and "larger than" in one_line(done)
    # A path that leaves the directory through '..' is not in it.
    escape = domain("../../" + secret.name, f"{setup.vms}/../{secret.name}")
    assert setup.run(escape).returncode == 0
    assert secret.read_text() == uuid and not setup.vms.exists()


def test_defaults_file_is_read_as_the_init_script_and_unit_read_it(tmp_path: Path) -> None:
    defaults = tmp_path / "default"
    for text, expected in (
            ("", DEFAULT_CONFIG),
            ("# VHOSTMD_CONFIG=/nope\nVHOSTMD_URI=qemu:///system\n", DEFAULT_CONFIG),
            ("VHOSTMD_CONFIG=/a\nVHOSTMD_CONFIG='/b c'\n", "/b c"),
            ('export VHOSTMD_CONFIG="/etc/x.conf"\n', "/etc/x.conf"),
            ("  VHOSTMD_CONFIG = /spaced \n", "/spaced")):
        defaults.write_text(text)
        assert libvirt_hook.config_path(str(defaults)) == expected, text
    assert libvirt_hook.config_path(str(tmp_path / "none")) == DEFAULT_CONFIG
    defaults.write_text("VHOSTMD_CONFIG=$(touch /tmp/pwned)\n")
    with pytest.raises(libvirt_hook.CannotTell, match="not a plain path"):
        libvirt_hook.config_path(str(defaults))
    assert DEFAULT_CONFIG == libvirt_hook.DEFAULT_CONFIG and UNITS == libvirt_hook.UNITS


@pytest.mark.parametrize("vm_disks", [
    "<vm_disks><path>/run/vhostmd/vms</path></vm_disks>",
    '<vm_disks><path> vms </path><size unit="K">256</size></vm_disks>',
    '<vm_disks><!-- PVC --><path>/dev/shm/vhostmd-vms/</path><size unit="m">1</size>'
    "</vm_disks>",
    '<vm_disks><size>65536</size><path>../v</path></vm_disks>',
])
def test_hook_reads_vm_disks_as_the_daemon_does(tmp_path: Path, vm_disks: str) -> None:
    conf = tmp_path / "etc/vhostmd.conf"
    conf.parent.mkdir()
    conf.write_text(config_xml("/dev/shm/x", globals_extra=vm_disks))
    daemon = parse_config_bytes(conf.read_bytes(), str(conf))
    assert daemon.vm_disks_path is not None
    assert libvirt_hook.read_vm_disks(str(conf)) == (os.path.normpath(daemon.vm_disks_path),
                                                     daemon.vm_disks_size)


# --------------------------------------------------------------------------- claims


@dataclass
class VmDiskRig:
    """A directory of per-VM disks, its writer, and one domain's UUID and file."""

    vm_dir: VmDir
    writer: VmDisks
    uuid: str
    disk: Path


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[VmDiskRig]:
    vm_dir = open_vm_dir(str(tmp_path / "vms"), 65536, lock=False)
    writer = VmDisks(vm_dir)
    uuid = new_uuid()
    try:
        yield VmDiskRig(vm_dir, writer, uuid, tmp_path / "vms" / uuid)
    finally:
        writer.close()
        vm_dir.close()


def test_writer_keeps_a_file_claimed_after_its_listing(rig: VmDiskRig) -> None:
    """A transient domain that stops and starts again before the writer acted on the
    listing that saw it gone (save then restore, a migration away and back)."""
    vm_dir, writer, uuid, disk = rig.vm_dir, rig.writer, rig.uuid, rig.disk
    writer.publish(b"", {uuid: b""}, (), time.time())  # running
    assert disk.exists()
    os.utime(disk, (1, 1))  # last written long ago
    stale_listing = time.time() - 5  # taken before the claim below
    assert not prepare_vm_disk(vm_dir, uuid)  # the hook: the domain starts again
    inode = disk.stat().st_ino
    writer.publish(b"", {}, (), stale_listing)  # gone, says the stale listing
    assert disk.exists() and disk.stat().st_ino == inode
    # The next listing lists it (libvirt gives a starting domain its id first).
    writer.publish(b"", {uuid: b""}, (), time.time())
    assert disk.stat().st_ino == inode

    # Gone in a listing taken after the last claim: removed.
    writer.publish(b"", {}, (), time.time() + 2 * CLAIM_MARGIN)
    assert not disk.exists()

    # Claimed after a listing that has it gone, and the start failed: the next
    # listing without it removes it (the writer remembers it saw the domain).
    writer.publish(b"", {uuid: b""}, (), time.time())
    os.utime(disk, (1, 1))
    stale_listing = time.time() - 5
    prepare_vm_disk(vm_dir, uuid)
    writer.publish(b"", {}, (), stale_listing)
    assert disk.exists()
    writer.publish(b"", {}, (), time.time() + 2 * CLAIM_MARGIN)
    assert not disk.exists()


def test_claim_and_removal_exclude_each_other(rig: VmDiskRig) -> None:
    vm_dir, writer, uuid, disk = rig.vm_dir, rig.writer, rig.uuid, rig.disk
    claims = open_claims_lock(vm_dir)
    assert claims is not None, "root: the claims lock is a file in the lock directory"
    claims_path = Path(LOCK_DIR) / lock_name_for_file("claims", os.fstat(vm_dir.fd))
    try:
        assert os.stat(claims_path).st_mode & 0o777 == 0o600  # root's alone
        writer.publish(b"", {uuid: b""}, (), time.time())
        # A claim in progress holds the claims lock: the writer does not remove it.
        fcntl.flock(claims, fcntl.LOCK_EX)
        writer.publish(b"", {}, (), time.time() + 2 * CLAIM_MARGIN)
        assert disk.exists()
        fcntl.flock(claims, fcntl.LOCK_UN)

        # The writer removes the file while a claim waits for the lock: the claim
        # then makes a new one, which stays.
        writer.publish(b"", {uuid: b""}, (), time.time())
        old_inode = disk.stat().st_ino
        fcntl.flock(claims, fcntl.LOCK_EX)
        opened = open_count(claims_path)  # ours and the writer's
        made = start_claim(vm_dir, uuid)
        # The claimer has the claims lock open (and polls for it: we hold it).
        wait_for(lambda: open_count(claims_path) == opened + 1, 10,
                 "the claimer to open the lock")
        os.unlink(disk)  # as the writer does, under the lock
        fcntl.flock(claims, fcntl.LOCK_UN)
        assert made() == [True]
        assert disk.stat().st_ino != old_inode
        assert mdisk.unpack_header(disk.read_bytes()).busy
    finally:
        os.close(claims)


def test_a_flock_on_a_vm_disk_blocks_neither_claims_nor_removals(rig: VmDiskRig) -> None:
    """A VM disk is world-readable (QEMU reads it), so any local user can flock it: that
    must neither fail a starting domain's claim nor keep a gone domain's file."""
    vm_dir, writer, uuid, disk = rig.vm_dir, rig.writer, rig.uuid, rig.disk
    writer.publish(b"", {uuid: b""}, (), time.time())
    assert disk.stat().st_mode & 0o004  # readable by anyone
    users = os.open(disk, os.O_RDONLY)  # what a local user can open...
    fcntl.flock(users, fcntl.LOCK_EX)  # ...and lock
    try:
        started = time.monotonic()
        assert prepare_vm_disk(vm_dir, uuid) is False  # claimed, not refused
        assert time.monotonic() - started < CLAIM_LOCK_WAIT
        writer.publish(b"", {}, (), time.time() + 2 * CLAIM_MARGIN)
        assert not disk.exists()
    finally:
        os.close(users)


def test_without_a_lock_directory_claims_lock_the_file_itself(
        rig: VmDiskRig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root, or no writable /run: the file's own flock (the lock directory's
    function answers None then, as it does for a daemon that is not root)."""
    monkeypatch.setattr(vmdir, "root_lock_dir", lambda: None)
    vm_dir, writer, uuid, disk = rig.vm_dir, rig.writer, rig.uuid, rig.disk
    writer.publish(b"", {uuid: b""}, (), time.time())
    # A claim in progress holds the file's flock: the writer does not remove it.
    held = os.open(disk, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    writer.publish(b"", {}, (), time.time() + 2 * CLAIM_MARGIN)
    assert disk.exists()
    os.close(held)

    # The writer removes the file while a claim waits for the lock: the claim
    # finds it gone and makes a new one, which stays.
    writer.publish(b"", {uuid: b""}, (), time.time())
    old_inode = disk.stat().st_ino
    held = os.open(disk, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    made = start_claim(vm_dir, uuid)
    # The claimer has the file open (and polls for the flock we hold).
    wait_for(lambda: open_count(disk) == 2, 10, "the claimer to open the file")
    os.unlink(disk)  # as the writer does, under the lock
    os.close(held)
    assert made() == [True]
    assert disk.stat().st_ino != old_inode
    assert mdisk.unpack_header(disk.read_bytes()).busy


def start_claim(vm_dir: VmDir, uuid: str) -> Callable[[], list[bool | Exception]]:
    """Claim ``uuid``'s disk in a thread; the returned function waits for its outcome."""
    made: list[bool | Exception] = []

    def claim() -> None:
        try:
            made.append(prepare_vm_disk(vm_dir, uuid))
        except DiskRefused as exc:
            made.append(exc)

    claimer = threading.Thread(target=claim)
    claimer.start()

    def outcome() -> list[bool | Exception]:
        claimer.join(10)
        assert not claimer.is_alive()
        return made

    return outcome


def open_count(path: Path) -> int:
    """How many descriptors of this process are open on ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            continue
    return count
