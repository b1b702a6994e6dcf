"""The virtio process against a real daemon: the test plays QEMU and the guest.

For each libvirt test-driver domain the test creates the channel directory and
the listening ``org.github.vhostmd.1`` socket (as QEMU would), accepts the
daemon's connection and speaks the guest's side of the protocol on it.
Every wait is a bounded poll on a condition.

``FakeQemu``, ``Rig``/``running_rig`` and ``check_own_metrics`` also serve
test_virtio_faults.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from vhostmd.protocol import CHANNEL_NAME, INVALID_RESPONSE, REQUEST, RESPONSE_END
from vhostmd.virtio.channel import RATE_BURST, RATE_PER_SECOND
from vhostmd.virtio.manager import UNIX_PATH_MAX

import nodes
from daemon_harness import VHOSTMD, Daemon, config_xml, metric_xml, virtio_xml, wait_for

VM_DUMP_METRICS = str(Path(VHOSTMD).parent / "vm-dump-metrics")

HOST_VALUE = "host-says-hello"
# VM 5 of the main rig answers with a ~60 KB metric: the "never reads" guest
# fills its socket and its output queue within a few requests.
BIG_VM = 5
BIG_VALUE_LEN = 60000
METRICS = "\n".join([
    metric_xml("HostGreeting", f"echo {HOST_VALUE}"),
    metric_xml("VmId", "echo VMID", mtype="uint32", context="vm"),
    metric_xml("Padding", f"test VMID -eq {BIG_VM} &amp;&amp; printf '%0{BIG_VALUE_LEN}d' 0 "
               "|| echo small", context="vm"),
])
UPDATE_PERIOD = 1
EXPIRATION_TIME = 3


def unix_address(path: Path) -> tuple[str, int | None]:
    """An address for ``path``; a long one goes through an O_PATH descriptor of its directory."""
    if len(os.fsencode(str(path))) < UNIX_PATH_MAX:
        return str(path), None
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{dir_fd}/{path.name}", dir_fd


class FakeQemu:
    """Listens where QEMU would for one VM, accepts the daemon and plays the guest."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / CHANNEL_NAME
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address, dir_fd = unix_address(self.path)
        try:
            self.listener.bind(address)
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        self.listener.listen(4)
        self.conn: socket.socket | None = None
        self.pending = b""

    def connection_waiting(self, timeout: float) -> bool:
        readable, _, _ = select.select([self.listener], [], [], timeout)
        return bool(readable)

    def accept(self, timeout: float = 10.0) -> socket.socket:
        if self.conn is None:
            assert self.connection_waiting(timeout), f"the daemon never connected to {self.path}"
            self.conn, _ = self.listener.accept()
        return self.conn

    def send(self, data: bytes) -> None:
        self.accept().sendall(data)

    def readable(self, timeout: float) -> bool:
        readable, _, _ = select.select([self.accept()], [], [], timeout)
        return bool(readable)

    def read_response(self, timeout: float = 5.0) -> bytes:
        """The next whole response (up to and including its blank line)."""
        conn = self.accept()
        deadline = time.monotonic() + timeout
        while RESPONSE_END not in self.pending:
            left = deadline - time.monotonic()
            assert left > 0 and self.readable(left), f"no complete response; got {self.pending!r}"
            chunk = conn.recv(65536)
            assert chunk, "the daemon hung up"
            self.pending += chunk
        end = self.pending.index(RESPONSE_END) + len(RESPONSE_END)
        response, self.pending = self.pending[:end], self.pending[end:]
        return response

    def request(self, data: bytes = REQUEST) -> bytes:
        self.send(data)
        return self.read_response()

    def hung_up(self, timeout: float) -> bool:
        """True if the daemon closes the connection within ``timeout`` (data is discarded)."""
        conn = self.accept()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.readable(left):
                try:
                    if not conn.recv(65536):
                        return True
                except ConnectionResetError:
                    return True
        return False

    def accept_again(self, timeout: float = 10.0) -> socket.socket:
        """Drop the current connection (the daemon's end is gone) and accept the next one."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.pending = b""
        return self.accept(timeout)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def short_tmpdir() -> Path:
    # Unix socket paths must stay short: pytest's tmp_path can be long.
    return Path(tempfile.mkdtemp(prefix="vh"))


def metric_blocks(response: bytes) -> list[ET.Element]:
    assert response.startswith(b"<metrics>\n") and response.endswith(b"</metrics>\n\n")
    assert response.index(RESPONSE_END) == len(response) - 2, "blank line before the end"
    return list(ET.fromstring(response.decode()))


def check_own_metrics(response: bytes, vm_id: int) -> None:
    """Host metrics plus this VM's metrics, nothing of any other VM."""
    metrics = metric_blocks(response)
    host = {m.findtext("name"): m.findtext("value") for m in metrics if m.get("context") == "host"}
    assert host == {"HostGreeting": HOST_VALUE}
    vm = [m for m in metrics if m.get("context") == "vm"]
    assert {m.get("id") for m in vm} == {str(vm_id)}
    assert {m.findtext("name"): m.findtext("value") for m in vm}["VmId"] == str(vm_id)


