"""Start a real vhostmd in a test, read what it publishes, stop it, check what is left.

Everything here drives the real console script in a real subprocess; waits
poll a condition with a bound instead of sleeping a fixed time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import psutil

from vhostmd import mdisk
from vhostmd.document import Metric, parse_document

BIN = Path(sys.executable).parent
VHOSTMD = str(BIN / "vhostmd")
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def config_xml(disk: Path | str, metrics: str = "", *, period: int = 1, size_k: int = 64,
               transports: tuple[str, ...] = ("vbd",), globals_extra: str = "",
               exec_path: str = "/usr/sbin:/usr/bin:/sbin:/bin") -> str:
    transport = "".join(f"<transport>{t}</transport>" for t in transports)
    return f"""<?xml version="1.0"?>
<vhostmd>
  <globals>
    <disk><name>test-disk</name><path>{disk}</path><size unit="k">{size_k}</size></disk>
    <update_period>{period}</update_period>
    <path>{exec_path}</path>
    {transport}
    {globals_extra}
  </globals>
  <metrics>
{metrics}
  </metrics>
</vhostmd>
"""


def virtio_xml(channel_path: Path | str, *, max_channels: int | None = None,
               expiration_time: int | None = None) -> str:
    """A ``<virtio>`` block for ``config_xml(globals_extra=...)`` (unset values stay default)."""
    options = [f"<channel_path>{channel_path}</channel_path>"]
    if max_channels is not None:
        options.append(f"<max_channels>{max_channels}</max_channels>")
    if expiration_time is not None:
        options.append(f"<expiration_time>{expiration_time}</expiration_time>")
    return f"<virtio>{''.join(options)}</virtio>"


def metric_xml(name: str, action: str, *, mtype: str = "string", context: str = "host",
               extra: str = "", attrs: str = "") -> str:
    return (f'<metric type="{mtype}" context="{context}"{attrs}><name>{name}</name>'
            f"<action>{action}</action>{extra}</metric>")


def read_disk(path: Path | str, timeout: float = 5.0) -> bytes:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size

        def read_at(offset: int, length: int) -> bytes:
            return os.pread(f.fileno(), length, offset)

        return mdisk.read_document(read_at, size, timeout=timeout, where=str(path))


def write_disk_image(path: Path, content: bytes, *, size: int = 64 * 1024, busy: int = 0,
                     checksum: int | None = None, length: int | None = None) -> Path:
    """A metrics disk laid out as the project's writer does (header, content, zero fill);
    checksum/length/busy override what the header says, to build broken disks."""
    header = mdisk.pack_header(
        busy,
        mdisk.checksum_signed(content) if checksum is None else checksum,
        len(content) if length is None else length,
    )
    image = header + content
    path.write_bytes(image + b"\0" * (size - len(image)))
    return path


def disk_metrics(path: Path | str) -> list[Metric]:
    return parse_document(read_disk(path))


class DiskReader(threading.Thread):
    """Reads the disk as a guest would, as fast as it can, counting bad reads."""

    def __init__(self, disk: Path) -> None:
        super().__init__(daemon=True)
        self.disk = disk
        self.reads = 0
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                parse_document(read_disk(self.disk, timeout=5))
                self.reads += 1
            except Exception as exc:  # any failure is a torn or stale-forever disk
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


def header(path: Path | str) -> mdisk.Header:
    with open(path, "rb") as f:
        return mdisk.unpack_header(f.read(mdisk.HEADER_SIZE))


def published(disk: Path | str) -> bool:
    """A document is on the disk and stable (busy=0): what a guest could read now."""
    try:
        head = header(disk)
    except (OSError, ValueError, mdisk.DiskError):
        return False
    return head.busy == 0 and head.length > 0


def ready_metrics(disk: Path | str) -> list[Metric] | None:
    """The disk's metrics, or None while no document is there yet.

    "Not yet" is only: no file, a file not sized yet, a header never written
    (zeros) or holding no document (length 0, as a disk left by an old writer
    may, before the daemon resets it), or a writer still busy. Anything else (a bad signature, a
    checksum that does not match, XML that does not parse) raises: a polling
    test must see a corrupt document, not take it for "not ready".
    """
    try:
        with open(disk, "rb") as f:
            head = f.read(mdisk.HEADER_SIZE)
    except FileNotFoundError:
        return None
    if len(head) < mdisk.HEADER_SIZE or head == bytes(mdisk.HEADER_SIZE):
        return None
    header = mdisk.unpack_header(head)
    if header.busy:
        return None  # being written now: the next poll will tell
    if header.length == 0:
        return None
    try:
        return parse_document(read_disk(disk, timeout=1.0))
    except mdisk.DiskBusyError:
        return None


def wait_document(disk: Path | str, timeout: float = 5.0) -> list[Metric]:
    """The one way to wait for a daemon's first document: its metrics, once there is one."""
    wait_for(lambda: published(disk), timeout, f"the first document on {disk}")
    return disk_metrics(disk)


