"""Real-hypervisor rig: libvirtd with the QEMU driver, tiny guests, and their consoles.

Used by ``tests/test_qemu.py`` and ``./dev.sh demo-qemu``, and meant to be reused by
later real-guest tests (per-VM disks, lifecycle timing). It gives:

- :func:`why_no_qemu`: the reason this machine cannot run real guests, if any;
- :class:`LibvirtQemu`: ``qemu:///system``; a libvirtd that already answers is used
  as it is, otherwise one is set up (user ``libvirt-qemu``, group ``kvm``, a
  ``qemu.conf`` for containers, virtlogd, directories) and torn down afterwards;
- :func:`build_images`: a Debian cloud kernel and initramfs images built from
  Debian packages already on the host (busybox-static, the kernel's virtio
  modules and, for the Python image, the host's Python plus lxml and the
  project's guest package), cached under a directory keyed by every input;
- :class:`Guest`: one libvirt domain, transient (``virsh create``) or, after
  :meth:`Guest.define`, persistent (``virsh start``; devices can then be added
  with ``virsh attach-device --config``), with the metrics disk (read-only,
  shareable), the vhostmd channel (``<source mode='bind'/>``, no path) and a
  serial console on a unix socket; :meth:`Guest.run` runs a shell command in the
  guest and returns its exit status and output, framed and checksummed;
- :func:`boot_guests`: start several guests at once and wait for all of them;
- :func:`build_usb_images` and :data:`USB_MODULES`: the same images on Debian's
  generic kernel (``linux-image-amd64``), which has what PVC's USB metrics disk
  needs (the cloud kernel has no USB). ``./dev.sh`` only downloads that
  package (``apt-get download``, nothing installed) into the kernel cache
  (the image cache's path + ``-kernel``); its kernel and modules are
  extracted here, once, beside it;
- :meth:`LibvirtQemu.add_hook`: a libvirt hook script installed while the rig's
  own libvirtd runs, picked up with SIGHUP as an operator's ``systemctl reload
  libvirtd`` does, and removed with the rest of the setup.

The console protocol. The guest's ``/init`` (busybox ash) reads one line per
command from the serial console: ``ID run TIMEOUT BASE64-COMMAND`` or ``ID resend``.
It runs the command with its output in a file, then prints::

    @@VH ID BEGIN
    @@VH ID D <base64 of the gzipped output, one line per 76 characters>
    @@VH ID END RC SIZE SHA256

Kernel messages can land in the middle of these lines (``loglevel=1`` makes that
rare), so the host checks size and SHA-256 of what it decoded and asks for a
resend of the same output when they do not match, never re-running the command.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import grp
import gzip
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

URI = "qemu:///system"
PORT_NAME = "org.github.vhostmd.1"
REPO = Path(__file__).resolve().parent.parent
BUSYBOX = Path("/bin/busybox")
QEMU = "/usr/bin/qemu-system-x86_64"
# The virtio drivers of Debian's cloud kernel are modules; these (and what they
# depend on, from modules.dep) go into every image, loaded by /init in order.
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "virtio_balloon")
# PVC's metrics disk is a USB disk (bus='usb') behind the domain's default USB
# controller (piix3-uhci on the i440fx machine; EHCI and xHCI for other models).
USB_MODULES = (*MODULES, "uhci_hcd", "ehci_pci", "xhci_pci", "usb_storage", "sd_mod")
LOCK_FILE = Path("/run/lock/vhostmd-qemu-tests.lock")
STATE_FILE = Path("/run/lock/vhostmd-qemu-tests.state")
HOOKS_DIR = Path("/etc/libvirt/hooks")  # a privileged libvirtd's hook directory
GUEST_PREFIX = "vhostmd-"  # every guest the tests and the demo name begins so
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_CONF_MARK = "# Written by vhostmd's real-hypervisor test rig (tests/qemu_rig.py)."
# Everything we need on the host, by the Debian package that provides it.
NEEDED = {
    QEMU: "qemu-system-x86",
    "/usr/sbin/libvirtd": "libvirt-daemon",
    "/usr/sbin/virtlogd": "libvirt-daemon",
    "/usr/bin/virsh": "libvirt-clients",
    str(BUSYBOX): "busybox-static",
}
QEMU_DRIVER = Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")
# TCG boots take 3-5 s idle and about 40 s on a loaded 2-core machine: bounds are
# generous so that load slows the tests down without failing them.
BOOT_TIMEOUT = float(os.environ.get("VHOSTMD_QEMU_BOOT_TIMEOUT", "150"))
COMMAND_TIMEOUT = 60.0


def log(message: str) -> None:
    """Progress on stderr: pytest shows it for a failing test, the demo for everyone."""
    print(f"[qemu-rig {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- host checks


def find_kernel() -> tuple[Path, Path] | None:
    """The newest Debian cloud kernel with its modules directory: (vmlinuz, modules dir)."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*-cloud-amd64"):
        release = vmlinuz.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / release
        if (modules / "modules.dep").is_file():
            found.append((vmlinuz.stat().st_mtime, vmlinuz, modules))
    if not found:
        return None
    _mtime, vmlinuz, modules = max(found)
    return vmlinuz, modules


def find_usb_kernel(cache: Path | None = None) -> tuple[Path, Path] | None:
    """Debian's generic kernel (USB support) with its modules: installed, or extracted
    from the package ``./dev.sh`` downloads into the cache (``debs/``)."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*-amd64"):
        release = vmlinuz.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / release
        if not release.endswith("-cloud-amd64") and (modules / "modules.dep").is_file():
            found.append((vmlinuz.stat().st_mtime, vmlinuz, modules))
    if found:
        _mtime, vmlinuz, modules = max(found)
        return vmlinuz, modules
    root = cache or _kernel_cache_dir()
    debs = sorted((root / "debs").glob("linux-image-*-amd64_*_amd64.deb"),
                  key=lambda deb: deb.stat().st_mtime)
    debs = [deb for deb in debs if "-cloud-amd64_" not in deb.name]
    if not debs:
        return None
    return _extract_kernel(debs[-1], root / "usb-kernel" / debs[-1].stem)


def _extract_kernel(deb: Path, where: Path) -> tuple[Path, Path]:
    """vmlinuz and the modules ``USB_MODULES`` need, from a linux-image package, into
    ``where`` (once: about 6 s; the package's 400 MB of modules are not kept)."""
    def extracted() -> tuple[Path, Path] | None:
        kernels = list(where.glob("boot/vmlinuz-*"))
        deps = list(where.glob("lib/modules/*/modules.dep"))
        return (kernels[0], deps[0].parent) if kernels and deps else None

    if (done := extracted()) is not None:
        return done
    started = time.monotonic()
    stage = where.with_name(where.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                          stdout=subprocess.PIPE) as tar_stream:
        subprocess.run(["tar", "-x", "-C", str(stage), "--wildcards", "./boot/vmlinuz-*",
                        "./lib/modules/*"], stdin=tar_stream.stdout, check=True, timeout=300)
    if tar_stream.returncode != 0:  # the with block waited for it
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} failed")
    (release,) = [d.name for d in (stage / "lib/modules").iterdir()]
    # The package has no modules.dep (its postinst makes it): make it here.
    subprocess.run(["depmod", "-b", str(stage), release], check=True, timeout=120)
    modules = stage / "lib/modules" / release
    keep = set(_module_order(modules, USB_MODULES))
    for ko in modules.rglob("*.ko"):
        if str(ko.relative_to(modules)) not in keep:
            ko.unlink()
    shutil.rmtree(where, ignore_errors=True)
    stage.rename(where)
    log(f"extracted {release} (vmlinuz and {len(keep)} modules) from {deb.name} in "
        f"{time.monotonic() - started:.1f} s")
    done = extracted()
    assert done is not None
    return done


