"""The virtio transport against a fake host: a unix socket bridged to a pty by socat.

The test plays QEMU's host side on the socket; the guest client opens the pty
as if it were /dev/virtio-ports/org.github.vhostmd.1.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostmd.document import Metric, render_fragment
from vhostmd.guest import VirtioError, VirtioTimeout, read_virtio
from vhostmd.protocol import INVALID_RESPONSE, REQUEST, build_response

CLI_SCRIPT = Path(sys.executable).parent / "vm-dump-metrics"
CLI = [str(CLI_SCRIPT)] if CLI_SCRIPT.exists() else [sys.executable, "-m", "vhostmd.guest"]
UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
HOST_FRAGMENT = render_fragment(
    [
        Metric("NumCPUs", "uint32", "host", "16"),
        Metric("HostName", "string", "host", "node-1 & <co>"),
    ]
).encode()
VM_FRAGMENT = render_fragment(
    [Metric("TotalCPUTime", "real64", "vm", "42.5", "s", 7, UUID)]
).encode()
RESPONSE = build_response(HOST_FRAGMENT, VM_FRAGMENT)
WAIT = 5.0  # bound on every wait of the fake host


class FakeHost:
    """The host end of one virtio channel, on the accepted socat connection."""

    def __init__(self, conn: socket.socket, port: Path) -> None:
        self.conn = conn
        self.port = port

    def receive_request(self) -> bytes:
        received = b""
        while b"\n\n" not in received:
            chunk = self.conn.recv(4096)  # bounded by the socket timeout
            if not chunk:
                break
            received += chunk
        return received

    def answer(self, *chunks: bytes) -> threading.Thread:
        """Answer the next request in the background (for in-process clients)."""

        def serve() -> None:
            if self.receive_request() == REQUEST:
                for chunk in chunks:
                    self.conn.sendall(chunk)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        return thread


@pytest.fixture
def host() -> Iterator[FakeHost]:
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed (apt-get install socat)")
    # A short directory: unix socket paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="vhm-virtio-") as directory:
        sock_path = Path(directory) / "host.sock"
        port = Path(directory) / "port"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.settimeout(WAIT)
        listener.bind(str(sock_path))
        listener.listen(1)
        socat = subprocess.Popen(
            ["socat", f"PTY,link={port},raw,echo=0", f"UNIX-CONNECT:{sock_path}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # socat creates the pty (and its link) before it connects: once
            # accepted, the port is there.
            conn, _ = listener.accept()
            conn.settimeout(WAIT)
            yield FakeHost(conn, port)
            conn.close()
        finally:
            listener.close()
            socat.terminate()
            try:
                socat.wait(WAIT)
            except subprocess.TimeoutExpired:
                socat.kill()
                socat.wait(WAIT)


def start_cli(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(cli: subprocess.Popen[bytes]) -> tuple[int, bytes, bytes]:
    stdout, stderr = cli.communicate(timeout=20)
    return cli.returncode, stdout, stderr


def assert_one_line_error(status: int, stdout: bytes, stderr: bytes) -> str:
    assert status == 1 and stdout == b""
    text = stderr.decode()
    assert text.startswith("vm-dump-metrics: ") and text.count("\n") == 1, text
    return text


def test_cli_prints_the_response_byte_for_byte(host: FakeHost) -> None:
    cli = start_cli("-i", "--port", str(host.port))
    assert host.receive_request() == REQUEST
    host.conn.sendall(RESPONSE)
    assert finish(cli) == (0, RESPONSE, b"")


def test_cli_json(host: FakeHost) -> None:
    cli = start_cli("--port", str(host.port), "-i", "--format", "json")
    assert host.receive_request() == REQUEST
    host.conn.sendall(RESPONSE)
    status, stdout, stderr = finish(cli)
    assert status == 0, stderr
    assert [(o["name"], o["value"]) for o in json.loads(stdout)] == [
        ("NumCPUs", 16),
        ("HostName", "node-1 & <co>"),
        ("TotalCPUTime", 42.5),
    ]


def test_cli_one_vm_metric(host: FakeHost) -> None:
    cli = start_cli("-i", "--port", str(host.port), "--metric", "TotalCPUTime", "--context", "vm")
    assert host.receive_request() == REQUEST
    host.conn.sendall(RESPONSE)
    assert finish(cli) == (0, b"42.5\n", b"")


def test_falls_back_to_virtio_when_there_is_no_metrics_disk(host: FakeHost) -> None:
    cli = start_cli("--disk", str(host.port.parent / "absent"), "--port", str(host.port))
    assert host.receive_request() == REQUEST
    host.conn.sendall(RESPONSE)
    assert finish(cli) == (0, RESPONSE, b"")


def test_api_reads_a_response_sent_in_pieces(host: FakeHost) -> None:
    server = host.answer(RESPONSE[:7], RESPONSE[7:-1], RESPONSE[-1:])
    document = read_virtio(str(host.port), timeout=WAIT)
    server.join(WAIT)
    assert document.raw == RESPONSE
    assert document.transport == "virtio"
    assert document.get("NumCPUs") == 16
    assert document.get("TotalCPUTime", "vm") == 42.5  # its own VM only: no uuid needed


def test_metrics_not_available_yet(host: FakeHost) -> None:
    cli = start_cli("-i", "--port", str(host.port), "--format", "json")
    assert host.receive_request() == REQUEST
    host.conn.sendall(build_response(None, None))
    assert finish(cli) == (0, b"[]\n", b"")


def test_invalid_request_answer_is_an_error(host: FakeHost) -> None:
    cli = start_cli("-i", "--port", str(host.port))
    assert host.receive_request() == REQUEST
    host.conn.sendall(INVALID_RESPONSE)
    assert "INVALID REQUEST" in assert_one_line_error(*finish(cli))


def test_silent_host_times_out(host: FakeHost) -> None:
    started = time.monotonic()
    cli = start_cli("-i", "--port", str(host.port), "--timeout", "0.5")
    assert host.receive_request() == REQUEST
    host.conn.sendall(RESPONSE[:20])  # never completed
    stderr = assert_one_line_error(*finish(cli))
    assert "no complete response within 0.5 s" in stderr
    assert time.monotonic() - started < 10


def test_api_timeout_is_typed(host: FakeHost) -> None:
    with pytest.raises(VirtioTimeout):
        read_virtio(str(host.port), timeout=0.3)


def test_missing_port(tmp_path: Path) -> None:
    port = tmp_path / "org.github.vhostmd.1"
    result = subprocess.run(
        [*CLI, "-i", "--port", str(port)], capture_output=True, timeout=20, check=False
    )
    stderr = assert_one_line_error(result.returncode, result.stdout, result.stderr)
    assert "no such port" in stderr
    with pytest.raises(VirtioError, match="no such port"):
        read_virtio(str(port))
