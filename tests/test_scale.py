"""Work and documents that do not fit: a disk too small, shell work longer than the period.

Real daemons on libvirt's test driver with generated nodes; every wait is
bounded and polls a condition.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from vhostmd import mdisk
from vhostmd.document import parse_document
from vhostmd.etc import shipped
from vhostmd.mdisk import HEADER_SIZE

import nodes
from daemon_harness import (
    VHOSTMD,
    Daemon,
    config_xml,
    disk_metrics,
    header,
    metric_xml,
    ready_metrics,
    wait_for,
)

# What C vm-dump-metrics and libmetrics read at a time (O_DIRECT).
BLOCK_SIZE = 64 * 1024


def vm_ids(disk: Path) -> list[int]:
    """The VM ids on the disk (none while no document is there yet)."""
    return sorted({m.vm_id for m in ready_metrics(disk) or () if m.vm_id is not None})


def test_disk_too_small_for_every_vm_keeps_host_and_lowest_ids(tmp_path: Path) -> None:
    uri, _domains = nodes.write_node(tmp_path / "node.xml", 300)
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, '<builtin set="sap"/><builtin set="vhostmd"/>', size_k=64)
    with Daemon(tmp_path, conf, uri=uri) as daemon:
        def partial() -> list[int] | None:
            return vm_ids(disk) or None

        ids = wait_for(partial, 20, "a document with VMs")
        # A stable, documented choice: the lowest domain ids, as many whole VMs as fit.
        assert 0 < len(ids) < 300
        assert ids == list(range(1, len(ids) + 1))
        metrics = disk_metrics(disk)
        names = {m.name for m in metrics if m.vm_id is None}
        assert {"NumCPUs", "HostName", "Time", "TotalPhyMem"} <= names
        for vm_id in ids:  # whole VMs only
            assert len([m for m in metrics if m.vm_id == vm_id]) == 4
        daemon.wait_log(f"cannot hold every VM: {300 - len(ids)} of 300 VMs")
        # Not frozen: Time keeps advancing in the partial documents.
        first = next(m.value for m in metrics if m.name == "Time" and m.vm_id is None)
        wait_for(lambda: next(m.value for m in disk_metrics(disk)
                              if m.name == "Time" and m.vm_id is None) != first,
                 10, "a newer partial document")
        status = subprocess.run([VHOSTMD, "--status", "-p", str(daemon.pid_file)],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"{300 - len(ids)} VMs do not fit" in status.stdout
        assert daemon.log().count("cannot hold every VM") == 1
        assert daemon.stop() == 0


def test_shell_work_longer_than_the_period_reaches_every_vm_in_turn(tmp_path: Path) -> None:
    # 60 VMs x 0.2 s of shell work with 2 workers for actions: about 8 run per
    # 1 s cycle. In VM-id order only the first few would ever get a value.
    uri, _domains = nodes.write_node(tmp_path / "node.xml", 60)
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, metric_xml("Id", "sleep 0.2; echo VMID", mtype="uint32",
                                       context="vm"),
                      globals_extra="<workers>3</workers>")
    with Daemon(tmp_path, conf, uri=uri) as daemon:
        seen: set[int] = set()

        def every_vm() -> bool:
            metrics = ready_metrics(disk) or []
            for m in metrics:
                if m.name == "Id" and m.vm_id is not None:
                    assert m.value == str(m.vm_id)  # each VM its own value
                    seen.add(m.vm_id)
            # Kept values: one document ends up holding every VM at once.
            return len({m.vm_id for m in metrics if m.name == "Id"}) == 60

        wait_for(every_vm, 60, "one document with all 60 VMs' shell metric")
        assert len(seen) == 60
        line = daemon.wait_log("shell actions need more than the 1 s update period")
        assert "refreshed about every" in line
        status = subprocess.run([VHOSTMD, "--status", "-p", str(daemon.pid_file)],
                                capture_output=True, text=True, timeout=30)
        assert "ran in the last cycle; each is refreshed about every" in status.stdout
        assert daemon.stop() == 0


def test_hung_actions_do_not_starve_quick_ones(tmp_path: Path) -> None:
    # Six actions that hang, listed first (twice as many as the 3 workers that
    # run actions), and five quick ones: every quick metric must keep being
    # refreshed, every cycle or nearly.
    disk = tmp_path / "vhostmd0"
    hung = [metric_xml(f"Hung{i}", f"sleep 100{i}", mtype="uint32") for i in range(6)]
    quick = [metric_xml(f"Quick{i}", "date +%s%N", mtype="uint64") for i in range(5)]
    with Daemon(tmp_path, config_xml(disk, "\n".join(hung + quick), period=2)) as daemon:
        def quick_values() -> dict[str, str] | None:
            got = {m.name: m.value for m in ready_metrics(disk) or ()
                   if m.name.startswith("Quick")}
            return got if len(got) == 5 else None

        first = wait_for(quick_values, 20, "all five quick metrics")

        def all_refreshed() -> bool:
            now = quick_values()
            return now is not None and all(now[k] != first[k] for k in first)

        # Refreshed within about two periods, while the hung ones keep hanging.
        wait_for(all_refreshed, 8, "every quick metric refreshed")
        daemon.wait_log("host metric Hung0 left out: timed out")
        assert daemon.stop() == 0


def test_check_tells_whether_the_disk_holds_n_vms(tmp_path: Path) -> None:
    for conf in ("vhostmd.conf", "vhostmd-pvc.conf"):
        fits = subprocess.run([VHOSTMD, "--check", "--vms", "1024", "-f", shipped(conf)],
                              capture_output=True, text=True, timeout=30)
        assert fits.returncode == 0, fits.stdout + fits.stderr
        assert "holds 1024 VMs" in fits.stdout
    small = tmp_path / "small.conf"
    small.write_text(config_xml(tmp_path / "d", '<builtin set="sap"/><builtin set="vhostmd"/>',
                                size_k=64))
    refused = subprocess.run([VHOSTMD, "--check", "--vms", "1024", "-f", str(small)],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1
    assert "does NOT hold 1024 VMs" in refused.stdout and '<size unit="k">' in refused.stdout


def test_the_estimate_matches_a_real_document(tmp_path: Path) -> None:
    uri, _domains = nodes.write_node(tmp_path / "node.xml", 50)
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, '<builtin set="sap"/><builtin set="vhostmd"/>', size_k=1024)
    with Daemon(tmp_path, conf, uri=uri) as daemon:
        wait_for(lambda: len(vm_ids(disk)) == 50, 20, "all 50 VMs")
        real = disk.read_bytes()
        length = int.from_bytes(real[12:16], "big")
        check = subprocess.run([VHOSTMD, "--check", "--vms", "50", "-f", str(daemon.conf)],
                               capture_output=True, text=True, timeout=30)
        estimated = int(check.stdout.split("about ")[1].split(" bytes")[0].replace(",", ""))
        # An estimate from the widest values: never below the real size, not far above.
        assert length <= estimated <= length * 1.5
        assert daemon.stop() == 0


def test_disk_smaller_than_64k_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "tiny.conf"
    conf.write_text(config_xml(tmp_path / "d", metric_xml("A", "echo 1"), size_k=4))
    result = subprocess.run([VHOSTMD, "--check", "-f", str(conf)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1
    assert f"{conf}:" in result.stderr and "64 KiB" in result.stderr


def read_like_c_guest(disk: Path) -> bytes:
    """The document as the C guest reads it: whole 64 KiB blocks, a short read fails.

    C vm-dump-metrics and libmetrics read the header's block, then as many
    whole blocks as header and document take; past the disk's last whole
    block they get a short read and report an empty document.
    """
    with open(disk, "rb") as f:
        def block(index: int) -> bytes:
            data = os.pread(f.fileno(), BLOCK_SIZE, index * BLOCK_SIZE)
            if len(data) != BLOCK_SIZE:
                raise AssertionError(f"{disk}: block {index} is short ({len(data)} bytes): "
                                     "a C guest reads no document")
            return data

        first = block(0)
        length = mdisk.unpack_header(first[:HEADER_SIZE]).length
        blocks = -(-(HEADER_SIZE + length) // BLOCK_SIZE)
        data = first + b"".join(block(i) for i in range(1, blocks))
        return data[HEADER_SIZE:HEADER_SIZE + length]


def test_a_disk_of_partial_blocks_publishes_only_what_c_guests_read(tmp_path: Path) -> None:
    """Issue 19, section 3: a 100 KiB disk, 100 VMs; the daemon and --check count alike."""
    uri, _domains = nodes.write_node(tmp_path / "node.xml", 100)
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, '<builtin set="sap"/><builtin set="vhostmd"/>', size_k=100)
    conf_file = tmp_path / "vhostmd.conf"
    conf_file.write_text(conf)
    # --check: the warning, and a disk that does NOT hold 100 VMs in its one whole block.
    check = subprocess.run([VHOSTMD, "--check", "--vms", "100", "-f", str(conf_file)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 1, check.stdout + check.stderr
    warnings = [line for line in check.stdout.splitlines() if "not a multiple of 64 KiB" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"{conf_file}:")
    assert "documents use only its first 64 KiB" in warnings[0]
    assert "does NOT hold 100 VMs" in check.stdout
    # The size it suggests is whole blocks.
    suggested = int(check.stdout.split('<size unit="k">')[1].split("<")[0])
    assert suggested % 64 == 0

    with Daemon(tmp_path, conf, uri=uri) as daemon:
        ids = wait_for(lambda: vm_ids(disk), 20, "a document with VMs")
        assert 0 < len(ids) < 100
        assert HEADER_SIZE + header(disk).length <= BLOCK_SIZE
        assert parse_document(read_like_c_guest(disk))
        daemon.wait_log("cannot hold every VM")
        assert daemon.log().count("not a multiple of 64 KiB") == 1
        assert daemon.stop() == 0


def test_check_counts_whole_blocks_of_per_vm_disks(tmp_path: Path) -> None:
    """Per-VM disks: the same rule and the same warning."""
    conf = tmp_path / "vms.conf"
    conf.write_text(config_xml(
        tmp_path / "d", '<builtin set="sap"/><builtin set="vhostmd"/>',
        globals_extra=f'<vm_disks><path>{tmp_path / "vms"}</path>'
                      '<size unit="k">65</size></vm_disks>'))
    check = subprocess.run([VHOSTMD, "--check", "--vms", "1", "-f", str(conf)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{conf}:" in check.stdout and "disk size 66560 bytes is not a multiple" in check.stdout
    assert "per-VM disk (guests read only its first 65,536 bytes) holds" in check.stdout