def why_no_usb_kernel() -> str | None:
    """Why no guest with a USB disk can boot here, or None."""
    if find_usb_kernel() is None:
        return (f"no Debian generic kernel: ./dev.sh test downloads linux-image-amd64's "
                f"package into {_kernel_cache_dir() / 'debs'}")
    return None


def why_no_qemu() -> str | None:
    """Why this machine cannot run the real-hypervisor tests, or None if it can."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "real QEMU guests need an x86_64 Linux host"
    if os.geteuid() != 0:
        return "libvirtd with the QEMU driver (qemu:///system) needs root"
    missing = sorted({pkg for path, pkg in NEEDED.items() if not os.access(path, os.X_OK)})
    if not QEMU_DRIVER.exists():
        missing.append("libvirt-daemon-driver-qemu")
    if find_kernel() is None:
        missing.append("linux-image-cloud-amd64")
    if missing:
        return f"not installed: {' '.join(missing)} (./dev.sh test installs them)"
    return None


def kvm_usable() -> bool:
    """Whether guests can use KVM; TCG is used otherwise (VHOSTMD_QEMU_ACCEL forces one)."""
    forced = os.environ.get("VHOSTMD_QEMU_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced == "kvm"
    # /dev/kvm can exist and even create VMs where the CPU offers no
    # virtualization to this (nested) host: such guests hang without a line of
    # output. The CPU flag is the cheap tell.
    try:
        flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return False
    if flags is None or not {"vmx", "svm"} & set(flags.group(1).split()):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        kvm_get_api_version = 0xAE00
        kvm_create_vm = 0xAE01
        if fcntl.ioctl(fd, kvm_get_api_version) != 12:
            return False
        # Only creating a VM proves it: /dev/kvm can exist where nested KVM fails.
        os.close(fcntl.ioctl(fd, kvm_create_vm, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- images


class Cpio:
    """A newc ("SVR4 with no CRC") archive as the kernel unpacks it into its rootfs.

    Written here rather than with cpio(1) so that device nodes and root ownership
    need no privileges and file order and timestamps are reproducible.
    """

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1000
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        name = name.strip("/")
        if name in self.seen:
            return
        self.seen.add(name)
        self.ino += 1
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        blob = header + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4)
        blob += data + b"\0" * (-len(data) % 4)
        self.parts.append(blob)

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            self._entry("/".join(parts[:depth]), stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.directory(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.directory(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def host_file(self, path: str | Path, name: str | None = None) -> None:
        """A host file at the same path in the image (or at ``name``), symlinks followed."""
        real = Path(path).resolve()
        self.file(name or str(path), real.read_bytes(), real.stat().st_mode & 0o777)

    def bytes(self) -> bytes:
        trailer = Cpio()
        trailer._entry("TRAILER!!!", 0)
        return b"".join(self.parts) + trailer.parts[0]


# PID 1 of every guest. The host drives it over the serial console (see the
# module docstring); everything it prints for the host starts with "@@VH ".
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/ PYTHONHASHSEED=0
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /dev/virtio-ports
while read -r module; do
    insmod "/lib/modules/$module" || echo "@@VH LOG insmod $module failed"
done < /etc/vh-modules
# udev would name the virtio-serial ports; there is none, so link them here. The
# name comes from the host a moment after the driver binds: wait for it (bounded).
tries=0
for port in /sys/class/virtio-ports/*; do
    [ -e "$port/name" ] || continue
    while [ -z "$(cat "$port/name")" ] && [ $tries -lt 200 ]; do
        tries=$((tries + 1)); usleep 100000
    done
    name=$(cat "$port/name")
    [ -n "$name" ] && ln -sf "/dev/${port##*/}" "/dev/virtio-ports/$name"
done
# The host's commands must not come back as output; '\n' stays a line end.
stty -echo -onlcr 2>/dev/null

vh_emit() {
    set -- "$1" "$(cat /tmp/vh-rc)" "$(wc -c < /tmp/vh-out)" "$(sha256sum < /tmp/vh-out)"
    echo "@@VH $1 BEGIN"
    gzip -c < /tmp/vh-out | base64 | sed "s/^/@@VH $1 D /"
    echo "@@VH $1 END $2 $3 ${4%% *}"
}

echo "@@VH READY $(cut -d' ' -f1 /proc/uptime)"
last=
while true; do
    while read -r id verb limit command; do
        case "$verb" in
        run)
            echo "$command" | base64 -d > /tmp/vh-cmd
            (cd / && timeout -s KILL "$limit" sh /tmp/vh-cmd) > /tmp/vh-out 2>&1 < /dev/null
            echo $? > /tmp/vh-rc
            last=$id
            vh_emit "$id"
            ;;
        resend)
            [ "$id" = "$last" ] && vh_emit "$id"
            ;;
        esac
    done
    sleep 1  # PID 1 must never exit
done
"""

# Read the metrics disk as a guest does: from the virtio-blk device, bypassing
# the page cache (a cached copy would be an old document). $1: bytes to read.
VH_DISK = r"""#!/bin/sh
dev=${VH_DISK_DEV:-/dev/vda}
exec dd if="$dev" bs=4096 count=$(( (${1:-65536} + 4095) / 4096 )) iflag=direct 2>/dev/null
"""

# One virtio-serial request, "GET /metrics/XML" and a blank line, and its answer
# up to "</metrics>" and the blank line after it; each read bounded by $1 s.
VH_VIRTIO = r"""#!/bin/sh
port=/dev/virtio-ports/org.github.vhostmd.1
exec 3<>"$port" || exit 3
# What an interrupted earlier read left in the port is not part of this answer.
while IFS= read -r -t 0.2 stale <&3; do :; done
printf 'GET /metrics/XML\n\n' >&3
while IFS= read -r -t "${1:-10}" line <&3; do
    printf '%s\n' "$line"
    if [ "$line" = "</metrics>" ]; then
        IFS= read -r -t "${1:-10}" line <&3 && printf '%s\n' "$line"
        exit 0
    fi
done
exit 4
"""

