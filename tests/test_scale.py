"""Work and documents that do not fit: a disk too small, shell work longer than the period.

Real daemons on libvirt's test driver with generated nodes; every wait is
bounded and polls a condition.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from vhostmd.etc import shipped

import nodes
from daemon_harness import (
    VHOSTMD,
    Daemon,
    config_xml,
    disk_metrics,
    metric_xml,
    ready_metrics,
    wait_for,
)


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