def stale_socket(directory: Path) -> None:
    """A socket file nobody listens on (what a crashed QEMU leaves behind)."""
    directory.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(directory / CHANNEL_NAME))


class Rig:
    """A test-driver node, a channel directory with a FakeQemu per channel, and a
    daemon (not started yet) serving them at update_period 1."""

    def __init__(self, root: Path, names: Sequence[str], dirs: dict[int, str], *,
                 channels: Path | None = None, stale_dirs: Sequence[str] = (),
                 max_channels: int = 16, transports: tuple[str, ...] = ("virtio",)) -> None:
        self.root = root
        self.channels = channels or root / "channels"
        self.channels.mkdir(parents=True, exist_ok=True)
        self.fakes: dict[int, FakeQemu] = {}
        for vm_id, directory in dirs.items():
            self.fakes[vm_id] = FakeQemu(self.channels / directory)
        for directory in stale_dirs:
            stale_socket(self.channels / directory)
        self.node = root / "node.xml"
        uri, _ = nodes.write_node(self.node, 0, names=names)
        self.disk = root / "vhostmd0"  # used with the vbd transport only
        config = config_xml(self.disk, METRICS, period=UPDATE_PERIOD, transports=transports,
                            globals_extra=virtio_xml(self.channels, max_channels=max_channels,
                                                     expiration_time=EXPIRATION_TIME))
        self.daemon = Daemon(root, config, uri=uri)

    def fake(self, vm_id: int) -> FakeQemu:
        return self.fakes[vm_id]

    def virtio_title(self) -> str | None:
        return self.daemon.title("vhostmd: virtio")

    def close_fakes(self) -> None:
        for fake in self.fakes.values():
            fake.close()


@contextlib.contextmanager
def running_rig(names: Sequence[str], dirs: dict[int, str], *, root: Path | None = None,
                channels: Path | None = None, stale_dirs: Sequence[str] = (),
                max_channels: int = 16,
                transports: tuple[str, ...] = ("virtio",)) -> Iterator[Rig]:
    """A started Rig; on the way out the daemon is stopped (with any child left),
    the fake QEMUs closed and the root removed (unless the caller gave it)."""
    workdir = root or short_tmpdir()
    rig: Rig | None = None
    try:
        rig = Rig(workdir, names, dirs, channels=channels, stale_dirs=stale_dirs,
                  max_channels=max_channels, transports=transports)
        with rig.daemon:
            yield rig
    finally:
        if rig is not None:
            rig.close_fakes()
        if root is None:
            shutil.rmtree(workdir, ignore_errors=True)


# -- the main rig: one daemon for the module, its channels fresh for each test ----
#
# Starting a daemon per test would cost seconds each, so the tests share one;
# what could carry over from one test to the next is kept apart instead:
# - a channel a test leaves a state in (rate-limit tokens, a guest that never
#   reads, a replaced socket) belongs to that test's VM alone;
# - the ``rig`` fixture fails the test that leaves unread bytes on a channel,
#   after draining them, so the next test starts on a clean channel;
# - nothing asserts on what an earlier test may have added (the socat test
#   removes its channel again).
# Any one test, or any order of them, runs alone: ``pytest tests/test_virtio.py::NAME``.