# The daemon-restart test's readers, run in the background until /tmp/vh-stop
# exists. vh-read-loop.py (Python guest): the guest package's own readers, the
# disk found by scanning like vm-dump-metrics -b, then the virtio port; one JSON
# line per read with the outcome (the document's Time and VM ids, or the
# error's class), and /tmp/vh-loop.done at the end.
VH_READ_LOOP = r"""
import json
import os
import sys
import time

from vhostmd.guest import api
from vhostmd.guest.errors import MetricsError

out = open(sys.argv[1], "w", buffering=1)
while not os.path.exists("/tmp/vh-stop"):
    for transport in ("vbd", "virtio"):
        record = {"t": transport}
        try:
            if transport == "vbd":
                doc = api.read_vbd(timeout=2.0)
            else:
                doc = api.read_virtio(timeout=2.0)
            record["time"] = doc.get("Time")
            record["vms"] = sorted({m.uuid for m in doc.metrics if m.context == "vm"})
        except MetricsError as exc:
            record["error"] = type(exc).__name__
            record["msg"] = str(exc)
        out.write(json.dumps(record) + "\n")
out.close()
open("/tmp/vh-loop.done", "w").close()
"""

# vh-snap-loop (any guest): the metrics disk read raw, bypassing the page cache,
# as fast as busybox can, twice in a row each round. When both reads carry the
# same header, the first read's content was read while the header did not
# change: the pair is a stable read and its first copy is kept (one file per
# distinct content). Counts rounds in /tmp/vh-rounds.
VH_SNAP_LOOP = r"""#!/bin/sh
mkdir -p /tmp/snaps
rounds=0
while [ ! -e /tmp/vh-stop ]; do
    dd if=/dev/vda of=/tmp/snap-a bs=4096 count=16 iflag=direct 2>/dev/null
    dd if=/dev/vda of=/tmp/snap-b bs=4096 count=1 iflag=direct 2>/dev/null
    a=$(head -c 16 /tmp/snap-a | md5sum); b=$(head -c 16 /tmp/snap-b | md5sum)
    if [ "$a" = "$b" ]; then
        sum=$(md5sum < /tmp/snap-a)
        mv /tmp/snap-a "/tmp/snaps/${sum%% *}"
    fi
    rounds=$((rounds + 1))
    echo $rounds > /tmp/vh-rounds
done
touch /tmp/vh-loop.done
"""


def _module_order(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Module files (relative to ``modules_dir``) for ``wanted``, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
        by_name[Path(target).name.split(".ko")[0].replace("-", "_")] = target
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name not in by_name:
            raise RuntimeError(f"kernel module {name} not in {modules_dir}/modules.dep")
        visit(by_name[name])
    return order


def _base_image(modules_dir: Path, modules: Sequence[str] = MODULES) -> bytes:
    image = Cpio()
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp",
                      "etc", "lib/modules"):
        image.directory(directory)
    image.chardev("dev/console", 5, 1)  # PID 1's stdin/stdout before devtmpfs is mounted
    image.host_file(BUSYBOX, "bin/busybox")
    image.file("init", INIT.encode(), 0o755)
    image.file("bin/vh-disk", VH_DISK.encode(), 0o755)
    image.file("bin/vh-virtio", VH_VIRTIO.encode(), 0o755)
    image.file("bin/vh-snap-loop", VH_SNAP_LOOP.encode(), 0o755)
    order = _module_order(modules_dir, modules)
    for module in order:
        image.host_file(modules_dir / module, f"lib/modules/{Path(module).name}")
    image.file("etc/vh-modules", "".join(f"{Path(m).name}\n" for m in order).encode())
    return image.bytes()


def _elf_libraries(paths: Iterable[Path]) -> set[str]:
    """The shared libraries (and the loader) the ELF files need, as ldd resolves them."""
    libs: set[str] = set()
    for path in paths:
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
        for line in out.stdout.splitlines():
            match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if match:
                libs.add(match.group(1))
    return libs


# Run on the host with the interpreter the guest gets: imports and exercises the
# guest package the way the guest will, then prints every module file it loaded.
_DISCOVER = r"""
import contextlib, io, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import vhostmd.guest.cli as cli
from vhostmd.guest import vbd, virtio
from vhostmd.guest.errors import MetricsError
import os, json
disk = sys.argv[3]
textfile = sys.argv[4]
for args in (["--help"], ["--bogus"], ["--disk", disk], ["--disk", disk, "--format", "json"],
             ["--disk", disk, "--metric", "X"], ["-b", "--timeout", "0.1"],
             ["-i", "--port", "/nonexistent", "--timeout", "0.1"],
             ["--disk", disk, "--format", "prometheus"], ["--disk", disk, "--textfile", textfile],
             ["--disk", "/nonexistent", "--port", "/nonexistent", "--textfile", textfile]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main(args)
        except SystemExit:
            pass
files = sorted({getattr(m, "__file__", None) or "" for m in list(sys.modules.values())} - {""})
print(json.dumps(files))
"""


def _python_image(stage_root: Path) -> bytes:
    """The host's Python, lxml and the project's guest package, at the paths a Debian
    guest has them (/usr/share/vhostmd, /usr/sbin/vm-dump-metrics), as a second
    initramfs archive appended to the base one."""
    import py_compile
    import sysconfig

    import lxml
    import prometheus_client

    image = Cpio()
    python = Path(os.path.realpath(sys.executable))
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    # The guest package as debian/vm-dump-metrics.install lays it out: core/*.py
    # is the vhostmd package, guest/ is vhostmd.guest.
    share = stage_root / "usr/share/vhostmd"
    (share / "vhostmd/guest").mkdir(parents=True, exist_ok=True)
    for src in (REPO / "core").glob("*.py"):
        shutil.copy(src, share / "vhostmd" / src.name)
    for src in (REPO / "guest").glob("*.py"):
        shutil.copy(src, share / "vhostmd/guest" / src.name)
    site = stage_root / "site"
    site.mkdir(exist_ok=True)
    lxml_dir = Path(lxml.__file__).resolve().parent
    (site / "lxml").symlink_to(lxml_dir)
    # --format prometheus: the text format from prometheus_client (pure Python).
    prometheus_dir = Path(prometheus_client.__file__).resolve().parent
    (site / "prometheus_client").symlink_to(prometheus_dir)
    sample = stage_root / "sample-disk"
    content = b"<metrics>\n</metrics>\n"
    sample.write_bytes(b"mvbd" + bytes(4) + sum(content).to_bytes(4, "big")
                       + len(content).to_bytes(4, "big") + content + bytes(4096))
    found = subprocess.run([str(python), "-I", "-c", _DISCOVER, str(share), str(site),
                            str(sample), str(stage_root / "discover.prom")],
                           capture_output=True, text=True, check=True, timeout=120)
    files = [Path(f) for f in json.loads(found.stdout.strip().splitlines()[-1])]
    # encodings are looked up by name at run time (locale, codecs); take them all.
    files += sorted((stdlib / "encodings").glob("*.py"))
    elves = [python]
    pyc_mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
    for file in files:
        file = file.resolve()
        if file.is_relative_to(stdlib):
            dest = stdlib / file.relative_to(stdlib)
        elif file.is_relative_to(lxml_dir):
            dest = Path("/usr/lib/python3/dist-packages/lxml") / file.relative_to(lxml_dir)
        elif file.is_relative_to(prometheus_dir):
            dest = (Path("/usr/lib/python3/dist-packages/prometheus_client")
                    / file.relative_to(prometheus_dir))
        elif file.is_relative_to(share.resolve()):
            dest = Path("/usr/share/vhostmd") / file.relative_to(share.resolve())
        else:
            continue  # the rig itself, pytest...: not imported by the guest
        if file.suffix == ".py":
            # Sourceless .pyc next to where the .py would be: no compiling under TCG.
            pyc = stage_root / "pyc" / dest.relative_to("/").with_suffix(".pyc")
            pyc.parent.mkdir(parents=True, exist_ok=True)
            py_compile.compile(str(file), cfile=str(pyc), dfile=str(dest), doraise=True,
                               invalidation_mode=pyc_mode)
            image.file(str(dest.with_suffix(".pyc")), pyc.read_bytes())
        else:
            image.file(str(dest), file.read_bytes(), 0o755)
            elves.append(file)
    # The interpreter finds its prefix by this landmark; the .pyc stands in for os.py.
    image.directory(str(stdlib / "lib-dynload"))
    image.host_file(python, str(python))
    image.symlink("usr/bin/python3", str(python))
    for lib in sorted(_elf_libraries(elves)):
        image.host_file(lib)
    launcher = (REPO / "debian/scripts/vm-dump-metrics").read_bytes()
    image.file("usr/sbin/vm-dump-metrics", launcher, 0o755)
    image.file("usr/local/bin/vh-read-loop.py", VH_READ_LOOP.encode(), 0o644)
    return image.bytes()


