"""Per-VM metrics disks (<vm_disks>) and `vhostmd --domain-xml`, against real daemons.

Domains come from libvirt's test driver: node files (tests/nodes.py) where a
fixed set of running domains is enough, and a private libvirtd (test_faults)
where domains are defined, started, stopped and undefined while the daemon
runs. The real-guest test (a QEMU guest reading only itself from its own
disk) belongs with the QEMU rig and is not here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid as uuidlib
from pathlib import Path

import pytest

from vhostmd import mdisk
from vhostmd.document import Metric
from vhostmd.supervisor.config import ConfigError, parse_config_bytes

import nodes
from daemon_harness import VHOSTMD, Daemon, config_xml, disk_metrics, header, metric_xml, wait_for
from test_faults import Libvirtd, libvirtd  # noqa: F401 - the fixture, used by name

NANOS = metric_xml("Nanos", "date +%s%N", mtype="uint64")
VM_UUID = metric_xml("VmUuid", "echo UUID", context="vm")
VM_ID = metric_xml("VmId", "echo VMID", mtype="uint32", context="vm")
DEFAULT_TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # "test" in test:///default


def vm_disks_xml(path: Path, size_k: int = 64) -> str:
    return f'<vm_disks><path>{path}</path><size unit="k">{size_k}</size></vm_disks>'


def only_vm_disks(vms: Path, metrics: str, *, transports: str = "") -> str:
    return f"""<vhostmd><globals>{vm_disks_xml(vms)}<update_period>1</update_period>
