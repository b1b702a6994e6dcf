"""The daemon's health for Prometheus, in node_exporter's textfile format.

With ``<textfile>PATH</textfile>`` in ``<globals>``, the supervisor rewrites
PATH after every cycle with the text of ``prometheus_client.generate_latest``.
The directory is often writable by another account (node_exporter's
``/var/lib/prometheus`` belongs to ``prometheus``), so the write never goes
through a name that account could plant or swap: the directory is opened
without following a link and used only if it belongs to root or to the
daemon's user and nobody else may write it (a sticky directory excepted);
the text goes to a temporary file created in that open directory, exclusively
and without following links, under an unpredictable name that does not end in
``.prom`` (the textfile collector ignores it); it is fsynced and renamed over
PATH within the same directory. An unsafe directory is logged once and the
file skipped. A write that fails removes its temporary file, is logged once
per episode (and once when it works again), and never stops the daemon.

The file is left in place when the daemon stops: an old
``vhostmd_last_cycle_timestamp_seconds`` is how a stopped (or hung) daemon
shows. Metrics come from a dedicated ``CollectorRegistry`` (not the global
one, which would add the supervisor's own process metrics) holding one
collector that reads the supervisor's state when the file is written.

Per-metric failures are labelled by metric name and context only, never by
VM: one series per failing metric, however many VMs it fails for.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from collections import Counter
from collections.abc import Iterator
from typing import Any

from vhostmd.mdisk import document_capacity
from vhostmd.supervisor.children import DISK_SEAT, EVENTS_SEAT, VIRTIO_SEAT

log = logging.getLogger("vhostmd")


ROLES = ("worker", "disk-writer", "virtio", "events")


def role_of(seat: int) -> str:
    """The ``role`` label of a seat: every worker is "worker"."""
    return {DISK_SEAT: "disk-writer", VIRTIO_SEAT: "virtio", EVENTS_SEAT: "events"}.get(
        seat, "worker")


class SupervisorCollector:
    """A prometheus_client collector over a running supervisor's state."""

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sup = self.supervisor
        stats = sup.stats
        config = sup.config

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("vhostmd_cycle_duration_seconds", "How long the last cycle took.",
                    stats["last_cycle_seconds"])
        yield gauge("vhostmd_last_cycle_timestamp_seconds",
                    "When the last cycle ended (Unix time).", sup.last_cycle_wall)
        yield CounterMetricFamily("vhostmd_cycles", "Cycles run since the daemon started.",
                                  value=stats["cycles"])
        yield CounterMetricFamily(
            "vhostmd_extra_cycles", "Cycles run at once on a libvirt lifecycle event.",
            value=sup.instant.extra_total)
        yield gauge("vhostmd_update_period_seconds", "The configured update_period.",
                    config.update_period)
        yield gauge("vhostmd_metrics_published", "Metrics published by the last cycle.",
                    stats["published"])
        yield gauge("vhostmd_metrics_left_out", "Metrics left out of the last cycle (failed).",
                    stats["left_out"])
        yield gauge("vhostmd_metrics_carried",
                    "Metric fragments kept from earlier cycles in the last document.",
                    stats["carried"])
        latest = sup.publisher.latest
        yield gauge("vhostmd_vms", "VMs in the last cycle's domain list.",
                    len(latest.domains) if latest is not None else 0)
        if config.vbd:
            yield gauge("vhostmd_document_bytes", "Size of the last metrics document.",
                        len(latest.document) if latest is not None else 0)
            yield gauge("vhostmd_disk_bytes", "Size of the metrics disk.", config.disk_size)
            yield gauge("vhostmd_disk_capacity_bytes", "Largest document the disk holds.",
                        document_capacity(config.disk_size))
            yield gauge("vhostmd_vms_not_on_disk", "VMs left out of the disk (too small).",
                        stats["vms_not_on_disk"])
        restarts = CounterMetricFamily("vhostmd_child_restarts",
                                       "Child processes restarted, by role.", labels=["role"])
        # Every role, wanted or not (no events child on the in-process test
        # driver): a series that comes and goes is harder to alert on.
        by_role: Counter[str] = Counter(dict.fromkeys(ROLES, 0))
        for seat in list(sup.pool.history):
            by_role[role_of(seat)] += sup.pool.restarts(seat)
        for role, count in sorted(by_role.items()):
            restarts.add_metric([role], count)
        yield restarts
        if config.virtio:
            channels = GaugeMetricFamily("vhostmd_virtio_channels",
                                         "Virtio channels of running VMs, by state.",
                                         labels=["state"])
            connected = sup.virtio_status[0] if sup.virtio_status is not None else 0
            channels.add_metric(["connected"], connected)
            channels.add_metric(["refused"], sup.virtio_refused)
            yield channels
        yield gauge("vhostmd_libvirt_events_connected",
                    "1 while libvirt lifecycle events are received, else 0 (then new VMs "
                    "wait for the next cycle).", 1 if sup.instant.connected else 0)
        failures = GaugeMetricFamily(
            "vhostmd_metric_failures",
            "Metrics failing now: how many hosts or VMs each is left out for.",
            labels=["metric", "context"])
        failing: Counter[tuple[str, str]] = Counter(
            (metric, context) for context, metric, _vm_id, _name in sup.failures.failing)
        for (metric, context), count in sorted(failing.items()):
            failures.add_metric([metric, context], count)
        yield failures


class HealthFile:
    """Writes the textfile after each cycle; remembers the current write error."""

    def __init__(self) -> None:
        self.error: str | None = None
        self._registry: Any = None
        self._for: Any = None

    def registry(self, supervisor: Any) -> Any:
        if self._for is not supervisor:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(SupervisorCollector(supervisor))
            self._for = supervisor
        return self._registry

    def write(self, path: str | None, supervisor: Any) -> None:
        if path is None:
            return
        from prometheus_client import generate_latest

        try:
            write_textfile(path, generate_latest(self.registry(supervisor)))
        except Exception as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if self.error != reason:
                if isinstance(exc, UnsafeDirectory):
                    log.warning("not writing the health textfile %s: %s", path, reason)
                else:
                    log.warning("cannot write the health textfile %s: %s", path, reason)
            self.error = reason
            return
        if self.error is not None:
            log.info("health textfile %s written again", path)
        self.error = None


class UnsafeDirectory(Exception):
    """The textfile's directory may be changed by another user; str() says why."""


def open_safe_directory(directory: str) -> int:
    """Open ``directory`` (not through a symlink) if only root or we may change it."""
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        me = os.geteuid()
        if st.st_uid not in (0, me):
            raise UnsafeDirectory(f"its directory {directory} belongs to uid {st.st_uid}, "
                                  f"not to root or uid {me}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafeDirectory(f"its directory {directory} can be written by group or "
                                  f"others (mode {stat.S_IMODE(st.st_mode):04o})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_textfile(path: str, text: bytes) -> None:
    """Replace ``path`` with ``text`` atomically, never through a planted or swapped name."""
    directory, name = os.path.split(path)
    try:
        dir_fd = open_safe_directory(directory)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR
                                        and os.path.islink(directory)):
            raise UnsafeDirectory(f"its directory {directory} is a symbolic link") from None
        raise
    try:
        # Unpredictable, so nobody can have a link waiting there; not *.prom,
        # so node_exporter never reads it half-written.
        temporary = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        try:
            try:
                os.fchmod(fd, 0o644)  # whatever the umask: node_exporter reads it
                view = memoryview(text)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)
