"""Load and validate vhostmd.conf.

Accepts the upstream 1.2 file and PVC's file unchanged. The file is parsed with
entity expansion, DTD loading and network access off, validated against the
project's own DTD (etc/vhostmd.dtd, not whatever the DOCTYPE names), then
checked for ranges and duplicates. Every problem becomes one ConfigError line
naming the file, the line where known, and the problem.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from lxml import etree

from vhostmd import mdisk
from vhostmd.document import METRIC_TYPES
from vhostmd.etc import shipped
from vhostmd.wire import BuiltinRef, MetricDef, Variable
from vhostmd.workers.collectors import validate_ref
from vhostmd.xmlsafe import has_entity_refs, one_line, safe_parser, syntax_error

DEFAULT_CONFIG = "/etc/vhostmd/vhostmd.conf"
DEFAULT_DISK_PATH = "/dev/shm/vhostmd0"
DEFAULT_PERIOD = 5
DEFAULT_PATH = "/usr/sbin:/sbin:/usr/bin:/bin:/usr/share/vhostmd/scripts"
DEFAULT_MAX_CHANNELS = 1024
# Built-in collectors need one worker: a handful of jobs per cycle, host ones
# first (see WorkOrder), so a hung libvirt call delays no host metric; a second
# worker would cost 7 MiB and its wake-ups for nothing. Shell actions occupy a
# worker each while they run, and a hung one until its deadline.
DEFAULT_WORKERS_BUILTIN_ONLY = 1
DEFAULT_WORKERS = 4
MAX_WORKERS = 64
MAX_CHANNELS_LIMIT = 65536
# Where libvirt puts per-domain channel directories: since 2024, and before.
DEFAULT_CHANNEL_PATHS = ("/var/run/libvirt/qemu/channel", "/var/lib/libvirt/qemu/channel/target")
TRANSPORTS = ("vbd", "virtio")
UNITS = {"k": 1024, "m": 1024 * 1024}


class ConfigError(Exception):
    """A config that cannot be used; str() is one line: file:line: problem."""


@dataclass(frozen=True)
class Config:
    path: str
    disk_name: str = "host-metrics-disk"
    disk_path: str = DEFAULT_DISK_PATH
    disk_size: int = mdisk.DEFAULT_SIZE
    update_period: int = DEFAULT_PERIOD
    exec_path: str = DEFAULT_PATH
    transports: tuple[str, ...] = ("vbd",)
    channel_paths: tuple[str, ...] = DEFAULT_CHANNEL_PATHS
    max_channels: int = DEFAULT_MAX_CHANNELS
    expiration_time: int = 3 * DEFAULT_PERIOD
    workers: int = DEFAULT_WORKERS
    textfile: str | None = None  # health for node_exporter's textfile collector
    # <vm_disks>: the directory of per-VM disks (None: none) and each one's size.
    vm_disks_path: str | None = None
    vm_disks_size: int = mdisk.MIN_SIZE
    # False when <vm_disks> is given without <disk>: per-VM disks only.
    shared_disk: bool = True
    metrics: tuple[MetricDef, ...] = ()
    builtins: tuple[BuiltinRef, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def vbd(self) -> bool:
        """The shared metrics disk is written (vbd transport, and <disk> unless <vm_disks>)."""
        return "vbd" in self.transports and self.shared_disk

    @property
    def virtio(self) -> bool:
        return "virtio" in self.transports


def _dtd() -> etree.DTD:
    with open(shipped("vhostmd.dtd"), "rb") as f:
        return etree.DTD(f)


class _Reader:
    """Walks a validated tree; errors carry the file name and line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.warnings: list[str] = []

    def error(self, elem: etree._Element | None, problem: str) -> ConfigError:
        line = getattr(elem, "sourceline", None)
        where = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{where}: {problem}")

    def text(self, elem: etree._Element) -> str:
        text = (elem.text or "").strip()
        if not text:
            raise self.error(elem, f"<{elem.tag}> is empty")
        return text

    def integer(self, elem: etree._Element, low: int, high: int) -> int:
        text = self.text(elem)
        try:
            value = int(text)
        except ValueError:
            raise self.error(elem, f"<{elem.tag}> must be a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise self.error(elem, f"<{elem.tag}> {value} is out of range ({low}..{high})")
        return value

    def single(self, parent: etree._Element, tag: str) -> etree._Element | None:
        found = parent.findall(tag)
        if len(found) > 1:
            raise self.error(found[1], f"<{tag}> given more than once in <{parent.tag}>")
        return found[0] if found else None


def parse_config_bytes(data: bytes, path: str = "<config>") -> Config:
    """Parse and validate config bytes; raises ConfigError."""
    reader = _Reader(path)
    root = _valid_tree(data, path)
    globals_ = root.find("globals")
    kwargs: dict[str, object] = {"path": path}

    disk = reader.single(globals_, "disk")
    if disk is not None:
        _disk(reader, disk, path, kwargs)

    period_elem = reader.single(globals_, "update_period")
    period = DEFAULT_PERIOD
    if period_elem is not None:
        period = reader.integer(period_elem, 1, 86400)
    kwargs["update_period"] = period

    if (exec_path := reader.single(globals_, "path")) is not None:
        kwargs["exec_path"] = reader.text(exec_path)

    if (workers := reader.single(globals_, "workers")) is not None:
        kwargs["workers"] = reader.integer(workers, 1, MAX_WORKERS)

    if (textfile := reader.single(globals_, "textfile")) is not None:
        kwargs["textfile"] = _absolute(reader.text(textfile), path)
        if not kwargs["textfile"].endswith(".prom"):  # type: ignore[union-attr]
            reader.warnings.append(
                f"{path}:{textfile.sourceline}: <textfile> does not end in .prom; "
                "node_exporter's textfile collector only reads *.prom files")

    kwargs["transports"] = _transports(reader, globals_)

    vm_disks = reader.single(globals_, "vm_disks")
    if vm_disks is not None:
        _vm_disks(reader, vm_disks, path, kwargs, disk is not None)

    kwargs["expiration_time"] = 3 * period
    virtio = reader.single(globals_, "virtio")
    if virtio is not None:
        _virtio(reader, virtio, path, period, kwargs)

    metrics, builtins = _metrics_section(reader, root.find("metrics"))
    kwargs["metrics"] = metrics
    kwargs["builtins"] = builtins
    if "workers" not in kwargs:
        kwargs["workers"] = DEFAULT_WORKERS if metrics else DEFAULT_WORKERS_BUILTIN_ONLY
    kwargs["warnings"] = tuple(reader.warnings)
    return Config(**kwargs)  # type: ignore[arg-type]


def _valid_tree(data: bytes, path: str) -> etree._Element:
    """The file's tree: well-formed, no entity references, valid against vhostmd.dtd."""
    try:
        root = etree.fromstring(data, safe_parser(remove_comments=True))
    except etree.XMLSyntaxError as exc:
        line, message = syntax_error(exc)
        where = f"{path}:{line}" if line else path
        raise ConfigError(f"{where}: malformed XML: {message}") from None
    if has_entity_refs(root):
        raise ConfigError(
            f"{path}: entity declarations and references are not allowed in the config")
    dtd = _dtd()
    if not dtd.validate(root):
        err = dtd.error_log.filter_from_errors()[0] if dtd.error_log else None
        where = f"{path}:{err.line}" if err and err.line else path
        raise ConfigError(
            f"{where}: {one_line(err.message) if err else 'does not match vhostmd.dtd'}")
    return root


def _disk(reader: _Reader, disk: etree._Element, path: str, kwargs: dict[str, object]) -> None:
    """<disk>: the shared metrics disk."""
    if (name := reader.single(disk, "name")) is not None:
        kwargs["disk_name"] = reader.text(name)
    if (dpath := reader.single(disk, "path")) is not None:
        kwargs["disk_path"] = _absolute(reader.text(dpath), path)
    if (size := reader.single(disk, "size")) is not None:
        kwargs["disk_size"] = _disk_size(reader, size)


def _transports(reader: _Reader, globals_: etree._Element) -> tuple[str, ...]:
    """Every <transport>, once each, in file order; vbd when there is none."""
    transports: list[str] = []
    for elem in globals_.findall("transport"):
        value = reader.text(elem)
        if value == "xenstore":
            raise reader.error(elem, "transport 'xenstore' is not supported (use vbd or virtio)")
        if value not in TRANSPORTS:
            raise reader.error(elem, f"unknown transport {value!r} (use vbd or virtio)")
        if value not in transports:
            transports.append(value)
    return tuple(transports) or ("vbd",)


def _virtio(reader: _Reader, virtio: etree._Element, path: str, period: int,
            kwargs: dict[str, object]) -> None:
    """<virtio>: where channels are, how many, and when an idle one is closed."""
    if (cpath := reader.single(virtio, "channel_path")) is not None:
        kwargs["channel_paths"] = (_absolute(reader.text(cpath), path),)
    if (maxc := reader.single(virtio, "max_channels")) is not None:
        kwargs["max_channels"] = reader.integer(maxc, 1, MAX_CHANNELS_LIMIT)
    if (exp := reader.single(virtio, "expiration_time")) is not None:
        configured = reader.integer(exp, 1, 10 * 86400)
        if configured < 3 * period:
            reader.warnings.append(
                f"{path}:{exp.sourceline}: expiration_time {configured} is below "
                f"3 x update_period; using {3 * period}"
            )
        kwargs["expiration_time"] = max(configured, 3 * period)


def _metrics_section(reader: _Reader, metrics_elem: etree._Element | None
             ) -> tuple[tuple[MetricDef, ...], tuple[BuiltinRef, ...]]:
    """<metrics>: the shell-action metrics and the <builtin> elements, in file order."""
    metrics: list[MetricDef] = []
    builtins: list[BuiltinRef] = []
    for elem in metrics_elem if metrics_elem is not None else ():
        if elem.tag == "metric":
            metrics.append(_metric(reader, elem))
        elif elem.tag == "builtin":
            builtins.append(_builtin(reader, elem))
    return tuple(metrics), tuple(builtins)


def _vm_disks(reader: _Reader, elem: etree._Element, path: str, kwargs: dict[str, object],
              shared: bool) -> None:
    """<vm_disks>: a metrics disk per VM. Without <disk> beside it, no shared disk."""
    if "vbd" not in kwargs["transports"]:  # type: ignore[operator]
        raise reader.error(elem, "<vm_disks> are metrics disks: it needs <transport>vbd"
                           "</transport>")
    if (dpath := reader.single(elem, "path")) is None:
        raise reader.error(elem, "<vm_disks> needs a <path> (the directory of the VM disks)")
    kwargs["vm_disks_path"] = _absolute(reader.text(dpath), path)
    if (size := reader.single(elem, "size")) is not None:
        kwargs["vm_disks_size"] = _disk_size(reader, size)
    kwargs["shared_disk"] = shared


def _disk_size(reader: _Reader, elem: etree._Element) -> int:
    number = reader.integer(elem, 1, mdisk.MAX_SIZE)
    unit = (elem.get("unit") or "").lower()
    size = number * UNITS.get(unit, 1)
    if not mdisk.MIN_SIZE <= size <= mdisk.MAX_SIZE:
        raise reader.error(
            elem, f"disk size {size} bytes is out of range (64 KiB .. 256 MiB; guests read "
            "the disk in 64 KiB blocks)"
        )
    if size % mdisk.BLOCK_SIZE:
        whole = size - size % mdisk.BLOCK_SIZE
        reader.warnings.append(
            f"{reader.path}:{elem.sourceline}: disk size {size} bytes is not a multiple of "
            f"64 KiB; guests read the disk in whole 64 KiB blocks, so documents use only its "
            f"first {whole // 1024} KiB")
    return size


def _metric(reader: _Reader, elem: etree._Element) -> MetricDef:
    mtype = elem.get("type")
    assert mtype in METRIC_TYPES  # the DTD enumerates them
    name = reader.text(elem.find("name"))
    action = reader.text(elem.find("action"))
    variables = tuple(
        Variable(v.get("name", "").strip(), v.get("type", "")) for v in elem.findall("variable")
    )
    if mtype == "group" and not variables:
        raise reader.error(elem, f"group metric {name!r} needs at least one <variable>")
    if mtype != "group" and variables:
        raise reader.error(elem, f"metric {name!r}: <variable> is only allowed in a group")
    if any(not v.name for v in variables):
        raise reader.error(elem, f"metric {name!r}: a <variable> has an empty name")
    timeout = None
    if (raw := elem.get("timeout")) is not None:
        try:
            timeout = float(raw)
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= 86400:
            raise reader.error(elem, f"metric {name!r}: timeout {raw!r} is not a positive number")
    return MetricDef(
        name=name,
        type=mtype,
        context=elem.get("context", ""),
        action=action,
        unit=elem.get("unit") or None,
        variables=variables,
        timeout=timeout,
        line=elem.sourceline or 0,
    )


def _builtin(reader: _Reader, elem: etree._Element) -> BuiltinRef:
    ref = BuiltinRef(elem.get("set"), elem.get("name"), elem.get("context"), elem.sourceline or 0)
    if (ref.set is None) == (ref.name is None):
        raise reader.error(elem, "<builtin> needs exactly one of set= or name=")
    problem = validate_ref(ref)
    if problem is not None:
        raise reader.error(elem, problem)
    return ref


def _absolute(value: str, config_path: str) -> str:
    """A relative path in the config is relative to the config file's directory
    (the daemon runs in / once daemonized, so the working directory means nothing)."""
    if os.path.isabs(value) or config_path.startswith("<"):
        return value
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), value)


# Far beyond any real config (thousands of metrics fit in a few hundred KiB).
MAX_CONFIG_BYTES = 4 * 2**20


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError with a one-line reason."""
    path = str(path)
    try:
        # O_NONBLOCK: a FIFO named by mistake must not hang us before we can refuse it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: cannot read config: not a regular file")
        data = b""
        while len(data) <= MAX_CONFIG_BYTES and (chunk := os.read(fd, 1 << 16)):
            data += chunk
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config is larger than {MAX_CONFIG_BYTES // 2**20} MiB; "
                          "not reading it")
    return parse_config_bytes(data, path)
