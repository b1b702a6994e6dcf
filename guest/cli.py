"""``vm-dump-metrics``: print the metrics the host publishes to this VM.

Exit status 0 on success, 1 when no metrics can be read or the requested
metric is missing or has no value of its type, 2 for bad usage; every error is
one line on stderr.

Any well-formed document is printed in xml mode, byte for byte, as the C tool
does; ``--format json`` lists every metric and names each one whose value does
not fit its type on stderr (documents written by a C daemon carry empty values).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from vhostmd.document import CONTEXTS
from vhostmd.guest.api import DEFAULT_TIMEOUT, MetricsDocument, metric_as_json, read_metrics
from vhostmd.guest.errors import MetricsError
from vhostmd.protocol import GUEST_PORT

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
        choices=("xml", "json"),
        default="xml",
        help="xml: the document exactly as published (default); json: a list of typed metrics",
    )
    parser.add_argument("--metric", metavar="NAME", help="print only this metric's value")
    parser.add_argument(
        "--context", choices=CONTEXTS, help="with --metric: host (default) or vm (this VM's)"
    )
    parser.add_argument("--uuid", help="with --context vm: the VM to pick (default: this VM)")
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
    if args.disk and args.virtio:
        parser.error("--disk reads the metrics disk; it does not go with -i/--virtio")
    if args.port and args.vbd:
        parser.error("--port is for virtio; it does not go with -b/--vbd")
    if args.metric is None and (args.context or args.uuid):
        parser.error("--context and --uuid need --metric")
    if args.uuid and args.context != "vm":
        parser.error("--uuid needs --context vm")
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
        document = read_metrics(
            transport,
            disk=args.disk,
            port=args.port,
            timeout=args.timeout,
            log=log if args.verbose else None,
        )
        if args.verbose:
            log(f"read {len(document.raw)} bytes over {document.transport} from {document.source}")
        _write(render_output(document, args, log), args.dest)
    except MetricsError as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        # The reader went away (`| head`): not an error worth a traceback.
        _silence_stdout()
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # a bug must still not print a traceback at operators
        return _fail(f"unexpected error: {type(exc).__name__}: {exc}")
    return EXIT_OK


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
