"""The Debian packages under a real systemd: start, restart, crash, reload, watchdog, upgrade, boot.

One container (tests/systemd_rig.py) for the module: the packages built from
the checkout are installed in it with the libvirt test driver
(VHOSTMD_URI=test:///default in /etc/default/vhostmd), the shared disk in
/dev/shm and per-VM disks (``<vm_disks>``) in /run/vhostmd/vms. The tests
run in file order on that one node, as its life goes: start, restart under
readers, kill -9, reload, watchdog, the guest's textfile timer, upgrade under
readers, reboot.
Root, debootstrap and systemd-nspawn are needed; without them the module
is skipped. About 60 s with a cached root (a first run makes the root:
about a minute more).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import systemd_rig
from prometheus_check import Exposition, parse
from systemd_rig import Container

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

PERIOD = 1
SHARED = "/dev/shm/vhostmd0"
VM_DIR = "/run/vhostmd/vms"
# The one domain of libvirt's test:///default.
VM_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
VM_DISK = f"{VM_DIR}/{VM_UUID}"
CONFIG = "/etc/vhostmd/rig.conf"

RIG_CONFIG = f"""<?xml version="1.0"?>
<vhostmd>
  <globals>
    <disk><name>host-metrics-disk</name><path>{SHARED}</path><size unit="k">256</size></disk>
    <vm_disks><path>{VM_DIR}</path><size unit="k">64</size></vm_disks>
    <update_period>{PERIOD}</update_period>
    <path>/usr/sbin:/usr/bin:/sbin:/bin</path>
    <transport>vbd</transport>
  </globals>
  <metrics>
    <builtin set="vhostmd"/>
    <builtin name="Time"/>
    <metric type="string" context="host"><name>Nanos</name><action>date +%s%N</action></metric>
  </metrics>
</vhostmd>
"""

DEFAULTS = f"""# From vhostmd's tests/test_systemd.py.
VHOSTMD_CONFIG={CONFIG}
VHOSTMD_URI=test:///default
VHOSTMD_PIDFILE=/run/vhostmd.pid
VHOSTMD_OPTIONS=""
"""

# What a guest's disk looks like to QEMU and to the guest: one line of JSON per
# file, for every line read on stdin. A document is told from the next by
# its digest; the header's busy flag and a valid signature say it is whole.
READER = r"""
import hashlib, json, os, struct, sys
fds = {p: os.open(p, os.O_RDONLY) for p in sys.argv[1:]}
print("open", flush=True)
for _line in sys.stdin:
    state = {}
    for path, fd in fds.items():
        st = os.fstat(fd)
        sig, busy, _sum, length = struct.unpack(">4sIII", os.pread(fd, 16, 0))
        body = os.pread(fd, length, 16) if sig == b"mvbd" and not busy else b""
        state[path] = {"ino": st.st_ino, "nlink": st.st_nlink, "valid": sig == b"mvbd",
                       "busy": busy, "digest": hashlib.sha256(body).hexdigest()}
    print(json.dumps(state), flush=True)
"""

# Whether a metrics disk holds a whole document now (no waiting): 0 if so.
CHECK_DISK = r"""
import os, struct, sys
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            sig, busy, _sum, length = struct.unpack(">4sIII", f.read(16))
    except (OSError, struct.error) as exc:
        sys.exit(f"{path}: {exc}")
    if sig != b"mvbd" or busy or not length:
        sys.exit(f"{path}: no document (signature {sig!r}, busy {busy}, length {length})")