MAIN_NAMES = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
MAIN_DIRS = {
    1: "1-alpha",
    2: "domain-2-beta",  # libvirt before 2024
    3: "3-gamma",
    4: "4-delta",  # replaced by test_socket_that_disappears_comes_back
    5: "5-epsilon",  # test_guest_that_never_reads_is_bounded's alone
    6: "6-ze",  # libvirt truncates long names: matched by id only
    8: "8-theta",  # test_rate_limit_delays_a_looping_guest's alone
}
SOCAT_VM = 7
RATE_VM = 8
GHOST_VM = 99  # no running domain has this id
GHOST_DIR = "99-ghost"
STALE_DIR = "domain-3-gamma"  # a stale socket next to VM 3's live one


@pytest.fixture(scope="module")
def main_rig() -> Iterator[Rig]:
    with running_rig(MAIN_NAMES, {**MAIN_DIRS, GHOST_VM: GHOST_DIR},
                     stale_dirs=[STALE_DIR]) as main:
        yield main


@pytest.fixture
def rig(main_rig: Rig) -> Iterator[Rig]:
    yield main_rig
    left = {}
    for vm_id, fake in main_rig.fakes.items():
        if fake.conn is None:
            continue
        unread = fake.pending
        fake.pending = b""
        while fake.readable(0.05):
            chunk = fake.conn.recv(1 << 20)
            if not chunk:
                break
            unread += chunk
        if unread:
            left[vm_id] = len(unread)
    assert not left, f"unread bytes left on the channels (VM id: bytes): {left}"


@pytest.mark.parametrize("vm_id", [1, 2, 6])
def test_each_guest_gets_host_and_own_metrics(rig: Rig, vm_id: int) -> None:
    check_own_metrics(rig.fake(vm_id).request(), vm_id)


def test_request_one_byte_at_a_time(rig: Rig) -> None:
    fake = rig.fake(1)
    fake.request()  # connected and served before the fragments start
    for byte in REQUEST[:-1]:
        fake.send(bytes([byte]))
    assert not fake.readable(0.3), "answered a partial request"
    fake.send(REQUEST[-1:])
    check_own_metrics(fake.read_response(), 1)


def test_crlf_request(rig: Rig) -> None:
    check_own_metrics(rig.fake(1).request(b"GET /metrics/XML\r\n\r\n"), 1)


@pytest.mark.parametrize("garbage", [b"hello\n\n", b"GET /metrics/JSON\n\n", b"\n\n",
                                     b"\x00\xff\x1b[2J;reboot\r\n\r\n"])
def test_garbage_gets_invalid_and_channel_stays_usable(rig: Rig, garbage: bytes) -> None:
    fake = rig.fake(2)
    assert fake.request(garbage) == INVALID_RESPONSE
    check_own_metrics(fake.request(), 2)


def test_600_byte_request_is_invalid_once(rig: Rig) -> None:
    fake = rig.fake(6)
    fake.request()
    fake.send(b"GET /metrics/XML" + b"x" * 582 + b"\n\n")
    assert fake.read_response() == INVALID_RESPONSE
    # The rest of the oversized request is skipped, not answered a second time.
    response = fake.request()
    check_own_metrics(response, 6)


@pytest.mark.parametrize("rest", [b"z" * 100 + b"\r\n\r\n", b"z" * 1500 + b"\n\n", b"\r\n"])
def test_request_filling_the_buffer_is_invalid(rig: Rig, rest: bytes) -> None:
    fake = rig.fake(6)
    fake.send(b"y" * 510 + b"\r\n")
    assert fake.read_response() == INVALID_RESPONSE
    fake.send(rest)  # the end of that request (its blank line may straddle two reads): skipped
    check_own_metrics(fake.request(), 6)


def test_stale_directory_does_not_hide_the_live_one(rig: Rig) -> None:
    check_own_metrics(rig.fake(3).request(), 3)