def values(disk: Path | str) -> dict[tuple[str, str, int | None], str]:
    """(context, name, VM id) -> value of every metric on the disk now."""
    return {(m.context, m.name, m.vm_id): m.value for m in disk_metrics(disk)}


def metric_names(disk: Path | str) -> set[str]:
    """Metric names on the disk now (empty while there is no document yet)."""
    return {m.name for m in ready_metrics(disk) or ()}


def host_value(disk: Path | str, name: str) -> str | None:
    """The value of host metric ``name`` now (None while there is none, or no document yet)."""
    return next((m.value for m in ready_metrics(disk) or ()
                 if m.name == name and m.vm_id is None), None)


def updates_resume(disk: Path | str, timeout: float = 5.0, metric: str = "Nanos") -> None:
    """Wait for a document, then for a newer one (``metric`` changes every cycle)."""
    first = wait_for(lambda: host_value(disk, metric), timeout, "a document")
    wait_for(lambda: (v := host_value(disk, metric)) is not None and v != first, timeout,
             "a newer document")


def children_of(pid: int) -> dict[int, str]:
    """pid -> command line (process title) of every descendant of ``pid``."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    return {child.pid: cmdline(child.pid) for child in descendants}


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline()).strip()
    except psutil.Error:
        return ""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Daemon:
    """A vhostmd started with -d (foreground, log on stderr) for one test."""

    def __init__(self, tmp: Path, config: str, *, uri: str = "test:///default",
                 args: tuple[str, ...] = (), name: str = "vhostmd",
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.tmp = tmp
        self.cwd = cwd
        self.conf = tmp / f"{name}.conf"
        self.conf.write_text(config)
        self.log_path = tmp / f"{name}.log"
        self.pid_file = tmp / f"{name}.pid"
        self.uri = uri
        self.args = args
        self.env = None if env is None else {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        return self.start_with([VHOSTMD])

    def start_with(self, program: list[str]) -> Daemon:
        """Start the daemon as ``program`` (e.g. an interpreter and a launcher) + the options."""
        cmd = [*program, "-d", "-v", "-f", str(self.conf), "-p", str(self.pid_file)]
        if self.uri:
            cmd += ["-c", self.uri]
        cmd += list(self.args)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        return wait_for(lambda: text in self.log() and self.log(), timeout, f"log line {text!r}")

    def wait_log_match(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first match of the regular expression ``pattern`` in the log, once there is one."""
        return wait_for(lambda: re.search(pattern, self.log()), timeout, f"log {pattern!r}")

    def log_time(self, pattern: str, timeout: float = 10.0) -> float:
        """When (time.time()) the daemon logged its first line matching ``pattern``.

        The daemon's own timestamp of an event, so a test can bound how long
        something took without the slack of polling for it.
        """
        stamp_re = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})"
        match = self.wait_log_match(rf"(?m)^{stamp_re} .*{pattern}", timeout)
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
        return stamp.timestamp() + int(match.group(2)) / 1000

    def titles(self) -> dict[int, str]:
        return children_of(self.pid)

    def title(self, title_part: str) -> str | None:
        """The title of a child whose title contains ``title_part`` now, if there is one."""
        return next((title for title in self.titles().values() if title_part in title), None)

    def child_pid(self, title_part: str, timeout: float = 10.0, *,
                  other_than: int | None = None) -> int:
        """Wait for a child titled ``title_part`` (not ``other_than``, e.g. the one it replaces)."""
        def find() -> int | None:
            for pid, title in self.titles().items():
                if title_part in title and pid != other_than:
                    return pid
            return None

        return wait_for(find, timeout, f"a child titled {title_part!r}")

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"vhostmd did not stop within {timeout} s:\n{self.log()}") from None
        finally:
            self._log.close()
        return code

    def __enter__(self) -> Daemon:
        # Started already with start_with (a launcher of the test's own): not twice.
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            descendants = list(self.titles())
            try:
                self.stop()
            finally:
                for pid in descendants:  # never leave a process behind, even on failure
                    if alive(pid):
                        os.kill(pid, signal.SIGKILL)