print("documents on", " ".join(sys.argv[1:]))
"""

# A unit ordered the way libvirt starts guests (libvirt-guests, PVC's node
# daemon: after libvirtd.service). It records what a guest's QEMU would find.
FAKE_LIBVIRTD = """[Unit]
Description=Stands for libvirtd in vhostmd's systemd test
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
[Install]
WantedBy=multi-user.target
"""
FAKE_GUEST = """[Unit]
Description=Starts a guest as libvirt-guests would (vhostmd's systemd test)
After=libvirtd.service
Wants=libvirtd.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh /usr/local/lib/fake-guest
[Install]
WantedBy=multi-user.target
"""


FAKE_GUEST_SCRIPT = f"""#!/bin/sh
python3 /usr/local/lib/check-disk {SHARED} {VM_DISK} >/var/lib/fake-guest.result 2>&1
echo "status $?" >>/var/lib/fake-guest.result
"""


@dataclass
class Node:
    machine: Container
    version: str
    upgrade: list[Path]  # the same packages, a newer version

    def run(self, args: list[str] | str, **kw: object) -> str:
        return self.machine.run(args, **kw).stdout  # type: ignore[arg-type]

    def show(self, prop: str) -> str:
        return self.run(["systemctl", "show", "-P", prop, "vhostmd.service"]).strip()

    @property
    def main_pid(self) -> int:
        return int(self.show("MainPID"))

    def unit_processes(self) -> dict[int, str]:
        """Pid -> "starttime title" of every process in the unit's cgroup (inside the container)."""
        group = self.show("ControlGroup")
        # cgroup v2, or the hybrid and legacy layouts (the host's decides).
        procs = " ".join(f"/sys/fs/cgroup{d}{group}/cgroup.procs"
                         for d in ("", "/unified", "/systemd"))
        script = (f"for p in $(cat {procs} 2>/dev/null | sort -u); "
                  "do s=$(cut -d' ' -f22 /proc/$p/stat 2>/dev/null) && "
                  "echo \"$p $s $(tr '\\0' ' ' </proc/$p/cmdline)\"; done")
        found = {}
        for line in self.run(script).splitlines():
            pid, start, *title = line.split(" ", 2)
            found[int(pid)] = f"{start} {title[0].strip() if title else ''}"
        return found

    def still_running(self, processes: dict[int, str]) -> list[str]:
        """Those of ``processes`` (unit_processes) that still run: same pid, same start time."""
        script = " ".join(f"{pid}:{info.split()[0]}" for pid, info in processes.items())
        out = self.run(f"for e in {script}; do p=${{e%%:*}}; s=${{e#*:}}; "
                       "[ \"$(cut -d' ' -f22 /proc/$p/stat 2>/dev/null)\" = \"$s\" ] "
                       "&& [ \"$(cut -d' ' -f3 /proc/$p/stat)\" != Z ] && echo $p; done; true")
        return [processes[int(p)] for p in out.split()]

    def wait_active(self, other_than: int = 0, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while True:
            state, pid = self.show("ActiveState"), self.main_pid
            if state == "active" and pid and pid != other_than:
                return pid
            assert time.monotonic() < deadline, f"vhostmd.service: {state}, main pid {pid}"
            time.sleep(0.1)


    def settle(self, timeout: float = 60) -> int:
        """Wait for a running daemon with all its children and documents on both disks.

        Each test starts so, whatever the one before it left: a failure is
        then this test's own.
        """
        pid = self.wait_active(timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            documents = self.machine.run(["python3", "/usr/local/lib/check-disk", SHARED,
                                          VM_DISK], check=False).returncode == 0
            titles = " ".join(self.unit_processes().values())
            if documents and "disk-writer" in titles and "worker" in titles:
                return pid
            assert time.monotonic() < deadline, f"the daemon did not settle: {titles}"
            time.sleep(0.1)


class Reader:
    """A process inside the container that holds the metrics disks open, as QEMU does."""

    def __init__(self, node: Node, *paths: str) -> None:
        self.proc = node.machine.popen(["python3", "-c", READER, *paths])
        assert self.proc.stdout is not None and self.proc.stdin is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "open", f"reader: {line}{self.proc.stderr.read()}"  # type: ignore[union-attr]

    def look(self) -> dict[str, dict]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def wait_new(self, before: dict[str, dict], timeout: float) -> dict[str, dict]:
        """Until every file shows a whole document other than in ``before``."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.look()
            if all(s["valid"] and not s["busy"] and s["digest"] != before[p]["digest"]
                   for p, s in now.items()):
                return now
            assert time.monotonic() < deadline, f"no new document within {timeout} s: {now}"
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    why = systemd_rig.unavailable()
    if why is not None:
        pytest.skip(why)
    work = Path(tempfile.mkdtemp(prefix="vhostmd-systemd.", dir="/var/tmp"))
    try:
        version, debs = systemd_rig.build_packages(work / "build")
        upgrade = systemd_rig.bump_packages(debs, version, f"{version}+upgrade1", work / "upgrade")
        try:
            with systemd_rig.machine_lock(), systemd_rig.container(work) as machine:
                prepare_root(machine, debs)
                machine.boot()
                node = Node(machine, version, upgrade)
                # The package's postinst enables and starts the unit.
                node.run(["dpkg", "-i", "--force-confold", *(f"/var/tmp/{d.name}" for d in debs)],
                         timeout=180)
                node.wait_active()
                yield node
        except systemd_rig.RigUnavailable as exc:
            pytest.skip(str(exc))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare_root(machine: Container, debs: list[Path]) -> None:
    """Before the first boot: the packages to install, the test's configuration, the fake units."""
    for deb in debs:
        shutil.copy(deb, machine.file(f"/var/tmp/{deb.name}"))
    machine.file(CONFIG).parent.mkdir(parents=True, exist_ok=True)
    machine.file(CONFIG).write_text(RIG_CONFIG)
    # Kept on install (dpkg --force-confold): the test driver, the test's config.
    machine.file("/etc/default/vhostmd").write_text(DEFAULTS)
    machine.file("/usr/local/lib").mkdir(parents=True, exist_ok=True)
    machine.file("/usr/local/lib/check-disk").write_text(CHECK_DISK)
    machine.file("/usr/local/lib/fake-guest").write_text(FAKE_GUEST_SCRIPT)
    units = machine.file("/etc/systemd/system")
    (units / "libvirtd.service").write_text(FAKE_LIBVIRTD)
    (units / "fake-guest.service").write_text(FAKE_GUEST)
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    for unit in ("libvirtd.service", "fake-guest.service"):
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")


def test_start_returns_once_the_disks_hold_a_document(node: Node) -> None:
    node.run(["systemctl", "stop", "vhostmd"])
    node.run(["rm", "-f", SHARED, VM_DISK])
    # No pause between the two: "start" itself must have waited.
    out = node.run(f"systemctl start vhostmd && python3 /usr/local/lib/check-disk "
                   f"{SHARED} {VM_DISK}", check=False)
    assert "documents on" in out, out
    assert node.show("StatusText").startswith("cycle "), node.show("StatusText")
    assert node.show("Type") == "notify"


def test_every_process_is_titled_and_the_forkserver_preloaded(node: Node) -> None:
    node.settle()
    processes = node.unit_processes()
    titles = [info.split(" ", 1)[1] for info in processes.values()]
    for wanted in ("vhostmd: supervisor", "vhostmd: forkserver",
                   "vhostmd: worker", "vhostmd: disk-writer"):
        assert any(t.startswith(wanted) for t in titles), titles
    assert not [t for t in titles if "resource" in t], titles  # no resource tracker
    untitled = [t[:120] for t in titles if not t.startswith("vhostmd: ")]
    assert not untitled, f"processes of the daemon without a vhostmd: title: {untitled}"
    forkserver = next(pid for pid, info in processes.items()
                      if info.split(" ", 1)[1] == "vhostmd: forkserver")
    maps = node.run(["cat", f"/proc/{forkserver}/maps"])
    assert "libvirt" in maps, "the forkserver's preload did not run: no libvirt in its memory"


def test_restart_keeps_the_disks_under_a_reader(node: Node) -> None:
    node.settle()
    reader = Reader(node, SHARED, VM_DISK)
    try:
        before = reader.look()
        node.run(["systemctl", "restart", "vhostmd"])
        after = reader.wait_new(before, 2 * PERIOD + 2)
        for path in (SHARED, VM_DISK):
            assert after[path]["ino"] == before[path]["ino"], path
            assert after[path]["nlink"] == 1, f"{path} was deleted under the reader"
        # And it goes on: the next document too.
        reader.wait_new(after, 2 * PERIOD + 2)
        assert node.run(["ls", VM_DIR]).split() == [VM_UUID]
    finally:
        reader.close()


def test_kill_9_of_the_main_pid_restarts_and_leaves_nothing(node: Node) -> None:
    node.settle()
    old = node.unit_processes()
    pid = node.main_pid
    assert len(old) >= 5, old
    node.run(["kill", "-9", str(pid)])
    node.wait_active(other_than=pid, timeout=30)  # RestartSec=5
    left = node.still_running(old)
    assert not left, f"processes of the killed daemon are left: {left}"
    out = node.run(f"python3 /usr/local/lib/check-disk {SHARED} {VM_DISK}")
    assert "documents on" in out


def test_reload_with_a_broken_config_fails_and_the_daemon_runs_on(node: Node) -> None:
    node.settle()
    pid = node.main_pid
    good = node.machine.file(CONFIG).read_text()
    node.machine.file(CONFIG).write_text(good + "<broken")
    try:
        done = node.machine.run(["systemctl", "reload", "vhostmd"], check=False)
        assert done.returncode != 0, "systemctl reload with a broken config succeeded"
    finally:
        node.machine.file(CONFIG).write_text(good)
    # The same file by SIGHUP alone: the daemon rejects it and keeps its config.
    hup_with_a_broken_config(node, pid)
    assert node.show("ActiveState") == "active"
    assert node.main_pid == pid
    node.run(["systemctl", "reload", "vhostmd"])
    assert node.main_pid == pid


def hup_with_a_broken_config(node: Node, pid: int) -> None:
    """SIGHUP with a broken file (no ExecReload check): the daemon logs an error, runs on."""
    good = node.machine.file(CONFIG).read_text()

    def rejected() -> int:
        return node.run(["journalctl", "-u", "vhostmd", "-o", "cat"]).count("reload rejected")

    before = rejected()
    node.machine.file(CONFIG).write_text(good + "<broken")
    try:
        node.run(["kill", "-HUP", str(pid)])
        deadline = time.monotonic() + 10
        while rejected() == before:
            assert time.monotonic() < deadline, "no 'reload rejected' in the journal"
            time.sleep(0.1)
    finally:
        node.machine.file(CONFIG).write_text(good)


def test_the_journal_has_the_daemons_priorities(node: Node) -> None:
    hup_with_a_broken_config(node, node.settle())  # an error line
    entries = [json.loads(line) for line in node.run(
        ["journalctl", "-u", "vhostmd", "-o", "json", "--output-fields=PRIORITY,MESSAGE,_PID"]
    ).splitlines() if line.strip()]
    daemon = [e for e in entries if "vhostmd[" in str(e.get("MESSAGE", ""))]
    priorities = {e.get("PRIORITY") for e in daemon}
    assert {"6", "3"} <= priorities, priorities  # info ("starting"), error ("reload rejected")
    rejected = [e for e in daemon if "reload rejected" in str(e.get("MESSAGE"))]
    assert rejected and all(e["PRIORITY"] == "3" for e in rejected)
    assert not [e for e in daemon if str(e.get("MESSAGE", "")).startswith("<")]


def test_the_watchdog_restarts_a_hung_supervisor(node: Node) -> None:
    dropin = node.machine.file("/etc/systemd/system/vhostmd.service.d/watchdog.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nWatchdogSec=2\nTimeoutAbortSec=2\nRestartSec=1\n")
    try:
        node.run(["systemctl", "daemon-reload"])
        node.run(["systemctl", "restart", "vhostmd"])
        pid = node.settle()
        # Fed by the main loop: alive well past the watchdog's 2 s.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert node.main_pid == pid and node.show("ActiveState") == "active", \
                "the watchdog killed a daemon that runs"
            time.sleep(0.2)
        node.run(["kill", "-STOP", str(pid)])  # hung
        node.wait_active(other_than=pid, timeout=30)
        journal = node.run(["journalctl", "-u", "vhostmd", "-o", "cat"])
        assert "Watchdog timeout" in journal
    finally:
        dropin.unlink()
        node.run(["systemctl", "daemon-reload"])
        node.run(["systemctl", "restart", "vhostmd"])
        node.wait_active()


# The guest package's textfile timer, as docs/guest.md turns it on, reading this
# node's shared disk (in a guest it finds the disk among its block devices).
TEXTFILE = "/var/lib/prometheus/node-exporter/vhostmd-guest.prom"
TEXTFILE_TIMER = "vm-dump-metrics-textfile.timer"
TEXTFILE_SERVICE = "vm-dump-metrics-textfile.service"
TEXTFILE_DROPIN = f"/etc/systemd/system/{TEXTFILE_SERVICE}.d/rig.conf"
# The timer's period (the shipped OnUnitActiveSec=).
TEXTFILE_PERIOD = 5
# A document older than this (by its host Time metric) counts as not read: a few of
# the rig's 1 s update periods, so a stopped daemon shows within a timer period or two.
MAX_AGE = 3


def textfile_now(node: Node) -> Exposition | None:
    """The textfile as node_exporter would read it now, or None while there is none."""
    try:
        return parse(node.machine.file(TEXTFILE).read_text())
    except FileNotFoundError:
        return None


def await_textfile(node: Node, success: int, timeout: float) -> Exposition:
    """Until the timer's service has written a file with read_success ``success``."""
    deadline = time.monotonic() + timeout
    while True:
        got = textfile_now(node)
        if got is not None and got.samples.get(("vhostmd_guest_read_success", frozenset())) \
                == success:
            return got
        if time.monotonic() > deadline:
            journal = node.run(["journalctl", "-u", TEXTFILE_SERVICE, "-o", "cat", "-n", "15"])
            raise AssertionError(f"no {TEXTFILE} with vhostmd_guest_read_success {success} "
                                 f"within {timeout} s; now:\n{got.text if got else '(none)'}\n"
                                 f"journal of {TEXTFILE_SERVICE}:\n{journal}")
        time.sleep(0.2)


def host_series(exposition: Exposition) -> dict[str, float]:
    return {name: value for (name, _labels), value in exposition.samples.items()
            if name.startswith("vhostmd_host_")}


def test_the_guest_textfile_timer_follows_the_host(node: Node) -> None:
    """vm-dump-metrics' textfile timer: installed disabled, turned on by the one documented
    command, writes the host's metrics, then read_success 0 and nothing else once the host
    stops publishing. The unit's hardening must allow the read and the write."""
    node.settle()
    # Installed (by the module's dpkg -i) and never turned on.
    assert node.run(["systemctl", "is-enabled", TEXTFILE_TIMER], check=False).strip() \
        == "disabled"
    assert node.run(["systemctl", "is-active", TEXTFILE_TIMER], check=False).strip() \
        == "inactive"
    assert textfile_now(node) is None
    # The directory as Debian's prometheus-node-exporter ships it: /var/lib/prometheus
    # the prometheus user's, node-exporter/ in it root's, 0755.
    node.run("id prometheus >/dev/null 2>&1 || useradd --system --user-group --no-create-home "
             "--home-dir /var/lib/prometheus --shell /usr/sbin/nologin prometheus; "
             "install -d -m 0755 -o prometheus -g prometheus /var/lib/prometheus && "
             "install -d -m 0755 -o root -g root /var/lib/prometheus/node-exporter")
    dropin = node.machine.file(TEXTFILE_DROPIN)
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(f'[Service]\nEnvironment="OPTIONS=--max-age {MAX_AGE} -b '
                      f'--disk {SHARED}"\n')
    try:
        node.run(["systemctl", "daemon-reload"])
        node.run(["systemctl", "enable", "--now", TEXTFILE_TIMER])
        # The boot is long past OnBootSec=: the first run comes at once.
        running = await_textfile(node, 1, timeout=TEXTFILE_PERIOD + 10)
        assert running.labels_of("vhostmd_guest_read_info") == [
            {"transport": "vbd", "source": SHARED}]
        host = host_series(running)
        for series in ("vhostmd_host_num_cpus", "vhostmd_host_total_phy_mem_bytes",
                       "vhostmd_host_total_cpu_time_seconds_total"):
            assert host.get(series, 0) > 0, (series, running.text)
        read_at = running.value("vhostmd_guest_read_timestamp_seconds")
        assert 0 <= read_at - host["vhostmd_host_time_seconds"] <= MAX_AGE
        info = node.machine.file(TEXTFILE).stat()
        assert (info.st_uid, info.st_mode & 0o777) == (0, 0o644)
        assert os.listdir(node.machine.file(os.path.dirname(TEXTFILE))) == [
            os.path.basename(TEXTFILE)], "a temporary file is left"

        # The host stops publishing: the disk keeps its last document, which ages.
        node.run(["systemctl", "stop", "vhostmd"])
        stopped = await_textfile(node, 0, timeout=MAX_AGE + 2 * TEXTFILE_PERIOD + 10)
        assert not host_series(stopped), stopped.text
        assert stopped.labels_of("vhostmd_guest_read_info") == []
        assert any("no longer publishes" in line for line in stopped.comments), stopped.comments
        # That run succeeded: the timer goes on.
        assert node.run(["systemctl", "show", "-P", "Result", TEXTFILE_SERVICE]).strip() \
            == "success"
        assert node.run(["systemctl", "is-active", TEXTFILE_TIMER]).strip() == "active"
    finally:
        node.run(["systemctl", "disable", "--now", TEXTFILE_TIMER], check=False)
        dropin.unlink(missing_ok=True)
        node.run(["systemctl", "daemon-reload"])
        node.machine.file(TEXTFILE).unlink(missing_ok=True)
        node.run(["systemctl", "start", "vhostmd"])
    node.settle()


def test_upgrade_keeps_the_disks_and_leaves_no_old_process(node: Node) -> None:
    node.settle()
    for deb in node.upgrade:
        shutil.copy(deb, node.machine.file(f"/var/tmp/{deb.name}"))
    reader = Reader(node, SHARED, VM_DISK)
    try:
        old = node.unit_processes()
        before = reader.look()
        node.run(["dpkg", "-i", "--force-confold",
                  *(f"/var/tmp/{d.name}" for d in node.upgrade)], timeout=180)
        new_version = node.upgrade[0].name.split("_")[1]
        assert node.run(["/usr/sbin/vhostmd", "--version"]).split() == ["vhostmd", new_version]
        pid = node.wait_active()
        after = reader.wait_new(before, 2 * PERIOD + 2)
        for path in (SHARED, VM_DISK):
            assert after[path]["ino"] == before[path]["ino"], path
            assert after[path]["nlink"] == 1, f"{path} was deleted under the reader"
        reader.wait_new(after, 2 * PERIOD + 2)
        assert not node.still_running(old), "processes of the old version are left"
        journal = node.run(["journalctl", "-u", "vhostmd", "-o", "cat", f"_PID={pid}"])
        assert f"vhostmd {new_version} starting" in journal
    finally:
        reader.close()


def test_at_boot_the_disks_exist_before_libvirt_starts_guests(node: Node) -> None:
    result = node.machine.file("/var/lib/fake-guest.result")
    result.unlink(missing_ok=True)
    node.machine.reboot()
    node.wait_active()
    text = result.read_text() if result.exists() else "(the fake guest unit did not run)"
    assert "status 0" in text, f"a guest started after libvirtd.service found: {text}"
    assert "documents on" in text
    assert os.path.getsize(result) > 0
