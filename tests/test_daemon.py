"""The host daemon end to end: a real vhostmd, real workers, a real disk file."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

import psutil
import pytest

from vhostmd import mdisk
from vhostmd.document import parse_document

from daemon_harness import (
    VHOSTMD,
    Daemon,
    alive,
    cmdline,
    config_xml,
    disk_metrics,
    header,
    metric_xml,
    published,
    read_disk,
    values,
    wait_document,
    wait_for,
)

TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # the domain of test:///default


def test_host_and_vm_metrics_reach_the_disk_within_one_period(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    metrics = "\n".join([
        metric_xml("Greeting", "printf 'Gr\\303\\274\\303\\237e &amp; &lt;tag&gt;\\n'"),
        metric_xml("Cores", "echo 4", mtype="uint32", attrs=' unit="count"'),
        metric_xml("Pair", "echo 7,-8", mtype="group",
                   extra='<variable name="Seven" type="uint32"/>'
                         '<variable name="MinusEight" type="int32"/>'),
        metric_xml("Who", "echo NAME VMID UUID", context="vm"),
        metric_xml("Env", 'echo "$VHOSTMD_VM_NAME/$VHOSTMD_VM_ID/$VHOSTMD_CONNECT_URI"',
                   context="vm"),
        metric_xml("FromXml", "echo \"&lt;metric type='real64' context='vm'&gt;&lt;name&gt;X"
                   "&lt;/name&gt;&lt;value&gt;2.5&lt;/value&gt;&lt;/metric&gt;\"",
                   mtype="xml", context="vm"),
    ])
    # A 5 s period: the first cycle (forking the workers, every action once) has
    # its 4 s deadline to finish even on a loaded machine.
    with Daemon(tmp_path, config_xml(disk, metrics, period=5)) as daemon:
        wait_document(disk, 10)
        # The first cycle, from its start to its document, took less than its period.
        took = float(daemon.wait_log_match(r"cycle 1: \d+ metrics, 0 left out, "
                                           r"([\d.]+) s").group(1))
        assert took < 5, took
        got = values(disk)
        assert got[("host", "Greeting", None)] == "Grüße & <tag>"
        assert got[("host", "Cores", None)] == "4"
        assert got[("host", "Seven", None)] == "7"
        assert got[("host", "MinusEight", None)] == "-8"
        assert got[("vm", "Who", 1)] == f"test 1 {TEST_UUID}"
        assert got[("vm", "Env", 1)] == "test/1/test:///default"
        assert got[("vm", "X", 1)] == "2.5"
        vm = next(m for m in disk_metrics(disk) if m.name == "Who")
        assert vm.uuid == TEST_UUID
        raw = read_disk(disk).decode()
        assert "<metric type='uint32' context='host' unit='count'>" in raw
        assert raw.endswith("</metrics>\n")
        assert daemon.stop() == 0


def test_bad_values_are_left_out_and_logged_once(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    flag = tmp_path / "flag"
    metrics = "\n".join([
        metric_xml("Good", "echo 1", mtype="uint32"),
        metric_xml("Negative", "echo -5", mtype="uint32"),
        metric_xml("Words", "echo many", mtype="int64"),
        metric_xml("ShortGroup", "echo 1", mtype="group",
                   extra='<variable name="A" type="uint32"/><variable name="B" type="uint32"/>'),
        metric_xml("Flaky", f"cat {flag}", mtype="uint32"),
        metric_xml("BadXml", "echo '&lt;metric&gt;'", mtype="xml"),
    ])
    with Daemon(tmp_path, config_xml(disk, metrics)) as daemon:
        wait_document(disk)
        daemon.wait_log("cycle 3:")
        got = values(disk)
        assert got == {("host", "Good", None): "1"}
        log = daemon.log()
        assert log.count("host metric Negative left out") == 1
        assert "-5 is out of range for uint32" in log
        assert "'many' is not an integer" in log
        assert "expected 2 comma-separated values, got 1" in log
        assert log.count("host metric Flaky left out: exit status 1") == 1
        flag.write_text("9\n")
        wait_for(lambda: values(disk).get(("host", "Flaky", None)) == "9", 5, "recovery")
        daemon.wait_log("host metric Flaky recovered")
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()


def test_hung_action_times_out_without_delaying_other_metrics(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    metrics = "\n".join([
        metric_xml("Hung", "sleep 1000.25; echo 1", mtype="uint32"),
        metric_xml("Background", "(sleep 1000.5 &amp;) ; echo 2", mtype="uint32"),
        metric_xml("Quick", "echo 3", mtype="uint32"),
    ])
    with Daemon(tmp_path, config_xml(disk, metrics, period=2)) as daemon:
        wait_document(disk)
        # The first document comes by the cycle deadline (0.8 x period), not when the
        # hung action would end: the daemon's own measure of its first cycle says so.
        took = float(daemon.wait_log_match(r"cycle 1: \d+ metrics, \d+ left out, "
                                           r"([\d.]+) s").group(1))
        # The hung action would take 1000 s; the cycle ends at its 1.6 s deadline
        # (on a loaded machine, a little later).
        assert took < 10, took
        assert values(disk)[("host", "Quick", None)] == "3"
        assert ("host", "Hung", None) not in values(disk)
        daemon.wait_log("host metric Hung left out: timed out")
        descendants = daemon.titles()
        assert daemon.stop() == 0
    sleepers = [p.pid for p in psutil.process_iter() if "sleep 1000." in cmdline(p.pid)]
    assert sleepers == []
    # The forkserver ends when it sees the supervisor gone.
    wait_for(lambda: not any(alive(p) for p in descendants), 5, "every descendant to exit")


def test_process_titles_and_clean_stop(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, metric_xml("Slow", "sleep 0.3; echo 1", mtype="uint32"),
                      globals_extra="<workers>3</workers>")
    daemon = Daemon(tmp_path, conf).start()
    try:
        wait_document(disk)
        assert cmdline(daemon.pid) == "vhostmd: supervisor"
        titles = wait_for(lambda: (t := daemon.titles()) and len(
            [x for x in t.values() if x.startswith("vhostmd: worker")]) == 3 and t, 5,
            "three workers")
        assert f"vhostmd: disk-writer {disk}" in titles.values()
        for n in (1, 2, 3):
            assert any(t.startswith(f"vhostmd: worker {n} ") for t in titles.values())
        # Titles say what a worker is doing now.
        wait_for(lambda: any("action Slow" in t for t in daemon.titles().values()), 5,
                 "a worker titled with its job")
        descendants = list(daemon.titles())
        assert daemon.pid_file.read_text().strip() == str(daemon.pid)
    finally:
        code = daemon.stop()
    assert code == 0
    assert not daemon.pid_file.exists()
    wait_for(lambda: not any(alive(p) for p in descendants), 5, "every descendant to exit")
    assert "stopped" in daemon.log()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_other_stop_signals(tmp_path: Path, sig: signal.Signals) -> None:
    disk = tmp_path / "vhostmd0"
    with Daemon(tmp_path, config_xml(disk, metric_xml("A", "echo 1", mtype="uint32"))) as d:
        wait_document(disk)
        descendants = list(d.titles())
        assert d.proc is not None
        d.proc.send_signal(sig)
        assert d.proc.wait(10) == 0
        wait_for(lambda: not any(alive(p) for p in descendants), 5, "every descendant to exit")


def test_killed_disk_writer_is_replaced_and_repairs_a_busy_disk(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, metric_xml("Nanos", "date +%s%N", mtype="uint64"))
    with Daemon(tmp_path, conf) as daemon:
        wait_document(disk)
        writer = daemon.child_pid("disk-writer")
        # Play a writer that died mid-write: busy=1 left on the disk, then SIGKILL.
        with open(disk, "r+b") as f:
            os.pwrite(f.fileno(), (1).to_bytes(4, "big"), 4)
        os.kill(writer, signal.SIGKILL)
        before = values(disk) if header(disk).busy == 0 else None
        new_writer = wait_for(lambda: next((p for p, t in daemon.titles().items()
                                            if "disk-writer" in t and p != writer), None),
                              5, "a new disk-writer")
        assert new_writer != writer
        wait_for(lambda: published(disk), 5, "the disk repaired (busy=0)")
        first = values(disk)[("host", "Nanos", None)]
        wait_for(lambda: published(disk) and values(disk)[("host", "Nanos", None)] != first,
                 5, "updates to resume")
        assert before is None or before != values(disk)
        assert "disk-writer" in daemon.log() and "SIGKILL" in daemon.log()
        assert daemon.stop() == 0


def test_killed_worker_is_replaced(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, metric_xml("Nanos", "date +%s%N", mtype="uint64"),
                      globals_extra="<workers>2</workers>")
    with Daemon(tmp_path, conf) as daemon:
        wait_document(disk)
        worker = daemon.child_pid("worker 1 ")
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: any(t.startswith("vhostmd: worker 1 ") and p != worker
                             for p, t in daemon.titles().items()), 5, "worker 1 replaced")
        first = values(disk)[("host", "Nanos", None)]
        wait_for(lambda: values(disk)[("host", "Nanos", None)] != first, 5, "new values")
        daemon.wait_log("worker 1 (pid")
        assert daemon.stop() == 0


def test_readers_never_see_a_torn_document(tmp_path: Path) -> None:
    """Poll the disk while the daemon rewrites it; every read must verify."""
    disk = tmp_path / "vhostmd0"
    payload = "head -c 3000 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    metrics = "\n".join(
        [metric_xml("Nanos", "date +%s%N", mtype="uint64")]
        + [metric_xml(f"Noise{i}", payload) for i in range(8)])
    with Daemon(tmp_path, config_xml(disk, metrics, size_k=128)) as daemon:
        wait_document(disk)
        seen: set[str] = set()
        reads = 0
        deadline = time.monotonic() + 30
        # Until the daemon has rewritten the disk at least twice under the reader.
        while len(seen) < 3 or reads < 2000:
            assert time.monotonic() < deadline, f"{reads} reads, {len(seen)} documents"
            content = read_disk(disk, timeout=2)
            metrics_read = parse_document(content)  # a torn document would not parse
            assert len(metrics_read) == 9
            seen.add(metrics_read[0].value)
            reads += 1
        assert daemon.stop() == 0


WRITER = """
import random, select, sys, time
from vhostmd.disk.handle import open_disk
from vhostmd.disk.mapped import MetricsDisk
disk = MetricsDisk(open_disk({path!r}, 65536))
docs = [("<metrics>" + c * n + "</metrics>\\n").encode() for c, n in (("a", 30000), ("\xe9", 9000))]
print("ready", flush=True)
writes = 0
while not select.select([sys.stdin], [], [], 0)[0]:  # until the reader closes our stdin
    disk.write(docs[random.getrandbits(1)])  # not alternating: a read's parity tells nothing
    time.sleep(random.random() / 2000)  # gaps of 0-0.5 ms, or a reader would only ever
    # get in while the writer is off the CPU (and then read the same document many times)
    writes += 1
