"""``vm-dump-metrics``: print the metrics the host publishes to this VM.

Exit status 0 on success, 1 when no metrics can be read or the requested
metric is missing or has no value of its type, 2 for bad usage; every error is
one line on stderr.

Any well-formed document is printed in xml mode, byte for byte, as the C tool
does; ``--format json`` lists every metric and names each one whose value does
not fit its type on stderr (documents written by a C daemon carry empty values).

``--format prometheus`` prints the Prometheus text exposition (guest/prometheus.py);
``--textfile PATH`` writes it atomically for node_exporter's textfile collector
(core/textfile.py), also when nothing could be read: then the file says so
(``vhostmd_guest_read_success 0``) instead of keeping old values, and the exit
status is 0 when the file was written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from vhostmd.document import CONTEXTS
from vhostmd.guest.api import DEFAULT_TIMEOUT, MetricsDocument, metric_as_json, read_metrics
from vhostmd.guest.errors import MetricsError
from vhostmd.guest.prometheus import (
    PrometheusUnavailable,
    check_age,
    prometheus_text,
    require_prometheus_client,
)
from vhostmd.protocol import GUEST_PORT
from vhostmd.textfile import TextfileError, write_atomically

PROG = "vm-dump-metrics"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of this tool."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG,
        description="Print the metrics the host (vhostmd) publishes to this VM. "
        "Without -b or -i, try the metrics disk first, then virtio.",
    )
    transport = parser.add_mutually_exclusive_group()
    transport.add_argument(
        "-b", "--vbd", action="store_true", help="read the metrics disk (scan the block devices)"
    )
    transport.add_argument(
        "-i", "--virtio", action="store_true", help=f"ask the host over virtio ({GUEST_PORT})"
    )
    parser.add_argument("--disk", metavar="PATH", help="metrics disk device or image file to read")
    parser.add_argument("--port", metavar="PATH", help="virtio port to use instead of the default")
    parser.add_argument("-d", "--dest", metavar="FILE", help="write to FILE instead of stdout")
    parser.add_argument(
        "--format",
        choices=("xml", "json", "prometheus"),
        default=None,
        help="xml: the document exactly as published (default); json: a list of typed "
        "metrics; prometheus: the Prometheus text format (vhostmd_host_*, vhostmd_vm_*)",
    )
    parser.add_argument(
        "--textfile",
        metavar="PATH",
        help="write the prometheus format to PATH atomically, for node_exporter's textfile "
        "collector (e.g. /var/lib/prometheus/node-exporter/vhostmd-guest.prom); when "
        "nothing can be read, the file says so (vhostmd_guest_read_success 0)",
    )
    parser.add_argument(
        "--max-age",
        type=float,
        metavar="SECONDS",
        help="with the prometheus format: a document the host sampled longer ago than "
        "this (by its Time metric) counts as not read, as when the host stopped publishing",
    )
    parser.add_argument("--metric", metavar="NAME", help="print only this metric's value")
    parser.add_argument(
        "--context", choices=CONTEXTS, help="with --metric: host (default) or vm (this VM's)"
    )
    parser.add_argument(
        "--uuid",
        help="with --context vm or --format prometheus: the VM to pick (default: this VM)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="give up on a busy disk or a silent host after this long "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="say what is tried and skipped"
    )
    return parser


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.textfile is not None:
        if args.format not in (None, "prometheus"):
            parser.error("--textfile writes the prometheus format only")
        if args.dest is not None:
            parser.error("--textfile and -d/--dest do not go together")
        args.format = "prometheus"
    args.format = args.format or "xml"
    if args.format == "prometheus":
        if args.metric is not None:
            parser.error("--metric does not go with --format prometheus (it prints every metric)")
        if args.context is not None:
            parser.error("--context does not go with --format prometheus")
    if args.disk and args.virtio:
        parser.error("--disk reads the metrics disk; it does not go with -i/--virtio")
    if args.port and args.vbd:
        parser.error("--port is for virtio; it does not go with -b/--vbd")
    if args.metric is None and args.context:
        parser.error("--context needs --metric")
    if args.uuid and args.format != "prometheus" and args.metric is None:
        parser.error("--uuid needs --metric and --context vm, or --format prometheus")
    if args.uuid and args.format != "prometheus" and args.context != "vm":
        parser.error("--uuid needs --context vm")
    if args.max_age is not None and args.format != "prometheus":
        parser.error("--max-age goes with --format prometheus or --textfile")
    if args.max_age is not None and not args.max_age > 0:
        parser.error("--max-age must be a positive number of seconds")
    if not args.timeout > 0:
        parser.error("--timeout must be a positive number of seconds")


def render_output(
    document: MetricsDocument, args: argparse.Namespace, log: Callable[[str], None]
) -> bytes:
    if args.metric is not None:
        metric = document.find(args.metric, args.context or "host", uuid=args.uuid)
        document.value_of(metric)  # one line and exit 1 for a metric without a typed value
        if args.format == "json":
            return _json_bytes(metric_as_json(metric))
        return metric.value.encode() + b"\n"
    if args.format == "prometheus":
        if args.verbose:
            for problem in document.problems:
                log(problem)
        read_at = time.time()
        notes = ()
        if args.max_age is not None:
            note = check_age(document, read_at, args.max_age)  # StaleDocument: nothing read
            notes = (note,) if note else ()
        return prometheus_text(document, read_at=read_at, uuid=args.uuid, notes=notes)
    if args.format == "json":
        # Every metric is delivered; the ones without a value are named once each.
        for problem in document.problems:
            log(problem)
        return _json_bytes(document.as_json_objects())
    if args.verbose:
        for problem in document.problems:
            log(problem)
    return document.raw


def _json_bytes(data: object) -> bytes:
    # Encoded here, not by sys.stdout: a guest's C locale must not break non-ASCII values.
    return (json.dumps(data, ensure_ascii=False, indent=2) + "\n").encode()


def _write(output: bytes, dest: str | None) -> None:
    if dest is None:
        sys.stdout.buffer.write(output)
        sys.stdout.buffer.flush()
        return
    try:
        with open(dest, "wb") as dest_file:
            dest_file.write(output)
    except OSError as exc:
        raise MetricsError(f"cannot write {dest}: {exc.strerror or exc}") from None


def _fail(message: str, status: int = EXIT_FAILURE) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_usage(parser, args)

    def log(message: str) -> None:
        sys.stderr.write(f"{PROG}: {message}\n")

    transport = "vbd" if args.vbd else "virtio" if args.virtio else None
    try:
        if args.format == "prometheus":
            require_prometheus_client()
        document = read_metrics(
            transport,
            disk=args.disk,
            port=args.port,
            timeout=args.timeout,
            log=log if args.verbose else None,
        )
        if args.verbose:
            log(f"read {len(document.raw)} bytes over {document.transport} from {document.source}")
        output = render_output(document, args, log)
        if args.textfile is not None:
            write_atomically(args.textfile, output)
        else:
            _write(output, args.dest)
    except TextfileError as exc:
        return _fail(str(exc))
    except MetricsError as exc:
        if args.format != "prometheus" or isinstance(exc, PrometheusUnavailable):
            return _fail(str(exc))
        return _failed_read_exposition(args, str(exc))
    except BrokenPipeError:
        # The reader went away (`| head`): not an error worth a traceback.
        _silence_stdout()
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # a bug must still not print a traceback at operators
        return _fail(f"unexpected error: {type(exc).__name__}: {exc}")
    return EXIT_OK


def _failed_read_exposition(args: argparse.Namespace, reason: str) -> int:
    """Nothing read: the exposition says so (read_success 0, no host values). Written to
    the textfile (exit 0: the file is what was asked for) or printed (exit 1)."""
    output = prometheus_text(None, read_at=time.time(), error=reason)
    try:
        if args.textfile is not None:
            write_atomically(args.textfile, output)
            sys.stderr.write(f"{PROG}: {reason} (written to {args.textfile} as "
                             "vhostmd_guest_read_success 0)\n")
            return EXIT_OK
        _write(output, args.dest)
    except (TextfileError, MetricsError) as exc:
        return _fail(f"{reason}; and {exc}")
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_FAILURE
    except Exception as exc:  # as in main: never a traceback at operators
        return _fail(f"{reason}; and unexpected error: {type(exc).__name__}: {exc}")
    return _fail(reason)


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