def test_rate_limit_delays_a_looping_guest(rig: Rig) -> None:
    fake = rig.fake(RATE_VM)
    check_own_metrics(fake.request(), RATE_VM)
    extra = 5
    count = RATE_BURST + extra
    started = time.monotonic()
    fake.send(REQUEST * count)  # a guest looping on requests as fast as it can
    for _ in range(count):
        check_own_metrics(fake.read_response(timeout=10), RATE_VM)
    took = time.monotonic() - started
    # The burst is spent (one token went on the first request): the rest waits for refills.
    assert took >= (extra / RATE_PER_SECOND) * 0.8, f"{count} requests answered in {took:.2f} s"
    # Meanwhile another guest is served at once.
    check_own_metrics(rig.fake(1).request(), 1)


def test_guest_that_never_reads_is_bounded(rig: Rig) -> None:
    daemon = rig.daemon
    fake = rig.fake(BIG_VM)
    first = fake.request()
    assert len(first) > BIG_VALUE_LEN
    check_own_metrics(first, BIG_VM)
    # Never read: the socket buffers fill, then the daemon's queue for this
    # channel (OUTPUT_LIMIT holds one of these responses), then responses are dropped.
    fake.send(REQUEST * RATE_BURST)
    warning = "VM 5 ('epsilon') does not read its channel"
    daemon.wait_log(warning)
    check_own_metrics(rig.fake(1).request(), 1)  # others are not held up
    # Now read: only whole responses arrive (dropped ones are dropped whole).
    received = b""
    conn = fake.accept()
    while fake.readable(0.5):
        chunk = conn.recv(1 << 20)
        assert chunk
        received += chunk
    responses = received.split(RESPONSE_END)
    assert responses.pop() == b""
    for response in responses:
        check_own_metrics(response + RESPONSE_END, BIG_VM)
    again = daemon.wait_log_match(r"VM 5 \('epsilon'\) reads its channel again "
                                  r"\((\d+) responses were dropped\)")
    dropped = int(again.group(1))
    assert dropped >= 2 and len(responses) + dropped == RATE_BURST
    assert daemon.log().count(warning) == 1  # logged once, not per dropped response
    check_own_metrics(fake.request(), BIG_VM)


def test_socket_that_disappears_comes_back(rig: Rig) -> None:
    fake = rig.fake(4)
    check_own_metrics(fake.request(), 4)
    directory = fake.path.parent
    fake.close()
    rig.daemon.wait_log("channel of VM 4 ('delta') hung up; forgotten")
    again = FakeQemu(directory)
    rig.fakes[4] = again
    check_own_metrics(again.request(), 4)


def test_unknown_id_is_never_served(rig: Rig) -> None:
    rig.fake(1).request()  # the daemon knows its VMs and has scanned at least once
    assert not rig.fake(GHOST_VM).connection_waiting(2.5), \
        "connected to a channel of no running VM"


def test_title_counts_connected_known_max(rig: Rig) -> None:
    for vm_id in MAIN_DIRS:
        rig.fake(vm_id).accept()
    # Every channel of a running VM (the ghost is not one) connected, of 16 allowed.
    every = len(MAIN_DIRS)
    wait_for(lambda: rig.virtio_title() == f"vhostmd: virtio {every}/{every}/16 channels",
             5, "the virtio title")


