"""Fault injection against a real daemon: killed and stopped children, reloads,
libvirtd going away, unusable files. Guests must read consistent documents
throughout."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from daemon_harness import (
    VHOSTMD,
    Daemon,
    DiskReader,
    alive,
    config_xml,
    header,
    metric_names,
    metric_xml,
    updates_resume,
    wait_for,
)

NANOS = metric_xml("Nanos", "date +%s%N", mtype="uint64")
VM_ID = metric_xml("VmId", "echo VMID", mtype="uint32", context="vm")


def test_killing_each_child_type_keeps_guests_reading(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    metrics = NANOS + VM_ID + "".join(metric_xml(f"M{i}", f"echo {i}", mtype="uint32")
                                     for i in range(20))
    conf = config_xml(disk, metrics, globals_extra="<workers>2</workers>")
    with Daemon(tmp_path, conf) as daemon:
        updates_resume(disk)
        reader = DiskReader(disk)
        reader.start()
        try:
            for title in ("worker 1 ", "worker 2 ", "disk-writer", "worker 1 "):
                old = daemon.child_pid(title)
                killed_at = time.time()
                os.kill(old, signal.SIGKILL)
                new = daemon.child_pid(title, 10, other_than=old)
                # Back within 2 x update_period (1 s here), by the daemon's own log
                # clock, and with fresh metrics.
                back_after = daemon.log_time(
                    rf"started {title.strip()} \(pid {new}\)") - killed_at
                assert back_after <= 2 * 1, f"{title}replaced after {back_after:.3f} s"
                updates_resume(disk)
        finally:
            reader.stop()
        assert reader.errors == []
        assert reader.reads > 200
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()


def test_stopped_worker_is_detected_and_replaced(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, NANOS, globals_extra="<workers>2</workers>")
    with Daemon(tmp_path, conf) as daemon:
        updates_resume(disk)
        worker = daemon.child_pid("worker 1 ")
        stopped_at = time.time()
        os.kill(worker, signal.SIGSTOP)
        new = daemon.child_pid("worker 1 ", 10, other_than=worker)
        # Replaced within 2 x update_period (1 s here), by the daemon's own log clock.
        replaced_after = daemon.log_time(rf"started worker 1 \(pid {new}\)") - stopped_at
        assert replaced_after <= 2 * 1, f"replaced after {replaced_after:.3f} s"
        daemon.wait_log(f"worker 1 (pid {worker}) stopped responding")
        wait_for(lambda: not alive(worker), 5, "the stopped worker to be killed and reaped")
        updates_resume(disk)
        assert daemon.stop() == 0


def test_sighup_reloads_and_rejects_broken_configs(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    old = metric_xml("Old", "echo 1", mtype="uint32")
    with Daemon(tmp_path, config_xml(disk, NANOS + old)) as daemon:
        wait_for(lambda: {"Old", "Nanos"} <= metric_names(disk), 5, "start")
        assert daemon.proc is not None
        new = metric_xml("New", "echo 2", mtype="uint32")
        daemon.conf.write_text(config_xml(disk, NANOS + new, period=2))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: metric_names(disk) == {"Nanos", "New"}, 6,
                 "the new metric set")
        daemon.wait_log("period 2 s")
        # A broken config is rejected with one line; the running one stays.
        daemon.conf.write_text(config_xml(disk, NANOS + new).replace("<metrics>", "<metrics"))
        daemon.proc.send_signal(signal.SIGHUP)
        line = daemon.wait_log("reload rejected")
        rejected = [x for x in line.splitlines() if "reload rejected" in x]
        assert len(rejected) == 1 and f"{daemon.conf}:" in rejected[0]
        updates_resume(disk, 6)
        assert metric_names(disk) == {"Nanos", "New"}
        # A deleted config is the same: logged, and the daemon goes on.
        daemon.conf.unlink()
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.log().count("reload rejected") == 2, 5, "a second rejection")
        assert "No such file or directory" in daemon.log()
        updates_resume(disk, 6)
        assert daemon.stop() == 0


def test_sighup_with_a_new_disk_path_leaves_the_old_disk(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    moved = tmp_path / "vhostmd1"
    with Daemon(tmp_path, config_xml(disk, NANOS)) as daemon:
        updates_resume(disk)
        assert daemon.proc is not None
        daemon.conf.write_text(config_xml(moved, NANOS, size_k=128))
        daemon.proc.send_signal(signal.SIGHUP)
        updates_resume(moved)
        assert moved.stat().st_size == 128 * 1024
        frozen = disk.read_bytes()
        updates_resume(moved)
        assert disk.read_bytes() == frozen and header(disk).busy == 0
        assert daemon.stop() == 0


def test_unusable_files_are_one_clear_line(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(config_xml(tmp_path / "no-such-dir" / "vhostmd0", NANOS))
    proc = subprocess.run([VHOSTMD, "-d", "-f", str(conf), "-p", str(tmp_path / "v.pid")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"vhostmd: cannot open metrics disk "
                                   f"{tmp_path / 'no-such-dir' / 'vhostmd0'}: "
                                   "No such file or directory")
    conf.write_text(config_xml(tmp_path / "vhostmd0", NANOS))
    pid = tmp_path / "missing" / "vhostmd.pid"
    proc = subprocess.run([VHOSTMD, "-d", "-f", str(conf), "-p", str(pid)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"vhostmd: cannot open pid file {pid}: "
                                   "No such file or directory")


def test_status_shows_children_and_cycles(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, NANOS, globals_extra="<workers>2</workers>")
    with Daemon(tmp_path, conf) as daemon:
        updates_resume(disk)
        status_cmd = [VHOSTMD, "--status", "-p", str(daemon.pid_file)]

        def status_after_a_cycle() -> str | None:
            out = subprocess.run(status_cmd, capture_output=True, text=True, timeout=30)
            ok = out.returncode == 0 and "metrics published" in out.stdout
            return out.stdout if ok else None

        text = wait_for(status_after_a_cycle, 5, "a status with a cycle")
        assert f"running, pid {daemon.pid}" in text
        assert "1 metrics published, 0 left out" in text
        for role in ("worker 1", "worker 2", "disk-writer"):
            assert any(line.startswith(role) for line in text.splitlines()), text
        worker = daemon.child_pid("worker 2 ")
        os.kill(worker, signal.SIGKILL)
        daemon.child_pid("worker 2 ", 3, other_than=worker)

        def restarts_shown() -> bool:
            out = subprocess.run(status_cmd, capture_output=True, text=True, timeout=30).stdout
            row = next((x for x in out.splitlines() if x.startswith("worker 2")), "")
            return row.split()[3:4] == ["1"]

        wait_for(restarts_shown, 5, "worker 2 with one restart in the status")
        assert daemon.stop() == 0
    gone = subprocess.run(status_cmd, capture_output=True, text=True, timeout=30)
    assert gone.returncode == 3 and gone.stdout.strip() == "vhostmd is not running"


LIBVIRTD_CONF = """unix_sock_dir = "{dir}"
unix_sock_ro_perms = "0777"
auth_unix_ro = "none"
auth_unix_rw = "none"
"""


class Libvirtd:
    """A private libvirtd serving libvirt's test driver on a socket of its own."""

    def __init__(self, where: Path) -> None:
        self.dir = where
        (where / "drivers").mkdir(exist_ok=True)  # no hypervisor drivers: test driver only
        self.conf = where / "libvirtd.conf"
        self.conf.write_text(LIBVIRTD_CONF.format(dir=where))
        self.socket = where / "libvirt-sock-ro"
        self.uri = f"test+unix:///default?socket={self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, LIBVIRT_DRIVER_DIR=str(self.dir / "drivers"))
        self.proc = subprocess.Popen(
            ["libvirtd", "-f", str(self.conf), "-p", str(self.dir / "libvirtd.pid")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: subprocess.run(["virsh", "-r", "-c", self.uri, "list"],
                                        capture_output=True).returncode == 0,
                 15, "libvirtd to serve", interval=0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def libvirtd() -> Libvirtd:
    if shutil.which("libvirtd") is None or shutil.which("virsh") is None:
        pytest.skip("libvirtd/virsh not installed (apt-get install libvirt-daemon libvirt-clients)")
    if os.geteuid() != 0:
        pytest.skip("a private libvirtd needs root")
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="vhlv-"))  # short: unix socket paths are limited
    server = Libvirtd(where)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(where, ignore_errors=True)