print(writes, flush=True)
"""


def test_disk_writer_under_a_tight_loop_never_tears(tmp_path: Path) -> None:
    """A writer process rewriting the disk as fast as it can, a reader verifying every read.

    On tmpfs (/dev/shm, the default disk location): the race is the same as on a
    disk-backed file, minus the time each msync spends on the block device. The
    reader goes on until the race has been seen, not for a fixed count: reads
    that had to retry (the writer was busy, or changed the content under the
    reader) and reads that found the other document.
    """
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    disk = Path(tempfile.mkstemp(prefix="vhostmd-stress-", dir=where)[1])
    docs = {("<metrics>" + c * n + "</metrics>\n").encode() for c, n in (("a", 30000),
                                                                         ("\xe9", 9000))}
    writer = subprocess.Popen([os.sys.executable, "-c", WRITER.format(path=str(disk))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    reads = raced = changes = 0
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        header_reads = 0
        with open(disk, "rb") as f:
            def read_at(offset: int, length: int) -> bytes:
                nonlocal header_reads
                header_reads += offset == 0
                return os.pread(f.fileno(), length, offset)

            last = None
            deadline = time.monotonic() + 30
            while reads < 2000 or raced < 300 or changes < 300:
                assert writer.poll() is None, "the writer died"
                assert time.monotonic() < deadline, (reads, raced, changes)
                header_reads = 0
                # Busy for 5 s (DiskBusyError) or a checksum that never matches
                # (DiskFormatError) fails the test.
                got = mdisk.read_document(read_at, 65536, timeout=5, delay=0.0005)
                assert got in docs  # a torn document fails its checksum first
                reads += 1
                raced += header_reads > 2
                changes += last is not None and got != last
                last = got
        assert writer.stdin is not None
        writer.stdin.close()
        assert writer.wait(30) == 0
        writes = int(writer.stdout.read())
        assert writes >= changes
        print(f"{writes} writes, {reads} reads ({raced} retried, {changes} saw the other "
              "document)")
    finally:
        writer.kill()
        writer.wait()
        disk.unlink()


def test_document_too_large_keeps_the_previous_one(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    size_file = tmp_path / "size"
    size_file.write_text("10")
    conf = config_xml(disk, metric_xml("Blob", f"head -c $(cat {size_file}) /dev/zero | tr "
                                                "'\\000' x"), size_k=64)
    with Daemon(tmp_path, conf) as daemon:
        wait_document(disk)
        assert values(disk)[("host", "Blob", None)] == "x" * 10
        # The host metrics alone no longer fit a 64 KiB disk (an action prints
        # at most 64 KiB).
        size_file.write_text("65500")
        daemon.wait_log("does not fit")
        assert values(disk)[("host", "Blob", None)] == "x" * 10
        # Another size, still too large: the same problem, not logged again.
        size_file.write_text("65510")
        cycles = daemon.log().count("cycle ")
        wait_for(lambda: daemon.log().count("cycle ") >= cycles + 2, 5, "two more cycles")
        size_file.write_text("20")
        wait_for(lambda: values(disk)[("host", "Blob", None)] == "x" * 20, 5, "a smaller one")
        assert daemon.log().count("does not fit") == 1
        assert daemon.stop() == 0


def test_vm_names_never_reach_a_shell_unless_plain(tmp_path: Path) -> None:
    import nodes

    # libvirt refuses '/' in names; actions run in '/', so a relative path will do.
    pwned = Path("/vhostmd-test-pwned")
    bad = f"x;touch {pwned.name}"
    uri, _ = nodes.write_node(tmp_path / "node.xml", 0,
                              names=["plain-vm", bad, f"a$(touch {pwned.name})b"])
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, metric_xml("Name", "echo NAME", context="vm")
                      + metric_xml("EnvName", 'printf %s "$VHOSTMD_VM_NAME"', context="vm"))
    with Daemon(tmp_path, conf, uri=uri) as daemon:
        wait_document(disk)
        daemon.wait_log("cycle 2:")
        names = [m.value for m in disk_metrics(disk) if m.name == "Name"]
        assert names == ["plain-vm"]
        assert daemon.log().count("VM name is not plain") == 2  # once per VM, not per cycle
        assert daemon.stop() == 0
    assert not pwned.exists()


def test_daemonizes_with_an_exclusive_pid_file(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    conf = tmp_path / "d.conf"
    conf.write_text(config_xml(disk, metric_xml("A", "echo 1", mtype="uint32")))
    pid_file = tmp_path / "run" / "vhostmd.pid"
    pid_file.parent.mkdir()
    cmd = [VHOSTMD, "-f", str(conf), "-p", str(pid_file), "-c", "test:///default",
           "--log-file", str(tmp_path / "vhostmd.log")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 5, "pid"))
    try:
        assert cmdline(pid) == "vhostmd: supervisor"
        assert psutil.Process(pid).cwd() == "/"
        wait_document(disk)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert second.returncode != 0
        assert second.stderr.strip() == (f"vhostmd: another vhostmd is running (pid {pid}, "
                                         f"pid file {pid_file})")
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), 10, "the daemon to exit")
    assert not pid_file.exists()


def test_user_option_refuses_root_and_drops_privileges(tmp_path: Path) -> None:
    # pytest's tmp_path lives under a 0700 directory that nobody cannot enter.
    tmp_path = Path(tempfile.mkdtemp(prefix="vhostmd-user-"))
    conf = tmp_path / "u.conf"
    disk = tmp_path / "vhostmd0"
    conf.write_text(config_xml(disk, metric_xml("Uid", "id -u", mtype="uint32")))
    refused = subprocess.run([VHOSTMD, "-d", "-f", str(conf), "-u", "root"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert "refusing to run as 'root'" in refused.stderr
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    nobody = pwd.getpwnam("nobody")
    os.chmod(tmp_path, 0o755)
    try:
        with Daemon(tmp_path, conf.read_text(), args=("-u", "nobody")) as daemon:
            wait_document(disk)
            assert values(disk)[("host", "Uid", None)] == str(nobody.pw_uid)
            # The files stay root's: the processes write them through what root opened.
            for path in (disk, daemon.pid_file, daemon.pid_file.with_suffix(".status")):
                assert os.stat(path).st_uid == 0, path
            # Every process of the daemon: none is left to root (multiprocessing's
            # resource tracker, which would be, is not started).
            for pid in [daemon.pid, *daemon.titles()]:
                uids = psutil.Process(pid).uids()  # real, effective, saved
                assert set(uids) == {nobody.pw_uid}, (pid, uids)
            status = subprocess.run([VHOSTMD, "--status", "-p", str(daemon.pid_file)],
                                    capture_output=True, text=True, timeout=30)
            assert status.returncode == 0, status.stdout
            assert "running as nobody" not in status.stdout  # sanity: it is the table
            assert f"running, pid {daemon.pid}" in status.stdout
            assert daemon.stop() == 0
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_action_output_is_bounded(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    conf = config_xml(disk, metric_xml("Flood", "yes | head -c 1000000")
                      + metric_xml("Fine", "echo 1", mtype="uint32"), size_k=1024)
    with Daemon(tmp_path, conf) as daemon:
        wait_document(disk)
        assert values(disk) == {("host", "Fine", None): "1"}
        daemon.wait_log("host metric Flood left out: output exceeds 65536 bytes")
        assert daemon.stop() == 0


def test_crash_looping_child_is_backed_off_not_spun(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    with Daemon(tmp_path, config_xml(disk, metric_xml("Nanos", "date +%s%N",
                                                      mtype="uint64"))) as daemon:
        wait_document(disk)
        # Every new disk-writer dies at once: 5 deaths within 30 s are a crash loop.
        writer = daemon.child_pid("disk-writer")
        for _ in range(4):
            os.kill(writer, signal.SIGKILL)
            writer = daemon.child_pid("disk-writer", other_than=writer)
        os.kill(writer, signal.SIGKILL)
        daemon.wait_log("(crash loop)")
        started = daemon.log().count("started disk-writer")
        # After the back-off a new writer starts and updates resume.
        daemon.child_pid("disk-writer", 15, other_than=writer)
        first = values(disk)[("host", "Nanos", None)]
        wait_for(lambda: values(disk)[("host", "Nanos", None)] != first, 5, "updates")
        assert daemon.log().count("started disk-writer") == started + 1  # no spinning
        assert daemon.stop() == 0


def test_relative_paths_keep_their_meaning_after_daemonizing(tmp_path: Path) -> None:
    # A relative disk path is relative to the config file; -f and -p to the caller.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "r.conf").write_text(
        config_xml("vhostmd0", metric_xml("A", "echo 1", mtype="uint32")))
    cmd = [VHOSTMD, "-f", "etc/r.conf", "-p", "r.pid", "-c", "test:///default",
           "--log-file", "r.log"]
    started = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    pid_file = tmp_path / "r.pid"
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 5, "pid"))
    try:
        wait_document(tmp_path / "etc" / "vhostmd0")
        assert (tmp_path / "r.status").exists()
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), 10, "the daemon to exit")
    assert not pid_file.exists() and not (tmp_path / "r.status").exists()


def test_action_escaping_into_its_own_session_is_killed(tmp_path: Path) -> None:
    # setsid moves the sleep out of the action's process group (and session):
    # the group kill misses it, but the worker adopted it as an orphan. The
    # action ends only once the sleep has left: otherwise the kill of its group,
    # right after it ends, could still catch the sleep before its setsid.
    disk = tmp_path / "vhostmd0"
    left = tmp_path / "left"
    action = escape(f"rm -f {left}; setsid sh -c 'echo $$ > {left}; exec sleep 1000.75' "
                    f">/dev/null 2>&1 & while [ ! -s {left} ]; do sleep 0.01; done; echo 1")
    conf = config_xml(disk, metric_xml("Escape", action, mtype="uint32"))
    with Daemon(tmp_path, conf) as daemon:
        wait_for(lambda: published(disk) and ("host", "Escape", None) in values(disk), 10,
                 "the action's value")
        daemon.wait_log("action Escape left 1 process(es) behind in other sessions; killed them")

        def sleepers() -> list[int]:
            return [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                    if "sleep 1000.75" in cmdline(p) and alive(p)]

        # While the daemon runs: at most the one of the current cycle, never a pile.
        wait_for(lambda: len(sleepers()) <= 1, 10, "escaped sleeps to be killed")
        assert daemon.stop() == 0
    wait_for(lambda: not sleepers(), 10, "no escaped sleep after stop")