def test_socat_pty_with_guest_client(rig: Rig, tmp_path: Path) -> None:
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed")
    directory = rig.channels / f"{SOCAT_VM}-eta"
    directory.mkdir()
    pty = tmp_path / "vport"
    bridge = subprocess.Popen(
        ["socat", f"PTY,link={pty},raw,echo=0", f"UNIX-LISTEN:{directory / CHANNEL_NAME}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: (directory / CHANNEL_NAME).exists() and pty.exists(), 5, "socat")
        # The daemon connects at its next scan; ask until the guest client gets an answer.
        def ask() -> bytes | None:
            result = subprocess.run([VM_DUMP_METRICS, "--virtio", "--port", str(pty),
                                     "--timeout", "2"], capture_output=True, timeout=10)
            return result.stdout if result.returncode == 0 else None

        document = wait_for(ask, 15, "vm-dump-metrics over the socat pty", interval=0.2)
        check_own_metrics(document.rstrip(b"\n") + RESPONSE_END, SOCAT_VM)
    finally:
        bridge.terminate()
        bridge.wait(5)
        shutil.rmtree(directory, ignore_errors=True)  # the rig as it was for the next test
    known = rf"vhostmd: virtio \d+/{len(MAIN_DIRS)}/16 channels"
    wait_for(lambda: re.fullmatch(known, rig.virtio_title() or ""), 10,
             "the socat channel forgotten")


# -- rigs of their own ---------------------------------------------------------


def test_max_channels_plus_one_is_refused() -> None:
    names = ["alpha", "beta", "gamma"]
    dirs = {vm_id: f"{vm_id}-{name}" for vm_id, name in enumerate(names, start=1)}
    with running_rig(names, dirs, max_channels=2) as rig:
        check_own_metrics(rig.fake(1).request(), 1)
        check_own_metrics(rig.fake(2).request(), 2)
        refusal = "max_channels (2) reached: refusing the channel of VM 3 ('gamma')"
        rig.daemon.wait_log(refusal)
        wait_for(lambda: rig.virtio_title() == "vhostmd: virtio 2/3/2 channels", 5, "title")
        assert not rig.fake(3).connection_waiting(1.5)
        assert rig.daemon.log().count(refusal) == 1  # once, not every scan
        # Room frees up when a channel goes away: the refused VM gets it.
        rig.fake(1).close()
        check_own_metrics(rig.fake(3).request(), 3)
        check_own_metrics(rig.fake(2).request(), 2)


def test_channel_expires_after_vm_leaves_libvirt() -> None:
    with running_rig(["stays", "leaves"], {1: "1-stays", 2: "2-leaves"}) as rig:
        check_own_metrics(rig.fake(1).request(), 1)
        check_own_metrics(rig.fake(2).request(), 2)
        # VM 2 leaves: the node no longer has it, and the workers' libvirt
        # connections (the test driver keeps its state per connection) are
        # renewed by killing the workers, which the supervisor replaces.
        nodes.write_node(rig.node, 0, names=["stays"])
        for pid, title in rig.daemon.titles().items():
            if title.startswith("vhostmd: worker"):
                os.kill(pid, signal.SIGKILL)
        assert rig.fake(2).hung_up(10), "the channel of the VM that left was not closed"
        rig.daemon.wait_log("channel of VM 2 ('leaves') no metrics update for 3 s; closed")
        assert not rig.fake(2).connection_waiting(2.5), "reconnected to a VM that is gone"
        check_own_metrics(rig.fake(1).request(), 1)


def test_long_socket_path(tmp_path: Path) -> None:
    channels = tmp_path / ("c" * max(1, 120 - len(str(tmp_path))))
    with running_rig(["alpha"], {1: "1-alpha"}, root=tmp_path, channels=channels) as rig:
        assert len(os.fsencode(str(rig.fake(1).path))) >= UNIX_PATH_MAX
        check_own_metrics(rig.fake(1).request(), 1)


def test_vm_without_metrics_of_its_own_gets_none_not_not_yet() -> None:
    """"Not available yet" is for before the first cycle only (docs/formats.md, section 3.3)."""
    from vhostmd.protocol import NOT_YET_HOST, NOT_YET_VM, build_response
    from vhostmd.virtio.manager import ChannelManager

    manager = ChannelManager((), 4, 15.0)
    assert manager.response_for(7) == build_response(None, None)
    host = b"  <metric type='uint32' context='host'>\n    <name>A</name>\n" \
           b"    <value>1</value>\n  </metric>\n"
    manager.update_metrics(host, {}, ((7, "seven"),), 0.0)
    response = manager.response_for(7)
    assert NOT_YET_VM not in response and NOT_YET_HOST not in response
    assert response == b"<metrics>\n" + host + b"</metrics>\n\n"


def test_a_directory_with_the_id_but_another_name_is_not_served() -> None:
    # Another libvirt (a test driver, a second hypervisor) may have a domain
    # with the same id: its channel directory names another VM.
    with running_rig(["alpha", "beta"], {1: "1-alpha", 2: "2-intruder"}) as rig:
        check_own_metrics(rig.fake(1).request(), 1)
        assert not rig.fake(2).connection_waiting(2.5), "served a directory of another VM"