def test_libvirtd_restart_is_survived(tmp_path: Path, libvirtd: Libvirtd) -> None:
    disk = tmp_path / "vhostmd0"
    with Daemon(tmp_path, config_xml(disk, NANOS + VM_ID), uri=libvirtd.uri) as daemon:
        wait_for(lambda: "VmId" in metric_names(disk), 5, "VM metrics")
        libvirtd.stop()
        # VM metrics are left out, host metrics keep flowing.
        wait_for(lambda: "VmId" not in metric_names(disk), 5,
                 "VM metrics left out")
        updates_resume(disk)
        daemon.wait_log("the domain list left out")
        libvirtd.start()
        wait_for(lambda: "VmId" in metric_names(disk), 15,
                 "VM metrics back after reconnecting")
        daemon.wait_log("the domain list recovered")
        assert daemon.stop() == 0


def test_hung_libvirt_call_costs_a_worker_not_the_cycle(tmp_path: Path,
                                                        libvirtd: Libvirtd) -> None:
    disk = tmp_path / "vhostmd0"
    with Daemon(tmp_path, config_xml(disk, NANOS + VM_ID), uri=libvirtd.uri) as daemon:
        wait_for(lambda: "VmId" in metric_names(disk), 5, "VM metrics")
        assert libvirtd.proc is not None
        libvirtd.proc.send_signal(signal.SIGSTOP)
        try:
            hung = daemon.wait_log_match(r"(worker \d+) \(pid (\d+)\) stopped responding "
                                         r"for [\d.]+ s while running list-domains", 6)
            updates_resume(disk)  # host metrics go on while libvirt hangs
            # It was asked for its stack (SIGABRT, faulthandler) before it was killed:
            # the log shows where it hung, down to the libvirt call.
            stack = daemon.wait_log_match(
                rf"{hung.group(1)} \(pid {hung.group(2)}\) was at: (.*)", 6).group(1)
        finally:
            libvirtd.proc.send_signal(signal.SIGCONT)
        frames = stack.split(" <- ")
        assert re.fullmatch(r"\S+\.py:\d+ \S+", frames[0]), stack
        assert any(f.startswith("libvirt_conn.py:") for f in frames), stack
        assert any(f.startswith("worker.py:") for f in frames), stack
        wait_for(lambda: "VmId" in metric_names(disk), 15,
                 "VM metrics back")
        assert daemon.stop() == 0
