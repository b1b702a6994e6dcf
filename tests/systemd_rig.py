"""A real systemd for the tests: a Debian 12 container booted with systemd-nspawn.

PID 1 of the test machine need not be systemd. This rig makes a minimal
Debian root with debootstrap (systemd, dbus, python3 and the daemon's
libraries), keeps it in a cache between runs, copies it for one test module,
boots it with ``systemd-nspawn --register=no --keep-unit -b`` (no machined,
no D-Bus on the host) and runs commands inside through ``nsenter`` into the
container's PID 1 (``systemctl``, ``journalctl``, ``dpkg``). The Debian
packages are built from the checkout by tests/packaging/build.sh.

Everything is real: the unit as the package ships it, its maintainer
scripts, systemd's ordering, notify socket and watchdog, the journal.
``unavailable()`` says why the machine cannot provide it (the tests skip).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "tests" / "packaging" / "build.sh"
CACHE = Path(os.environ.get("VHOSTMD_TEST_CACHE", "/var/cache/vhostmd-tests"))
# The machine-wide lock of the project's tests that use machine-wide resources.
MACHINE_LOCK = Path("/tmp/vhostmd-system.lock")
SUITE = "bookworm"
# What the root holds besides minbase: systemd, and what the vhostmd package
# depends on (so that installing it needs no network).
ROOT_PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "python3", "python3-libvirt",
                 "python3-lxml", "python3-psutil", "python3-setproctitle",
                 "python3-prometheus-client")
# Change to rebuild every cached root (e.g. after changing how it is made).
ROOT_RECIPE = "1"
TOOLS = ("debootstrap", "systemd-nspawn", "nsenter", "dpkg-buildpackage", "dpkg-deb")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> str | None:
    """Why this machine cannot run the rig, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, systemd-nspawn)"
    for tool in TOOLS:
        if shutil.which(tool, path=PATH) is None:
            return (f"{tool} is not installed "
                    "(apt-get install debootstrap systemd-container dpkg-dev)")
    if not Path("/sys/fs/cgroup").is_dir():
        return "no /sys/fs/cgroup: systemd-nspawn cannot run a container here"
    return None


def mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    sources = sorted(Path("/etc/apt").glob("sources.list.d/*.sources"))
    for source in sources:
        text = source.read_text(errors="replace")
        for stanza in text.split("\n\n"):
            if re.search(rf"(?m)^Suites:.*\b{SUITE}\b", stanza) and "security" not in stanza:
                found = re.search(r"(?m)^URIs:\s*(\S+)", stanza)
                if found:
                    return found.group(1)
    for source in [Path("/etc/apt/sources.list"), *Path("/etc/apt").glob("sources.list.d/*.list")]:
        with contextlib.suppress(OSError):
            for line in source.read_text(errors="replace").splitlines():
                words = line.split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return "http://deb.debian.org/debian"


def root_name() -> str:
    key = hashlib.sha256(" ".join((SUITE, ROOT_RECIPE, *ROOT_PACKAGES)).encode()).hexdigest()
    return f"{SUITE}-systemd-{key[:12]}"


class RigUnavailable(Exception):
    """The machine cannot provide the rig (e.g. the mirror cannot be reached)."""


