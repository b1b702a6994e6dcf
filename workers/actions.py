"""Shell-action metrics: substitution, a bounded run, and parsing of the output.

Actions run as ``/bin/sh -c`` in their own process group (so a timeout kills
the whole pipeline), with the configured PATH, no stdin, bounded output and a
hard deadline. A VM name outside ``[A-Za-z0-9._+:@-]`` never reaches a shell.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vhostmd.document import (
    SCALAR_TYPES,
    DocumentError,
    InvalidValue,
    Metric,
    check_value,
    parse_metric_elements,
    parse_xml,
)
from vhostmd.etc import shipped
from vhostmd.wire import Domain, MetricDef, is_plain_name
from vhostmd.workers import strays
from vhostmd.xmlsafe import one_line

if TYPE_CHECKING:  # lxml is loaded by the first action whose output is XML
    from lxml import etree

OUTPUT_LIMIT = 64 * 1024
STDERR_LIMIT = 2048


def _token(word: str) -> re.Pattern[str]:
    # Whole words only: PRETTY_NAME or VMIDS stay as they are.
    return re.compile(rf"(?<![A-Za-z0-9_]){word}(?![A-Za-z0-9_])")


_CONNECT = _token("CONNECT")
_NAME = _token("NAME")
_VMID = _token("VMID")
_UUID = _token("UUID")


class ActionFailed(Exception):
    """The action did not produce a usable value; str() says why in one line."""


class ActionTimedOut(ActionFailed):
    """The action did not finish before its deadline (and was killed)."""


def substitute(action: str, uri: str | None, domain: Domain | None) -> str:
    """Replace CONNECT (and NAME, VMID, UUID for a VM) as whole words."""
    connect = f"--connect {shlex.quote(uri)}" if uri else ""
    command = _CONNECT.sub(lambda _m: connect, action)
    if domain is not None:
        if not is_plain_name(domain.name):
            raise ActionFailed("VM name is not plain; shell actions are skipped for it")
        command = _NAME.sub(lambda _m: domain.name, command)
        command = _VMID.sub(lambda _m: str(domain.id), command)
        command = _UUID.sub(lambda _m: domain.uuid, command)
    return command


def action_env(exec_path: str, uri: str | None, domain: Domain | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = exec_path
    env.pop("VHOSTMD_VM_NAME", None)
    if uri:
        env["VHOSTMD_CONNECT_URI"] = uri
        # `virsh hostname` without CONNECT then talks to the same libvirt.
        env["LIBVIRT_DEFAULT_URI"] = uri
    if domain is not None:
        env["VHOSTMD_VM_NAME"] = domain.name
        env["VHOSTMD_VM_ID"] = str(domain.id)
        env["VHOSTMD_VM_UUID"] = domain.uuid
    return env


def run_shell(
    command: str,
    env: dict[str, str],
    deadline: float,
    *,
    on_start: Callable[[int], None] = lambda _pgid: None,
    beat: Callable[[], None] = lambda: None,
    limit: int = OUTPUT_LIMIT,
) -> bytes:
    """Run ``command``; return its stdout or raise ActionFailed. Never outlives ``deadline``."""
    if time.monotonic() >= deadline:
        raise ActionFailed("no time left in this cycle")
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise ActionFailed(f"cannot start /bin/sh: {exc.strerror}") from None
    on_start(proc.pid)
    started = time.monotonic()
    out = bytearray()
    err = bytearray()
    problem = None
    try:
        with selectors.DefaultSelector() as sel:
            assert proc.stdout is not None and proc.stderr is not None
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            while sel.get_map() and problem is None:
                beat()
                left = deadline - time.monotonic()
                if left <= 0:
                    problem = f"timed out after {time.monotonic() - started:.2f} s"
                    break
                for key, _ in sel.select(min(left, 0.25)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    buf: bytearray = key.data
                    if buf is err:
                        err += chunk[: max(0, STDERR_LIMIT - len(err))]
                    else:
                        out += chunk
                        if len(out) > limit:
                            problem = f"output exceeds {limit} bytes"
        while problem is None:
            beat()
            left = deadline - time.monotonic()
            if left <= 0:
                problem = f"timed out after {time.monotonic() - started:.2f} s"
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(min(left, 0.25))
                break
    finally:
        # Whatever the shell left behind (background jobs, a hung pipeline) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        strays.wait_group_gone(proc.pid)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
        on_start(0)
    if problem is not None:
        raise (ActionTimedOut if problem.startswith("timed out") else ActionFailed)(problem)
    if proc.returncode != 0:
        first = err.decode("utf-8", "replace").strip().splitlines()
        detail = f": {first[0][:200]}" if first else ""
        raise ActionFailed(f"exit status {proc.returncode}{detail}")
    return bytes(out)


_metric_dtd: etree.DTD | None = None


def _metric_dtd_cached() -> etree.DTD:
    global _metric_dtd
    if _metric_dtd is None:
        from lxml import etree

        with open(shipped("metric.dtd"), "rb") as f:
            _metric_dtd = etree.DTD(f)
    return _metric_dtd


def metrics_from_output(metric: MetricDef, output: bytes, domain: Domain | None) -> list[Metric]:
    """Turn an action's stdout into checked metrics; raise ActionFailed if unusable."""
    try:
        text = output.decode("utf-8")
    except UnicodeDecodeError:
        raise ActionFailed("output is not UTF-8") from None
    vm_id = domain.id if domain is not None else None
    uuid = domain.uuid if domain is not None else None
    try:
        if metric.type in SCALAR_TYPES:
            value = check_value(metric.type, text)
            return [
                Metric(metric.name, metric.type, metric.context, value, metric.unit, vm_id, uuid)
            ]
        if metric.type == "group":
            parts = text.strip().split(",")
            if len(parts) != len(metric.variables):
                raise ActionFailed(
                    f"expected {len(metric.variables)} comma-separated values, got {len(parts)}"
                )
            return [
                Metric(var.name, var.type, metric.context, check_value(var.type, part), None,
                       vm_id, uuid)
                for var, part in zip(metric.variables, parts, strict=True)
            ]
        if metric.type == "xml":
            return _xml_metrics(metric, text, vm_id, uuid)
    except InvalidValue as exc:
        raise ActionFailed(str(exc)) from None
    raise ActionFailed(f"unknown metric type {metric.type}")


def _xml_metrics(metric: MetricDef, text: str, vm_id: int | None, uuid: str | None) -> list[Metric]:
    try:
        root = parse_xml(f"<metrics>{text}</metrics>".encode(), where="action output")
    except DocumentError as exc:
        raise ActionFailed(str(exc)) from None
    dtd = _metric_dtd_cached()
    if not dtd.validate(root):
        first = dtd.error_log.filter_from_errors()[0]
        raise ActionFailed(f"output does not match metric.dtd: {one_line(first.message)}")
    try:
        found = parse_metric_elements(root, where="action output")
    except DocumentError as exc:
        raise ActionFailed(str(exc)) from None
    if not found:
        raise ActionFailed("output holds no <metric>")
    result = []
    for m in found:
        if m.context != metric.context:
            raise ActionFailed(
                f"metric {m.name} has context {m.context}, expected {metric.context}"
            )
        result.append(Metric(m.name, m.type, m.context, m.value, m.unit, vm_id, uuid))
    return result