<path>/usr/sbin:/usr/bin:/sbin:/bin</path>{transports}</globals>
<metrics>{metrics}</metrics></vhostmd>"""


def read(path: Path) -> list[Metric] | None:
    try:
        return disk_metrics(path)
    except (OSError, mdisk.DiskError, ValueError):
        return None


def vm_uuids(path: Path) -> set[str] | None:
    """UUIDs of the VMs whose metrics the disk holds (None: nothing readable yet)."""
    metrics = read(path)
    if metrics is None:
        return None
    return {m.uuid or "" for m in metrics if m.context == "vm"}


def nanos(path: Path) -> str | None:
    return next((m.value for m in read(path) or () if m.name == "Nanos"), None)


def fresh(path: Path, timeout: float = 5.0) -> list[Metric]:
    """A document written after now (its Nanos changed)."""
    before = nanos(path)
    wait_for(lambda: (n := nanos(path)) is not None and n != before, timeout,
             f"a new document on {path.name}")
    metrics = read(path)
    assert metrics is not None
    return metrics


def own_only(path: Path, uuid: str) -> bool:
    """The disk holds host metrics and the metrics of VM ``uuid``, of no other VM."""
    metrics = read(path) or []
    host = any(m.context == "host" for m in metrics)
    return host and {m.uuid for m in metrics if m.context == "vm"} == {uuid}


def domain_xml_text(name: str, uuid: str) -> str:
    return (f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>"
            "<memory>1048576</memory><os><type>hvm</type></os></domain>")


def virsh(server: Libvirtd, *args: str) -> subprocess.CompletedProcess[str]:
    rw = f"test+unix:///default?socket={server.dir / 'libvirt-sock'}"
    done = subprocess.run(["virsh", "-c", rw, *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done


# -- configuration -------------------------------------------------------------------


def test_vm_disks_config() -> None:
    alone = parse_config_bytes(only_vm_disks(Path("/run/vms"), "").encode())
    assert alone.vm_disks_path == "/run/vms" and alone.vm_disks_size == 65536
    assert not alone.vbd  # no <disk>: no shared disk
    both = parse_config_bytes(config_xml("/dev/shm/x", globals_extra=vm_disks_xml(
        Path("vms"), 128)).encode(), "/etc/vhostmd/vhostmd.conf")
    assert both.vbd and both.vm_disks_path == "/etc/vhostmd/vms"
    assert both.vm_disks_size == 128 * 1024
    plain = parse_config_bytes(config_xml("/dev/shm/x").encode())
    assert plain.vbd and plain.vm_disks_path is None
    for bad, problem in [
        (vm_disks_xml(Path("/v"), 32), "out of range (64 KiB"),
        ("<vm_disks><size>65536</size></vm_disks>", "<vm_disks> needs a <path>"),
        (vm_disks_xml(Path("/v")) + "<transport>virtio</transport>", "needs <transport>vbd"),
    ]:
        with pytest.raises(ConfigError, match=problem.replace("(", r"\(")):
            parse_config_bytes(only_vm_disks(Path("/v"), "").replace(
                vm_disks_xml(Path("/v")), bad).encode())


def test_user_option_with_vm_disks_is_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(only_vm_disks(tmp_path / "vms", NANOS))
    proc = subprocess.run([VHOSTMD, "-d", "-u", "nobody", "-f", str(conf),
                           "-p", str(tmp_path / "v.pid")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"vhostmd: <vm_disks> needs vhostmd to run as root (the disk-writer makes root's "
        f"files in {tmp_path / 'vms'}); remove -u nobody or <vm_disks>"]
    assert not (tmp_path / "vms").exists()


# -- files per VM ------------------------------------------------------------------------


def test_each_vm_disk_holds_the_host_and_its_own_vm_only(tmp_path: Path) -> None:
    uri, domains = nodes.write_node(tmp_path / "node.xml", 3)
    vms = tmp_path / "vms"
    with Daemon(tmp_path, only_vm_disks(vms, NANOS + VM_UUID + VM_ID), uri=uri) as daemon:
        for dom in domains:
            wait_for(lambda d=dom: own_only(vms / d.uuid, d.uuid), 10, f"{dom.name}'s disk")
        assert sorted(os.listdir(vms)) == sorted(d.uuid for d in domains)
        for index, dom in enumerate(domains, start=1):
            path = vms / dom.uuid
            metrics = fresh(path)
            assert {(m.name, m.value) for m in metrics if m.context == "vm"} == {
                ("VmUuid", dom.uuid), ("VmId", str(index))}
            st = path.stat()
            assert st.st_size == 65536 and st.st_mode & 0o777 == 0o644 and st.st_uid == 0
            assert header(path).busy == 0
            # What a guest runs: vm-dump-metrics on the disk attached to it.
            guest = subprocess.run(
                [str(Path(VHOSTMD).parent / "vm-dump-metrics"), "--disk", str(path),
                 "--metric", "VmUuid", "--context", "vm", "--uuid", dom.uuid],
                capture_output=True, text=True, timeout=30)
            assert guest.returncode == 0 and guest.stdout.strip() == dom.uuid, guest.stderr
        # No shared disk without <disk>, and the disk-writer holds no file open but DIR.
        writer = daemon.child_pid("disk-writer")
        held = {os.readlink(f"/proc/{writer}/fd/{fd}") for fd in os.listdir(f"/proc/{writer}/fd")}
        assert str(vms) in held and not any(h.startswith(f"{vms}/") for h in held)
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()


def test_vm_disks_follow_define_start_stop_undefine(tmp_path: Path,
                                                    libvirtd: Libvirtd) -> None:  # noqa: F811
    vms = tmp_path / "vms"
    with Daemon(tmp_path, only_vm_disks(vms, NANOS + VM_UUID), uri=libvirtd.uri) as daemon:
        test_disk = vms / DEFAULT_TEST_UUID
        wait_for(lambda: own_only(test_disk, DEFAULT_TEST_UUID), 10, "the running domain's disk")
        new = str(uuidlib.uuid4())
        new_disk = vms / new
        xml = tmp_path / "vmd2.xml"
        xml.write_text(domain_xml_text("vmd2", new))

        virsh(libvirtd, "define", str(xml))  # defined, shut off: host metrics only
        wait_for(lambda: vm_uuids(new_disk) == set(), 10, "the defined domain's disk")
        assert any(m.name == "Nanos" for m in fresh(new_disk))

        virsh(libvirtd, "start", "vmd2")
        wait_for(lambda: own_only(new_disk, new), 10, "the started domain's own metrics")
        assert own_only(test_disk, DEFAULT_TEST_UUID)  # never another VM's

        virsh(libvirtd, "destroy", "vmd2")  # stopped: host metrics only, still refreshed
        wait_for(lambda: vm_uuids(new_disk) == set(), 10, "the stopped domain's disk")
        assert {m.context for m in fresh(new_disk)} == {"host"}

        virsh(libvirtd, "undefine", "vmd2")
        wait_for(lambda: not new_disk.exists(), 10, "the undefined domain's disk removed")

        # A transient domain: its file lives while it does.
        transient = str(uuidlib.uuid4())
        xml.write_text(domain_xml_text("vmd3", transient))
        virsh(libvirtd, "create", str(xml))
        wait_for(lambda: own_only(vms / transient, transient), 10, "the transient domain's disk")
        virsh(libvirtd, "destroy", "vmd3")
        wait_for(lambda: not (vms / transient).exists(), 10, "the transient domain's disk gone")

        assert own_only(test_disk, DEFAULT_TEST_UUID)
        daemon.wait_log("VM disks: removed 1")
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()


def test_unsafe_and_unknown_files_in_the_directory(tmp_path: Path) -> None:
    uri, domains = nodes.write_node(tmp_path / "node.xml", 4)
    vms = tmp_path / "vms"
    vms.mkdir(mode=0o755)
    target = tmp_path / "target"
    target.write_bytes(b"not a metrics disk")
    linked, writable, given, good = domains
    os.symlink(target, vms / linked.uuid)
    (vms / writable.uuid).write_bytes(b"x" * 65536)
    os.chmod(vms / writable.uuid, 0o664)
    # As libvirt leaves a read-only disk image once its domain started: QEMU's
    # (a metrics disk: anything else is never adopted).
    (vms / given.uuid).write_bytes(mdisk.pack_header(0, 0, 0).ljust(65536, b"y"))
    os.chmod(vms / given.uuid, 0o644)
    os.chown(vms / given.uuid, 65534, 65534)
    old, young = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    for name in (old, young, "notes.txt"):
        (vms / name).write_bytes(b"")
        os.chmod(vms / name, 0o644)
    os.utime(vms / old, (1, 1))  # unknown to libvirt, untouched for ages: removed
    with Daemon(tmp_path, only_vm_disks(vms, NANOS + VM_UUID), uri=uri) as daemon:
        wait_for(lambda: own_only(vms / good.uuid, good.uuid), 10, "the good domain's disk")
        wait_for(lambda: not (vms / old).exists(), 5, "the stale file removed")
        for _ in range(3):
            fresh(vms / good.uuid)
        lines = daemon.log().splitlines()
        symlink = [x for x in lines if "is a symbolic link" in x]
        assert len(symlink) == 1 and str(vms / linked.uuid) in symlink[0]
        shared = [x for x in lines if "can be written by group or others" in x]
        assert len(shared) == 1 and str(vms / writable.uuid) in shared[0]
        assert target.read_bytes() == b"not a metrics disk"
        assert (vms / writable.uuid).read_bytes() == b"x" * 65536
        # The file libvirt gave away is taken back and written.
        wait_for(lambda: own_only(vms / given.uuid, given.uuid), 10, "the given-away disk")
        st = (vms / given.uuid).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o644)
        assert (vms / young).exists() and (vms / "notes.txt").exists()
        assert daemon.stop() == 0


def test_reload_adds_resizes_and_removes_vm_disks(tmp_path: Path) -> None:
    uri, domains = nodes.write_node(tmp_path / "node.xml", 2)
    disk, vms = tmp_path / "vhostmd0", tmp_path / "vms"
    with Daemon(tmp_path, config_xml(disk, NANOS + VM_UUID), uri=uri) as daemon:
        assert daemon.proc is not None
        fresh(disk)
        assert not vms.exists()
        daemon.conf.write_text(config_xml(disk, NANOS + VM_UUID,
                                          globals_extra=vm_disks_xml(vms)))
        daemon.proc.send_signal(signal.SIGHUP)
        for dom in domains:
            wait_for(lambda d=dom: own_only(vms / d.uuid, d.uuid), 10, "per-VM disks")
        assert vm_uuids(disk) == {d.uuid for d in domains}  # the shared disk goes on

        daemon.conf.write_text(config_xml(disk, NANOS + VM_UUID,
                                          globals_extra=vm_disks_xml(vms, 128)))
        daemon.proc.send_signal(signal.SIGHUP)
        first = vms / domains[0].uuid
        wait_for(lambda: first.stat().st_size == 128 * 1024, 10, "the disks resized")
        fresh(first)
        assert own_only(first, domains[0].uuid)

        daemon.conf.write_text(config_xml(disk, NANOS + VM_UUID))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log(f"no longer writing the VM disks in {vms}")
        frozen = first.read_bytes()
        fresh(disk)
        fresh(disk)
        assert first.read_bytes() == frozen and header(first).busy == 0  # left as it was
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()


# -- vhostmd --domain-xml -----------------------------------------------------------------


def run_domain_xml(conf: Path, uri: str, vm: str,
                   *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VHOSTMD, "-f", str(conf), "-c", uri, "--domain-xml", vm, *extra],
                          capture_output=True, text=True, timeout=30)


def test_domain_xml_makes_the_disk_and_names_what_to_attach(tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    conf = tmp_path / "c.conf"
    conf.write_text(only_vm_disks(vms, NANOS))
    out = run_domain_xml(conf, "test:///default", "test")
    assert out.returncode == 0, out.stderr
    made = vms / DEFAULT_TEST_UUID
    assert out.stdout == (
        "<disk type='file' device='disk'>\n  <driver name='qemu' type='raw'/>\n"
        f"  <source file='{made}'/>\n  <target dev='vdz' bus='virtio'/>\n"
        "  <readonly/>\n</disk>\n")
    assert out.stderr == f"vhostmd: created {made}\n"
    assert made.stat().st_size == 65536 and header(made).busy == 1  # guests wait for a document
    with open(made, "rb") as f:
        assert f.read(4) == mdisk.SIGNATURE
    # By UUID, the same; the file exists now and is kept.
    again = run_domain_xml(conf, "test:///default", DEFAULT_TEST_UUID)
    assert again.returncode == 0 and again.stdout == out.stdout and again.stderr == ""
    # Unknown name: one line. Unknown UUID: a transient domain to come, its disk made.
    missing = run_domain_xml(conf, "test:///default", "nosuchvm")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "vhostmd: no domain named 'nosuchvm' in libvirt test:///default\n"
    future = str(uuidlib.uuid4())
    transient = run_domain_xml(conf, "test:///default", future)
    assert transient.returncode == 0 and (vms / future).exists()
    assert "kept for 600 s for a transient domain to start" in transient.stderr
    # A symlink where the file goes is refused, with one line.
    link = str(uuidlib.uuid4())
    os.symlink(tmp_path / "elsewhere", vms / link)
    refused = run_domain_xml(conf, "test:///default", link)
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
    assert "is a symbolic link" in refused.stderr and not (tmp_path / "elsewhere").exists()
    # A symlink as the directory itself is refused too, and nothing is made behind it.
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    os.symlink(real, tmp_path / "vms-link")
    linked = tmp_path / "linked.conf"
    linked.write_text(only_vm_disks(tmp_path / "vms-link", NANOS))
    refused = run_domain_xml(linked, "test:///default", "test")
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == (f"vhostmd: VM disk directory {tmp_path / 'vms-link'} is a symbolic "
                              "link; vhostmd does not follow links there (name the real "
                              "directory)\n")
    assert list(real.iterdir()) == []
    # The directory follows the daemon's one rule for what it writes as root
    # (runtime/files.py): its own, and nobody else may write it.
    real.chmod(0o775)
    linked.write_text(only_vm_disks(real, NANOS))
    refused = run_domain_xml(linked, "test:///default", "test")
    assert refused.stderr == (f"vhostmd: VM disk directory {real} can be written by group or "
                              "others (mode 0775); remove it or chmod go-w it\n")
    assert list(real.iterdir()) == []


def test_domain_xml_is_accepted_by_libvirt(tmp_path: Path,
                                                       libvirtd: Libvirtd) -> None:  # noqa: F811
    xml = tmp_path / "dom.xml"
    vms = tmp_path / "vms"
    own = tmp_path / "own.conf"
    own.write_text(only_vm_disks(vms, NANOS, transports="<transport>vbd</transport>"
                                 "<transport>virtio</transport>"))
    shared = tmp_path / "shared.conf"
    shared.write_text(config_xml(tmp_path / "vhostmd0", NANOS, transports=("vbd", "virtio")))
    # libvirtd's test driver forgets its domains when its last connection
    # closes: the daemon keeps one open, as it does on a real host.
    with Daemon(tmp_path, own.read_text(), uri=libvirtd.uri) as daemon:
        wait_for(lambda: (vms / DEFAULT_TEST_UUID).exists(), 10, "the daemon connected")
        for name, conf, source in [("own1", own, None), ("shared1", shared, tmp_path / "vhostmd0")]:
            uuid = str(uuidlib.uuid4())
            xml.write_text(domain_xml_text(name, uuid))
            virsh(libvirtd, "define", str(xml))
            out = run_domain_xml(conf, libvirtd.uri, name)
            assert out.returncode == 0, out.stderr
            elements = out.stdout.split("\n\n")
            assert len(elements) == 2 and elements[1].startswith("<channel type='unix'>")
            assert ("<shareable/>" in elements[0]) == (source is not None)
            # The elements as printed, pasted into the domain's <devices> (PVC's
            # path), checked against libvirt's schema and parsed by libvirt.
            # (The test driver has no attach-device: virDomainAttachDeviceFlags.)
            xml.write_text(domain_xml_text(name, uuid).replace(
                "</domain>", f"<devices>{out.stdout}</devices></domain>"))
            virsh(libvirtd, "define", "--validate", str(xml))
            dumped = virsh(libvirtd, "dumpxml", "--inactive", name).stdout
            assert f"<source file='{source or vms / uuid}'/>" in dumped
            assert "<readonly/>" in dumped and "name='org.github.vhostmd.1'" in dumped
            only_disk = run_domain_xml(conf, libvirtd.uri, uuid, "--device", "disk")
            assert only_disk.stdout == elements[0] + "\n"
        assert daemon.stop() == 0


def test_check_sizes_each_per_vm_disk(tmp_path: Path) -> None:
    builtins = '<builtin set="sap"/><builtin set="vhostmd"/>'
    conf = tmp_path / "v.conf"
    conf.write_text(only_vm_disks(tmp_path / "vms", builtins))
    fits = subprocess.run([VHOSTMD, "--check", "--vms", "1024", "-f", str(conf)],
                          capture_output=True, text=True, timeout=30)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "each 65,536-byte per-VM disk holds about" in fits.stdout
    # 600 host strings of 32 characters: more than a 64 KiB per-VM disk holds.
    many = "".join(metric_xml(f"Host{i}", "echo x", mtype="string") for i in range(600))
    conf.write_text(only_vm_disks(tmp_path / "vms", many))
    refused = subprocess.run([VHOSTMD, "--check", "--vms", "1", "-f", str(conf)],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "per-VM disk does NOT hold about" in refused.stdout
    assert '<vm_disks><size unit="k">' in refused.stdout