@dataclass(frozen=True)
class Images:
    kernel: Path
    base: Path  # busybox, virtio modules, /init
    python: Path  # base + the host's Python, lxml and the guest package
    key: str


def _cache_dir() -> Path:
    explicit = os.environ.get("VHOSTMD_QEMU_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vhostmd-qemu"


def _kernel_cache_dir() -> Path:
    """The downloaded kernel package and what is extracted from it: beside the image
    cache, not in it (image directories are pruned there)."""
    images = _cache_dir()
    return images.with_name(images.name + "-kernel")


def _inputs_key(kernel: Path, modules: Path, wanted: Sequence[str] = MODULES) -> str:
    """A hash of everything the images are built from: a change anywhere rebuilds."""
    import lxml
    import prometheus_client

    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    for path in [kernel, BUSYBOX, Path(os.path.realpath(sys.executable)),
                 Path(lxml.__file__).resolve().parent / "etree.pyx",
                 Path(prometheus_client.__file__).resolve(),
                 REPO / "debian/scripts/vm-dump-metrics",
                 *sorted((REPO / "core").glob("*.py")), *sorted((REPO / "guest").glob("*.py"))]:
        st = path.stat()
        digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        if path.suffix == ".py":
            digest.update(path.read_bytes())  # sources: content, not just time
    digest.update(str(modules).encode())
    digest.update(" ".join(wanted).encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:16]


def build_images(cache: Path | None = None) -> Images:
    """The kernel and both initramfs images, from the cache when nothing changed."""
    found = find_kernel()
    if found is None:
        raise RuntimeError("no Debian cloud kernel (apt-get install linux-image-cloud-amd64)")
    return _build_images(found, MODULES, cache)


def build_usb_images(cache: Path | None = None) -> Images:
    """As build_images, on Debian's generic kernel with USB_MODULES (PVC's USB disk)."""
    found = find_usb_kernel()
    if found is None:
        raise RuntimeError(why_no_usb_kernel() or "no generic kernel")
    return _build_images(found, USB_MODULES, cache)


def _build_images(found: tuple[Path, Path], wanted: Sequence[str],
                  cache: Path | None) -> Images:
    kernel, modules = found
    key = _inputs_key(kernel, modules, wanted)
    where = (cache or _cache_dir()) / key
    base, python = where / "base.cpio", where / "python.cpio"
    if base.is_file() and python.is_file():
        return Images(kernel, base, python, key)
    started = time.monotonic()
    where.mkdir(parents=True, exist_ok=True)
    stage = where / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    base_bytes = _base_image(modules, wanted)
    # The kernel unpacks concatenated archives one after the other.
    python_bytes = base_bytes + _python_image(stage)
    for path, data in ((base, base_bytes), (python, python_bytes)):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(path)  # atomic: a half-built image is never picked up
    shutil.rmtree(stage, ignore_errors=True)
    # Every change to the guest package makes a new key: keep the newest few only
    # (of the image directories: the downloaded package and its kernel stay).
    older = sorted((d for d in where.parent.iterdir() if d.is_dir() and d != where
                    and re.fullmatch(r"[0-9a-f]{16}", d.name)),
                   key=lambda d: d.stat().st_mtime, reverse=True)
    for old in older[3:]:
        shutil.rmtree(old, ignore_errors=True)
    log(f"built guest images in {time.monotonic() - started:.1f} s: {where} "
        f"(base {len(base_bytes) >> 10} KiB, python {len(python_bytes) >> 10} KiB)")
    return Images(kernel, base, python, key)


# --------------------------------------------------------------------------- libvirtd


def virsh(*args: str, timeout: float = 60.0, check: bool = True) -> str:
    """``virsh -c qemu:///system ARGS``; its stdout."""
    proc = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)}: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


def domstats(name: str, *groups: str) -> dict[str, str]:
    """``virsh domstats --GROUP... NAME`` as a dict (e.g. {'balloon.current': '196608'})."""
    out = virsh("domstats", *(f"--{g}" for g in groups), name)
    stats = {}
    for line in out.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            stats[key] = value
    return stats


LIBVIRTD_CONF = """# vhostmd test rig: root only, no polkit.
unix_sock_group = "root"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
"""

QEMU_CONF_TEXT = f"""{QEMU_CONF_MARK}
# Removed again when the tests stop. QEMU runs as root; a container has no
# security driver to offer and no cgroup controllers to give away.
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
"""