def cached_root() -> Path:
    """The cached root (made now, about a minute, when missing): never booted itself."""
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / root_name()
    with open(CACHE / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run making the same root
        if (root / ".complete").exists():
            return root
        shutil.rmtree(root, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f"{root.name}.", dir=CACHE))
        try:
            try:
                done = subprocess.run(
                    ["debootstrap", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}",
                     SUITE, str(work / "root"), mirror()],
                    stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=400,
                    env={"PATH": PATH, "LC_ALL": "C.UTF-8"})
            except subprocess.TimeoutExpired:
                raise RigUnavailable("debootstrap took more than 400 s (a slow mirror?)") from None
            if done.returncode != 0:
                tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
                raise RigUnavailable(f"debootstrap failed: {' / '.join(tail)}")
            made = work / "root"
            # Smaller copies: what a test never reads.
            for junk in ("var/cache/apt/archives", "usr/share/doc", "usr/share/man",
                         "usr/share/locale"):
                for entry in (made / junk).glob("*"):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            (made / ".complete").write_text(f"{SUITE} {ROOT_RECIPE} {' '.join(ROOT_PACKAGES)}\n")
            made.rename(root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return root


# -- the machine lock ------------------------------------------------------------------


def _lock_holders(path: Path) -> set[int]:
    """Pids holding a flock on ``path`` (from /proc/locks)."""
    try:
        st = path.stat()
        text = Path("/proc/locks").read_text()
    except OSError:
        return set()
    inode = f":{st.st_ino}"
    holders = set()
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 6 and words[1] == "FLOCK" and words[5].endswith(inode):
            holders.add(int(words[4]))
    return holders


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


@contextlib.contextmanager
def machine_lock(timeout: float = 900) -> Iterator[None]:
    """Hold the machine-wide test lock (unless a process we run under holds it already).

    ``flock /tmp/vhostmd-system.lock pytest ...`` holds it for us: taking it
    again would wait for ever.
    """
    MACHINE_LOCK.touch(exist_ok=True)
    if _lock_holders(MACHINE_LOCK) & _ancestors():
        yield
        return
    with open(MACHINE_LOCK) as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RigUnavailable(
                        f"{MACHINE_LOCK} still held by another test run after {timeout:.0f} s"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- the packages ------------------------------------------------------------------------


def build_packages(work: Path) -> tuple[str, list[Path]]:
    """Build the .debs from the checkout (tests/packaging/build.sh): version and files."""
    done = subprocess.run(["bash", str(BUILD), str(work)], capture_output=True, text=True,
                          timeout=600, env={"PATH": PATH, "LC_ALL": "C.UTF-8"})
    if done.returncode != 0:
        raise AssertionError(f"building the packages failed:\n{done.stderr[-3000:]}")
    version = done.stdout.strip().splitlines()[-1]
    return version, [work / f"vhostmd_{version}_all.deb",
                     work / f"vm-dump-metrics_{version}_all.deb"]


def bump_packages(debs: list[Path], version: str, new: str, out: Path) -> list[Path]:
    """The same packages as version ``new``: control files and the code's __version__.

    What an upgrade to a newer release installs, without a second build.
    """
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for deb in debs:
        tree = out / deb.name.split("_")[0]
        shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
        control = tree / "DEBIAN" / "control"
        text = control.read_text()
        text = re.sub(r"(?m)^Version: .*$", f"Version: {new}", text)
        control.write_text(text.replace(f"(= {version})", f"(= {new})"))
        code = tree / "usr/share/vhostmd/vhostmd/__init__.py"
        if code.exists():
            code.write_text(code.read_text().replace(f'__version__ = "{version}"',
                                                     f'__version__ = "{new}"'))
            sums = tree / "DEBIAN" / "md5sums"
            digest = hashlib.md5(code.read_bytes()).hexdigest()  # dpkg's md5sums
            rel = str(code.relative_to(tree))
            sums.write_text(re.sub(rf"(?m)^\S+(  {re.escape(rel)})$", rf"{digest}\1",
                                   sums.read_text()))
        target = out / deb.name.replace(f"_{version}_", f"_{new}_")
        subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(target)],
                       check=True, capture_output=True)
        shutil.rmtree(tree)
        made.append(target)
    return made


# -- the container -------------------------------------------------------------------------


class Container:
    """A copy of the cached root, booted with systemd-nspawn; commands run in it by nsenter."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 120) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "--register=no", "--keep-unit", "--private-network",
             "--console=passive", "--quiet", "-D", str(self.root), "-b"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no container after {timeout} s:\n{self.log_tail()}")
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            with contextlib.suppress(OSError):
                pids = children.read_text().split()
                if pids and self._is_systemd(int(pids[0])):
                    self.leader = int(pids[0])
            time.sleep(0.05)
        # systemd answers systemctl once its private socket exists, a moment after exec.
        while True:
            state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                             timeout=max(5.0, deadline - time.monotonic()))
            if "Failed to connect to bus" not in state.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if state.stdout.strip() not in ("running", "degraded"):
            failed = self.run(["systemctl", "--failed", "--no-pager"], check=False).stdout
            raise AssertionError(f"the container did not boot: {state.stdout.strip()} "
                                 f"{state.stderr.strip()}\n{failed}\n{self.log_tail()}")

    @staticmethod
    def _is_systemd(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
        except OSError:
            return False

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return ""

    def command(self, args: list[str]) -> list[str]:
        assert self.leader, "the container is not running"
        return ["nsenter", "-t", str(self.leader), "-a", "--", "/usr/bin/env", "-i",
                f"PATH={PATH}", "LC_ALL=C.UTF-8", "SYSTEMD_PAGER=", *args]

    def run(self, args: list[str] | str, *, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``args`` (a list, or a string for /bin/sh -c) inside; its output as text."""
        argv = ["/bin/sh", "-c", args] if isinstance(args, str) else args
        done = subprocess.run(self.command(argv), capture_output=True, text=True,
                              timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"in the container: {argv} exited {done.returncode}:\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def popen(self, args: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(args), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def file(self, path: str) -> Path:
        """A path of the container's root file system (not its /run, /tmp, /dev/shm)."""
        return self.root / path.lstrip("/")

    def wait_exit(self, timeout: float) -> int:
        assert self.nspawn is not None
        try:
            return self.nspawn.wait(timeout)
        finally:
            self.leader = 0

    def reboot(self, timeout: float = 120) -> None:
        """``systemctl reboot`` inside; nspawn exits (it reboots nothing itself): boot again."""
        self.run(["systemctl", "reboot"], check=False)
        self.wait_exit(timeout)
        self.boot(timeout)

    def poweroff(self, timeout: float = 60) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        if self.leader:
            self.run(["systemctl", "poweroff"], check=False)
        try:
            self.wait_exit(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.nspawn.pid, signal.SIGKILL)
            self.nspawn.wait(10)


@contextlib.contextmanager
def container(work: Path) -> Iterator[Container]:
    """A fresh copy of the cached root in ``work``, booted; powered off and removed after."""
    source = cached_root()
    root = work / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(root)], check=True)
    machine = Container(root, work / "nspawn.log")
    try:
        yield machine
    finally:
        machine.poweroff()
        shutil.rmtree(root, ignore_errors=True)
