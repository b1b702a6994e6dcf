"""What systemd and guests see across a daemon's start, restart and watchdog, without systemd.

The notification protocol is checked against a real datagram socket (as
systemd binds it, in the abstract namespace or as a path) and a real
daemon; the unit itself runs under a real systemd in tests/test_systemd.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from pathlib import Path

import psutil

from vhostmd import mdisk
from vhostmd.disk.handle import open_disk
from vhostmd.disk.mapped import DiskTooSmall, MetricsDisk
from vhostmd.disk.vmdir import open_vm_dir, open_vm_disk
from vhostmd.disk.vmwriter import VmDisk
from vhostmd.supervisor.notify import Notifier, watchdog_interval

from daemon_harness import Daemon, config_xml, disk_metrics, header, metric_xml


class NotifySocket:
    """The socket systemd gives a Type=notify service, and what arrives on it."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"vhostmd-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.address = f"@{name}"
        else:
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.settimeout(0.2)

    def receive(self, timeout: float) -> list[str] | None:
        """The next message's fields (one datagram), or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                continue
        return None

    def close(self) -> None:
        self.sock.close()


def test_notifier_speaks_to_path_and_abstract_sockets(tmp_path: Path) -> None:
    for listener in (NotifySocket(), NotifySocket(tmp_path / "notify")):
        environ = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "4000000",
                   "WATCHDOG_PID": str(os.getpid()), "OTHER": "kept"}
        notifier = Notifier(environ)
        # Taken out of the environment: children and actions never see them.
        assert environ == {"OTHER": "kept"}
        notifier.notify_ready("cycle 1")
        notifier.notify_ready("cycle 2")  # READY=1 once
        notifier.notify_status("cycle 3")
        notifier.ping_watchdog()
        notifier.ping_watchdog()  # within half the timeout: not sent again
        notifier.notify_stopping()
        received = []
        while (message := listener.receive(0.5)) is not None:
            received.append(message)
        assert received == [["READY=1", "STATUS=cycle 1"], ["STATUS=cycle 3"], ["WATCHDOG=1"],
                            ["STOPPING=1", "STATUS=stopping"]]
        notifier.close()
        listener.close()


def test_watchdog_interval() -> None:
    me = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, me) == 7.5
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(me)}, me) == 7.5
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, me) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, me) is None
    assert watchdog_interval({}, me) is None
    # Outside systemd: nothing to do, nothing fails.
    quiet = Notifier({})
    assert not quiet.active
    quiet.notify_ready("x")
    quiet.ping_watchdog()


def test_daemon_is_ready_once_the_disk_holds_a_document(tmp_path: Path) -> None:
    """READY=1 only once the disk exists with a document; STATUS= each cycle; the watchdog fed."""
    listener = NotifySocket()
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, metric_xml("Notify", "echo ${NOTIFY_SOCKET:-unset}")
                      + '<builtin name="Time"/>')
    daemon = Daemon(tmp_path, conf, env={"NOTIFY_SOCKET": listener.address,
                                         "WATCHDOG_USEC": "1000000"})
    try:
        with daemon:
            messages: list[list[str]] = []
            ready_at: mdisk.Header | None = None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                message = listener.receive(deadline - time.monotonic())
                assert message is not None, f"no READY=1 within 20 s: {messages}\n{daemon.log()}"
                messages.append(message)
                if "READY=1" in message:
                    ready_at = header(disk)  # the disk as libvirt would find it now
                    break
            assert ready_at is not None
            assert ready_at.signature == mdisk.SIGNATURE and ready_at.busy == 0
            assert ready_at.length > 0
            status = [f for f in messages[-1] if f.startswith("STATUS=")]
            assert status and "cycle" in status[0], messages
            # The watchdog every quarter second (WATCHDOG_USEC 1 s), STATUS= as cycles end.
            later: list[list[str]] = []
            until = time.monotonic() + 3
            while time.monotonic() < until:
                if (message := listener.receive(until - time.monotonic())) is not None:
                    later.append(message)
            pings = sum(1 for m in later if m == ["WATCHDOG=1"])
            assert pings >= 4, later
            assert any(f.startswith("STATUS=cycle") for m in later for f in m), later
            # Neither children nor their actions inherit systemd's variables.
            assert {m.name: m.value for m in disk_metrics(disk)}["Notify"] == "unset"
            for child in psutil.Process(daemon.pid).children(recursive=True):
                environ = Path(f"/proc/{child.pid}/environ").read_bytes()
                assert b"NOTIFY_SOCKET=" not in environ, child.cmdline()
                assert b"WATCHDOG_USEC=" not in environ, child.cmdline()
            assert daemon.stop() == 0
            stopping = []
            while (message := listener.receive(0.5)) is not None:
                stopping.append(message)
            assert ["STOPPING=1", "STATUS=stopping"] in stopping
    finally:
        listener.close()


def test_a_new_writer_keeps_the_previous_document_until_its_first(tmp_path: Path) -> None:
    """A restart or upgrade: guests go on reading the last document, never a busy disk."""
    path = tmp_path / "vhostmd0"
    document = b"<metrics><metric type='string' context='host'><name>A</name>" \
               b"<value>1</value></metric></metrics>\n"
    handle = open_disk(str(path), 64 * 1024)
    first = MetricsDisk(handle)
    first.write(document)
    first.close()
    inode = os.stat(path).st_ino
    second = MetricsDisk(handle)  # what a new daemon's writer does at start
    head = header(path)
    assert (head.busy, head.length) == (0, len(document))
    assert path.read_bytes()[mdisk.HEADER_SIZE:mdisk.HEADER_SIZE + len(document)] == document
    assert os.stat(path).st_ino == inode
    # A document that does not fit keeps the one there (nothing to replace it with).
    with contextlib.suppress(DiskTooSmall):
        second.write(b"x" * 70000)
    assert header(path).length == len(document)
    second.close()
    # A corrupt or half-written one is not kept: the disk says busy until the first write.
    with open(path, "r+b") as raw:
        raw.seek(mdisk.HEADER_SIZE)
        raw.write(b"X")
    third = MetricsDisk(handle)
    assert header(path).busy == 1
    third.close()
    handle.close()


def test_a_per_vm_disk_keeps_its_document_for_a_new_writer(tmp_path: Path) -> None:
    vm_dir = open_vm_dir(str(tmp_path / "vms"), 64 * 1024)
    name = "6695eb01-f6a4-8304-79aa-97f2502e193f"
    document = b"<metrics></metrics>\n"
    for _round in range(2):
        handle = open_vm_disk(vm_dir, name)
        disk = VmDisk(handle)
        os.close(handle.fd)
        head = header(tmp_path / "vms" / name)
        if _round == 0:
            disk.write(document)
        else:
            assert (head.busy, head.length) == (0, len(document))
        disk.close()
    vm_dir.close()



ROOT = Path(__file__).resolve().parent.parent


def test_unit_and_init_script_start_before_libvirt_without_requiring_it() -> None:
    """The disk before any guest: both start files are ordered before libvirt's daemons.

    The order itself is proven under systemd at boot (tests/test_systemd.py);
    sysvinit's insserv reads the LSB header, checked here.
    """
    unit = (ROOT / "etc" / "vhostmd.service").read_text()
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings.setdefault(key.strip(), []).extend(value.split())
    assert {"libvirtd.service", "virtqemud.service"} <= set(settings.get("Before", []))
    assert not {"libvirtd.service", "virtqemud.service"} & set(settings.get("After", []))
    for strong in ("Requires", "Requisite", "BindsTo", "Wants"):
        assert not [u for u in settings.get(strong, []) if "libvirt" in u or "virtq" in u]
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert settings["RuntimeDirectoryPreserve"] == ["yes"]
    assert "WatchdogSec" in settings

    header = (ROOT / "etc" / "vhostmd.init").read_text().split("### END INIT INFO")[0]
    fields = {}
    for line in header.splitlines():
        key, sep, value = line.lstrip("# ").partition(":")
        if sep:
            fields[key.strip()] = value.split()
    assert {"libvirtd", "virtqemud"} <= set(fields.get("X-Start-Before", []))
    for after in ("Required-Start", "Should-Start"):
        assert not [f for f in fields.get(after, []) if "libvirt" in f or "virtq" in f]