def _answers() -> bool:
    try:
        return subprocess.run(["virsh", "-c", URI, "uri"], capture_output=True,
                              timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _wait(predicate: Callable[[], object], timeout: float, what: str,
          interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class LibvirtQemu:
    """``qemu:///system``: the running libvirtd if one answers, else one set up here.

    Holds a machine-wide lock for as long as it is in use, so that two test runs
    (several checkouts on one machine) never set up or tear down under each other.
    """

    def __init__(self, work: Path) -> None:
        self.work = work
        self.started: list[subprocess.Popen[bytes]] = []
        self.created_user = False
        self.created_groups: list[str] = []
        self.wrote_conf = False
        self.own = False
        self._lock: int | None = None
        self.hook_paths: list[str] = []  # hook scripts and directories made here, to remove

    def start(self, lock_timeout: float = 600.0) -> LibvirtQemu:
        self._take_lock(lock_timeout)
        try:
            return self._start()
        except BaseException:
            self.stop()  # a half set-up host is undone as a whole one is
            raise

    def _start(self) -> LibvirtQemu:
        self._recover()
        if _answers():
            log(f"using the libvirtd that already serves {URI}")
            return self
        if QEMU_CONF.exists() and QEMU_CONF_MARK not in QEMU_CONF.read_text(errors="replace"):
            raise RuntimeError(
                f"{QEMU_CONF} exists (a libvirtd is configured here) but nothing serves {URI}: "
                "start that libvirtd; the tests set one up only where none is configured")
        self.own = True
        started = time.monotonic()
        self._accounts()
        for directory in ("/var/log/libvirt/qemu", "/var/lib/libvirt/qemu", "/run/libvirt",
                          "/var/cache/libvirt/qemu"):
            os.makedirs(directory, exist_ok=True)
        # Absent, or left by a run of ours that was killed: ours to write and remove.
        QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
        QEMU_CONF.write_text(QEMU_CONF_TEXT)
        self.wrote_conf = True
        self.work.mkdir(parents=True, exist_ok=True)
        if not self._virtlogd_answers():
            self._spawn("virtlogd", ["virtlogd", "-p", str(self.work / "virtlogd.pid")])
            _wait(self._virtlogd_answers, 30, "virtlogd")
        # Only the QEMU driver: the network, storage... drivers would touch more of
        # the host and are not needed to run our guests.
        drivers = self.work / "drivers"
        drivers.mkdir(exist_ok=True)
        link = drivers / QEMU_DRIVER.name
        if not link.exists():
            link.symlink_to(QEMU_DRIVER)
        conf = self.work / "libvirtd.conf"
        conf.write_text(LIBVIRTD_CONF)
        self._spawn("libvirtd", ["libvirtd", "-f", str(conf), "-p", str(self.work /
                                                                          "libvirtd.pid")],
                    env=dict(os.environ, LIBVIRT_DRIVER_DIR=str(drivers)))
        _wait(lambda: self._check_alive() and _answers(), 90, f"libvirtd to serve {URI}",
              interval=0.25)
        self._save_state()
        log(f"started libvirtd and virtlogd for {URI} in {time.monotonic() - started:.1f} s")
        return self

    def _save_state(self) -> None:
        """What a killed run leaves behind, for the next run to undo (see _recover)."""
        STATE_FILE.write_text(json.dumps({
            "pids": [proc.pid for proc in self.started], "created_user": self.created_user,
            "created_groups": self.created_groups, "wrote_conf": self.wrote_conf,
            "hook_paths": self.hook_paths}))

    def _recover(self) -> None:
        """Undo the setup of a run that was killed before it could (SIGKILL, a
        pytest-timeout): its guests, libvirtd, virtlogd, accounts and qemu.conf."""
        try:
            state = json.loads(STATE_FILE.read_text())
        except (OSError, ValueError):
            return
        log("undoing the setup of a real-hypervisor test run that was killed")
        if _answers():
            for name in virsh("list", "--all", "--name", check=False).split():
                if name.startswith(GUEST_PREFIX):
                    virsh("destroy", name, check=False)
                    virsh("undefine", name, check=False)  # a defined (persistent) guest
        for pid in state.get("pids", []):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm in ("libvirtd", "virtlogd"):
                os.kill(pid, signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    _wait(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 30, comm)
        # stop() undoes the rest when this run ends, as if it had been done here.
        self.created_user = bool(state.get("created_user"))
        self.created_groups = list(state.get("created_groups", []))
        self.wrote_conf = bool(state.get("wrote_conf"))
        self.hook_paths = list(state.get("hook_paths", []))
        self._remove_hooks()  # before a libvirtd starts and finds them
        STATE_FILE.unlink(missing_ok=True)

    def _take_lock(self, timeout: float) -> None:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    log(f"waiting for another real-hypervisor test run ({LOCK_FILE})")
                    said = True
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(
                        f"{LOCK_FILE} held by another test run for {timeout:g} s") from None
                time.sleep(0.5)
        self._lock = fd

    def _accounts(self) -> None:
        # Debian's QEMU driver looks up its built-in user and group (libvirt-qemu)
        # before it reads qemu.conf, so they must exist even with user = "root".
        # They are made as libvirt-daemon-system makes them (user in group kvm).
        for group in ("kvm", "libvirt-qemu"):
            try:
                grp.getgrnam(group)
            except KeyError:
                subprocess.run(["groupadd", "--system", group], check=True)
                self.created_groups.append(group)
        try:
            pwd.getpwnam("libvirt-qemu")
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--gid", "kvm",
                            "--groups", "libvirt-qemu", "--home-dir", "/var/lib/libvirt",
                            "--shell", "/usr/sbin/nologin", "libvirt-qemu"], check=True)
            self.created_user = True

    @staticmethod
    def _virtlogd_answers() -> bool:
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect("/run/libvirt/virtlogd-sock")
                return True
            except OSError:
                return False

    def _spawn(self, what: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        logfile = open(self.work / f"{what}.log", "ab")  # noqa: SIM115 - child keeps it
        with logfile:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logfile,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started.append(proc)

    def _check_alive(self) -> bool:
        for proc in self.started:
            if proc.poll() is not None:
                tail = (self.work / f"{Path(str(proc.args[0])).name}.log").read_text(
                    errors="replace")[-2000:]
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{tail}")
        return True

    def stop(self) -> None:
        """Stop what was started here (libvirtd first, then virtlogd) and undo the setup."""
        try:
            for proc in reversed(self.started):
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(10)
            self.started.clear()
            self._remove_hooks()
            STATE_FILE.unlink(missing_ok=True)
            if self.wrote_conf:
                QEMU_CONF.unlink(missing_ok=True)
                self.wrote_conf = False
            if self.created_user:
                subprocess.run(["userdel", "libvirt-qemu"], capture_output=True, check=False)
                self.created_user = False
            for group in reversed(self.created_groups):
                subprocess.run(["groupdel", group], capture_output=True, check=False)
            self.created_groups.clear()
        finally:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None

    def domain_type(self) -> str:
        return "kvm" if kvm_usable() else "qemu"

    # -- hooks

    def add_hook(self, name: str, script: str, timeout: float = 60.0) -> None:
        """Install ``script`` as the QEMU hook ``qemu.d/NAME`` of the running libvirtd.

        libvirtd looks for hooks when it starts, and again on SIGHUP (what
        ``systemctl reload libvirtd`` sends): the rig sends SIGHUP and waits
        until libvirtd ran the daemon hook ``daemon.d/NAME`` for that reload, so
        the QEMU hook runs for every domain started afterwards. Only for a
        libvirtd the rig started (RuntimeError otherwise); removed by stop().
        """
        if not self.own or not self.started:
            raise RuntimeError("hooks are only installed for a libvirtd the rig started")
        reloads = self.work / f"{name}.reloads"
        reloads.unlink(missing_ok=True)
        for kind, text in (("qemu", script),
                           ("daemon", f'#!/bin/sh\necho "$2 $3" >> {reloads}\n')):
            directory = HOOKS_DIR / f"{kind}.d"
            for path in (HOOKS_DIR, directory):
                if not path.is_dir():
                    path.mkdir(mode=0o755)
                    self.hook_paths.append(str(path))
            hook = directory / name  # one left by a killed run is replaced
            self.hook_paths.append(str(hook))
            self._save_state()
            hook.write_text(text)
            hook.chmod(0o755)
        libvirtd = next(proc for proc in self.started if proc.args[0] == "libvirtd")
        os.kill(libvirtd.pid, signal.SIGHUP)
        _wait(lambda: "reload begin" in (reloads.read_text() if reloads.exists() else ""),
              timeout, f"libvirtd to reload its hooks ({reloads})", interval=0.05)

    def _remove_hooks(self) -> None:
        """The hook scripts, then the directories made for them (deepest first)."""
        for path in reversed(self.hook_paths):
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)  # only if empty: someone else's hooks stay
                else:
                    os.unlink(path)
        self.hook_paths.clear()


# --------------------------------------------------------------------------- guests


@dataclass
class Result:
    rc: int
    out: bytes

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "replace")


class GuestError(AssertionError):
    """A guest that did not boot or answer; the message ends with its console's tail."""


_FRAME = re.compile(rb"^@@VH (\S+) (BEGIN|D|END|READY|LOG)(?: (.*))?$")


@dataclass
class GuestSpec:
    name: str
    python: bool = False  # the image with Python, lxml and vm-dump-metrics
    memory_kib: int = 256 * 1024  # <memory>: what the balloon can give back
    current_kib: int = 192 * 1024  # <currentMemory>: the balloon's target at start
    vcpus: int = 2  # <vcpu>: the maximum
    current_vcpus: int = 1  # <vcpu current=...>: online at start
    uuid: str = field(default_factory=lambda: str(uuid_mod.uuid4()))
    # The vhostmd devices: the metrics disk given to Guest (as vda, read-only,
    # shareable) and the channel. Turn them off to attach devices of your own in
    # extra_devices (e.g. what `vhostmd --domain-xml` prints); VH_DISK_DEV=/dev/vdb
    # in a command points vh-disk at another device.
    metrics_disk: bool = True
    channel: bool = True
    extra_devices: str = ""  # more <devices> children, verbatim
    # The domain's USB controller as PVC's XML has it (<controller type='usb'
    # index='0'/>: libvirt's default model); without, no USB at all.
    usb: bool = False


class Guest:
    """One QEMU domain and the host's end of its serial console.

    Transient (``virsh create`` on each start) unless :meth:`define` made it
    persistent: then each start is ``virsh start`` of the definition, which
    ``virsh attach-device --config`` may have changed meanwhile.
    """

    def __init__(self, spec: GuestSpec, images: Images, disk: Path, work: Path,
                 domain_type: str) -> None:
        self.spec = spec
        self.name = spec.name
        self.uuid = spec.uuid
        self.images = images
        self.disk = disk
        self.domain_type = domain_type
        self.console_path = work / f"{spec.name}.console"
        self.console_log = work / f"{spec.name}.console.log"
        self.sock: socket.socket | None = None
        self.buffer = bytearray()
        self.lines: list[bytes] = []
        self.cond = threading.Condition()
        self.reader: threading.Thread | None = None
        self.next_id = 0
        self.boot_seconds: float | None = None
        self.started_at = 0.0
        self.defined = False

    def xml(self) -> str:
        spec = self.spec
        initrd = self.images.python if spec.python else self.images.base
        return f"""<domain type='{self.domain_type}'>
  <name>{spec.name}</name>
  <uuid>{spec.uuid}</uuid>
  <memory unit='KiB'>{spec.memory_kib}</memory>
  <currentMemory unit='KiB'>{spec.current_kib}</currentMemory>
  <vcpu placement='static' current='{spec.current_vcpus}'>{spec.vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{self.images.kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 loglevel=1 panic=-1 rdinit=/init</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU}</emulator>
{self._vhostmd_devices()}
    <serial type='unix'>
      <source mode='bind' path='{self.console_path}'/>
      <target port='0'/>
    </serial>
    {self._usb_controller()}
    <memballoon model='virtio'/>
{spec.extra_devices}
  </devices>
</domain>
"""

    def _usb_controller(self) -> str:
        return ("<controller type='usb' index='0'/>" if self.spec.usb
                else "<controller type='usb' model='none'/>")

    def _vhostmd_devices(self) -> str:
        devices = []
        if self.spec.metrics_disk:
            devices.append(f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{self.disk}'/>
      <target dev='vda' bus='virtio'/>
      <readonly/>
      <shareable/>
    </disk>""")
        if self.spec.channel:
            devices.append(f"""    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='{PORT_NAME}'/>
    </channel>""")
        return "\n".join(devices)

    # -- lifecycle

    def define(self) -> None:
        """Define the domain persistently (shut off); :meth:`start` then starts it."""
        if self.name in virsh("list", "--all", "--name").split():
            virsh("destroy", self.name, check=False)  # left by a killed run
            virsh("undefine", self.name, check=False)
        xml_file = self.console_path.with_suffix(".xml")
        xml_file.write_text(self.xml())
        virsh("define", str(xml_file))
        self.defined = True

    def undefine(self) -> None:
        """Stop the domain if it runs and remove its definition."""
        self.destroy()
        if self.defined:
            virsh("undefine", self.name, check=False)
            self.defined = False

    def start(self, create: Callable[[str], object] | None = None) -> None:
        """Create the domain (transient) or start its definition, and connect to its
        console; do not wait for boot. ``create``: how a transient domain is created
        from its XML (default ``virsh create``)."""
        self.close_console()
        self.console_path.unlink(missing_ok=True)
        xml_file = self.console_path.with_suffix(".xml")
        if not self.defined:
            xml_file.write_text(self.xml())
        if self.name in virsh("list", "--name").split():
            virsh("destroy", self.name, check=False)  # left running by a killed run
        self.started_at = time.monotonic()
        self.boot_seconds = None
        if self.defined:
            virsh("start", self.name, timeout=120)
        elif create is not None:
            create(self.xml())
        else:
            virsh("create", str(xml_file), timeout=120)
        self._connect_console()

    def save(self, path: Path) -> None:
        """``virsh save``: the guest's state to ``path``; a transient domain is gone then."""
        virsh("save", self.name, str(path), timeout=300)
        self.close_console()

    def restore(self, path: Path) -> None:
        """``virsh restore`` of what :meth:`save` wrote; the console again (the guest goes
        on where it was: no boot)."""
        self.console_path.unlink(missing_ok=True)
        virsh("restore", str(path), timeout=300)
        self._connect_console()

    def _connect_console(self) -> None:
        # libvirt starts QEMU paused and resumes it once set up, and QEMU listens
        # before that: what the guest prints from its first line on reaches us.
        _wait(self.console_path.exists, 30, f"{self.name}'s console socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.console_path))
        self.sock = sock
        with self.cond:
            self.buffer.clear()
            self.lines.clear()
        self.reader = threading.Thread(target=self._read_console, args=(sock,),
                                       name=f"console-{self.name}", daemon=True)
        self.reader.start()

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait for /init's READY line; the boot time in seconds."""
        self._wait_line(lambda line: line.startswith(b"@@VH READY"), timeout, "boot")
        self.boot_seconds = time.monotonic() - self.started_at
        return self.boot_seconds

    def destroy(self) -> None:
        virsh("destroy", self.name, check=False, timeout=60)
        self.close_console()

    def close_console(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None
        if self.reader is not None:
            self.reader.join(5)
            self.reader = None

    def domain_id(self) -> int:
        return int(virsh("domid", self.name).strip())

    def channel_path(self) -> str:
        """Where libvirt put the vhostmd channel's socket (the domain XML has no path)."""
        match = re.search(r"<channel type='unix'>\s*<source mode='bind' path='([^']+)'",
                          virsh("dumpxml", self.name))
        if match is None:
            raise self._fail("no vhostmd channel path in the live domain XML")
        return match.group(1)

    def channel_clients(self, path: str | None = None) -> dict[int, str]:
        """pid -> command line of the processes connected to this guest's channel socket
        (at ``path`` if given: what :meth:`channel_path` said for this run of the VM).

        QEMU accepts one client: whoever is connected here is the daemon that
        serves this guest (``ss`` pairs QEMU's end with the client's by inode).
        """
        path = path or self.channel_path()
        out = subprocess.run(["ss", "-xpn"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
        peers: set[str] = set()
        inode_pids: dict[str, set[int]] = {}
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 8 or fields[0] != "u_str":
                continue
            local, inode, peer_inode = fields[4], fields[5], fields[7]
            if local == path:
                peers.add(peer_inode)
            inode_pids.setdefault(inode, set()).update(
                int(pid) for pid in re.findall(r"pid=(\d+)", line))
        clients: dict[int, str] = {}
        for peer in peers:
            for pid in inode_pids.get(peer, ()):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                clients[pid] = cmd.replace(b"\0", b" ").decode(errors="replace").strip()
        return clients

    def running(self) -> bool:
        return virsh("domstate", self.name, check=False).strip() == "running"

    # -- console

    def _read_console(self, sock: socket.socket) -> None:
        with open(self.console_log, "ab") as logfile:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                with self.cond:
                    if data:
                        logfile.write(data)
                        self.buffer += data
                        *complete, rest = self.buffer.split(b"\n")
                        self.lines += [line.rstrip(b"\r") for line in complete]
                        self.buffer[:] = rest
                    else:
                        self.lines.append(b"@@VH CLOSED")
                    self.cond.notify_all()
                if not data:
                    return

    def console_tail(self, size: int = 3000) -> str:
        try:
            data = self.console_log.read_bytes()[-size:]
        except OSError:
            return "(no console output)"
        return data.decode("utf-8", "replace")

    def _fail(self, what: str) -> GuestError:
        state = virsh("domstate", self.name, check=False).strip() or "gone"
        return GuestError(f"{self.name} ({state}): {what}; console tail:\n{self.console_tail()}")

    def _wait_line(self, match: Callable[[bytes], bool], timeout: float, what: str,
                   start: int = 0) -> int:
        """Index of the first console line from ``start`` on that matches."""
        deadline = time.monotonic() + timeout
        with self.cond:
            index = start
            while True:
                while index < len(self.lines):
                    if match(self.lines[index]):
                        return index
                    if self.lines[index] == b"@@VH CLOSED":
                        raise self._fail(f"console closed while waiting for {what}")
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._fail(f"no {what} within {timeout:g} s")
                self.cond.wait(min(remaining, 1.0))

    def _send(self, line: str) -> int:
        """Send one line; the index in ``lines`` from which its answer can come."""
        if self.sock is None:
            raise self._fail("console not connected")
        with self.cond:
            mark = len(self.lines)
        self.sock.sendall(line.encode() + b"\n")
        return mark

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT, *,
            check: bool = False) -> Result:
        """Run ``command`` with busybox sh in the guest; its exit status and output.

        The guest kills the command after ``timeout`` s (exit status 137); the host
        gives up 30 s later. Garbled output is fetched again, up to seven times.
        """
        self.next_id += 1
        ident = f"c{self.next_id}"
        encoded = base64.b64encode(command.encode()).decode()
        mark = self._send(f"{ident} run {max(1, int(timeout))} {encoded}")
        for _attempt in range(8):
            result = self._collect(ident, mark, timeout + 30)
            if result is not None:
                if check and result.rc != 0:
                    raise self._fail(f"{command!r} exited with {result.rc}: {result.text}")
                return result
            mark = self._send(f"{ident} resend")
        raise self._fail(f"output of {command!r} garbled eight times")

    def _collect(self, ident: str, mark: int, timeout: float) -> Result | None:
        tag = ident.encode()
        end_mark = b"@@VH " + tag + b" END "
        # A kernel message may precede a marker on its line: look for it anywhere.
        end = self._wait_line(lambda line: end_mark in line, timeout,
                              f"the end of command {ident}", mark)
        with self.cond:
            lines = self.lines[mark:end + 1]
        try:
            begin = max(i for i, line in enumerate(lines)
                        if line.endswith(b"@@VH " + tag + b" BEGIN"))
        except ValueError:
            return None
        data = b""
        for line in lines[begin + 1:-1]:
            match = _FRAME.match(line)
            if not match or match.group(1) != tag or match.group(2) != b"D":
                return None  # a kernel message broke a line: ask again
            data += (match.group(3) or b"")
        fields = lines[-1][lines[-1].index(end_mark):].split()
        try:
            rc, size, digest = int(fields[3]), int(fields[4]), fields[5].decode()
            out = gzip.decompress(base64.b64decode(data, validate=True)) if data else b""
        except (IndexError, ValueError, OSError, EOFError):
            return None
        if len(out) != size or hashlib.sha256(out).hexdigest() != digest:
            return None
        return Result(rc, out)

    # -- what a guest reads

    def read_disk(self, size: int = 65536) -> bytes:
        """The first ``size`` bytes of the guest's virtio-blk metrics disk (O_DIRECT)."""
        result = self.run(f"vh-disk {size}")
        if result.rc != 0:
            raise self._fail(f"reading the metrics disk failed ({result.rc}): {result.text}")
        return result.out

    def read_virtio(self, timeout: float = 10.0) -> Result:
        """One ``GET /metrics/XML`` over the port, as busybox sh reads it."""
        return self.run(f"vh-virtio {int(timeout)}", timeout=timeout * 3)


def boot_guests(guests: Sequence[Guest], timeout: float = BOOT_TIMEOUT) -> dict[str, float]:
    """Start every guest at once and wait until all of them answer; boot seconds by name."""
    for guest in guests:
        guest.start()
    with ThreadPoolExecutor(len(guests)) as pool:
        times = list(pool.map(lambda g: g.wait_ready(timeout), guests))
    return {guest.name: seconds for guest, seconds in zip(guests, times, strict=True)}


@contextlib.contextmanager
def guests_running(specs: Sequence[GuestSpec], images: Images, disk: Path, work: Path,
                   domain_type: str) -> Iterator[list[Guest]]:
    """Boot the guests of ``specs`` together; destroy them afterwards, whatever happens."""
    guests = [Guest(spec, images, disk, work, domain_type) for spec in specs]
    try:
        boot_guests(guests)
        yield guests
    finally:
        for guest in guests:
            guest.destroy()


def shipped_config(disk: Path) -> str:
    """etc/vhostmd.conf as shipped, with only the metrics disk's path changed."""
    text = (REPO / "etc/vhostmd.conf").read_text()
    shipped = "<path>/dev/shm/vhostmd0</path>"
    if shipped not in text:
        raise RuntimeError(f"etc/vhostmd.conf no longer has {shipped}")
    return text.replace(shipped, f"<path>{disk}</path>")


@dataclass
class QemuHost:
    """Everything a real-guest test needs: qemu:///system, the images, a work directory."""

    libvirt: LibvirtQemu
    images: Images
    work: Path  # short: the console sockets live here (unix socket paths are limited)
    domain_type: str  # "kvm" or "qemu" (TCG)
    guests: list[Guest] = field(default_factory=list)

    def guest(self, spec: GuestSpec, disk: Path, images: Images | None = None) -> Guest:
        """A guest (not started yet) with ``disk`` as its metrics disk (and ``images``
        instead of the cloud kernel's, e.g. build_usb_images())."""
        guest = Guest(spec, images or self.images, disk, self.work, self.domain_type)
        self.guests.append(guest)
        return guest


@contextlib.contextmanager
def qemu_host() -> Iterator[QemuHost]:
    """Set up (or use) qemu:///system and build the images; undo the setup afterwards.

    Callers check :func:`why_no_qemu` first and skip with its reason.
    """
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="vhq-", dir="/tmp"))
    work.chmod(0o755)  # QEMU reads the kernel, initrd and disk from here
    libvirt = LibvirtQemu(work / "libvirt")
    libvirt.start()
    host: QemuHost | None = None
    try:
        images = build_images()
        domain_type = libvirt.domain_type()
        log(f"guests run with {'KVM' if domain_type == 'kvm' else 'TCG (no usable KVM)'}")
        host = QemuHost(libvirt, images, work, domain_type)
        yield host
    finally:
        try:
            for guest in host.guests if host else ():
                # A QEMU left running would outlive its libvirtd; a definition would
                # stay in /etc/libvirt/qemu.
                guest.undefine()
        finally:
            try:
                libvirt.stop()
            finally:
                if os.environ.get("VHOSTMD_QEMU_KEEP"):
                    log(f"kept {work} (consoles, daemon and libvirtd logs)")
                else:
                    shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- demo


def _section(title: str, body: str) -> None:
    print(f"\n==> {title}\n{body.rstrip()}", flush=True)


def demo(hold: bool = True) -> int:
    """Boot one real guest next to vhostmd (shipped configuration, qemu:///system)
    and show what the guest reads. ``./dev.sh demo-qemu`` runs this."""
    reason = why_no_qemu()
    if reason:
        print(f"demo-qemu: cannot run real guests here: {reason}", file=sys.stderr)
        return 1
    vhostmd = str(Path(sys.executable).parent / "vhostmd")
    with qemu_host() as host:
        disk = host.work / "vhostmd0"
        conf = host.work / "vhostmd.conf"
        conf.write_text(shipped_config(disk))
        with open(host.work / "vhostmd.log", "wb") as daemon_log:
            daemon = subprocess.Popen(
                [vhostmd, "-d", "-f", str(conf), "-c", URI, "-p", str(host.work / "vhostmd.pid")],
                stdin=subprocess.DEVNULL, stdout=daemon_log, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: disk.exists() and disk.stat().st_size > 0, 60, "the metrics disk")
            log(f"vhostmd runs (pid {daemon.pid}): etc/vhostmd.conf with the disk at {disk}")
            guest = host.guest(GuestSpec("vhostmd-demo", python=True), disk)
            guest.start()
            log(f"booting {guest.name} ({'KVM' if host.domain_type == 'kvm' else 'TCG'})...")
            log(f"{guest.name} booted in {guest.wait_ready():.1f} s")
            devices = re.findall(r"( *<(?:disk|channel) .*?</(?:disk|channel)>)",
                                 virsh("dumpxml", guest.name), re.S)
            _section("the domain's metrics disk and vhostmd channel (virsh dumpxml; libvirt "
                     "chose the channel's path)", "\n".join(devices))
            _section("in the guest: vm-dump-metrics -b (the metrics disk, found by scanning "
                     "the block devices)", guest.run("vm-dump-metrics -b").text)
            virtio = ""
            deadline = time.monotonic() + 4 * 5
            while time.monotonic() < deadline:  # served from the daemon's next cycle on
                result = guest.run("vm-dump-metrics -i")
                virtio = result.text
                if result.rc == 0:
                    break
                time.sleep(1)
            _section(f"in the guest: vm-dump-metrics -i (virtio-serial port {PORT_NAME}: "
                     "host metrics and this VM's own)", virtio)
            _section("in the guest: busybox reading the disk's header from /dev/vda "
                     "(signature, busy, checksum, length)",
                     guest.run("vh-disk 4096 | head -c 16 | hexdump -C").text)
            _section(f"on the host: virsh domstats {guest.name} (what the VM metrics come from)",
                     virsh("domstats", "--cpu-total", "--balloon", "--vcpu", guest.name))
            _section("on the host: the daemon's processes", subprocess.run(
                ["ps", "-o", "pid,cmd", "--ppid", str(daemon.pid), "--pid", str(daemon.pid)],
                capture_output=True, text=True).stdout)
            if hold:
                print("\n==> the guest and vhostmd keep running; Ctrl-C stops and removes them",
                      flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    signal.pause()
        finally:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="vhostmd's real-hypervisor test rig")
    parser.add_argument("command", choices=["demo", "build-images"])
    parser.add_argument("--once", action="store_true", help="demo: stop after showing")
    options = parser.parse_args()
    if options.command == "build-images":
        print(build_images())
        sys.exit(0)
    sys.exit(demo(hold=not options.once))
