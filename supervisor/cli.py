"""The `vhostmd` command line: compatible with the C original's options."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import setproctitle

from vhostmd import __version__
from vhostmd.runtime.child import start_forkserver
from vhostmd.supervisor.arbiter import Supervisor
from vhostmd.supervisor.config import DEFAULT_CONFIG, Config, ConfigError, load_config
from vhostmd.supervisor.daemon import (
    PidFile,
    StartupError,
    daemonize,
    drop_privileges,
    lookup_user,
    setup_logging,
)
from vhostmd.supervisor.sizing import check_vms
from vhostmd.supervisor.status import prepare_status_file, status_path_for

log = logging.getLogger("vhostmd")
DEFAULT_PID_FILE = "/var/run/vhostmd.pid"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhostmd",
        description="Virtual Host Metrics Daemon: publishes host and VM metrics to guests "
        "through a metrics disk and virtio-serial channels.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="verbose (debug) messages")
    p.add_argument("-d", "--no-daemonize", action="store_true",
                   help="stay in the foreground and log to stderr")
    p.add_argument("-f", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("-p", "--pid-file", metavar="FILE",
                   help=f"pid file (default {DEFAULT_PID_FILE} when run as root, none otherwise)")
    p.add_argument("-u", "--user", metavar="USER",
                   help="drop root and run as USER after opening the metrics disk")
    p.add_argument("-c", "--connect", metavar="URI",
                   help="libvirt URI to connect to (default: libvirt's default)")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration file and exit")
    p.add_argument("--vms", type=int, metavar="N",
                   help="with --check: tell whether the configured disk holds N running VMs "
                   "(exit status 1 if not)")
    p.add_argument("--list-builtins", action="store_true",
                   help="list the built-in metrics and exit")
    p.add_argument("--status", action="store_true",
                   help="show the running daemon's children, cycles and channels (reads the "
                   "status file next to the pid file) and exit")
    p.add_argument("--version", action="version", version=f"vhostmd {__version__}")
    return p


def fail(message: str, status: int = 1) -> int:
    print(f"vhostmd: {message}", file=sys.stderr)
    return status


def prepare_disk(config: Config, owner: tuple[int, int] | None) -> None:
    """Create the metrics disk now, so a bad path fails before we daemonize."""
    from vhostmd.disk.writer import DiskTooSmall, MetricsDisk

    try:
        disk = MetricsDisk(config.disk_path, config.disk_size)
    except (OSError, DiskTooSmall) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StartupError(f"cannot create metrics disk {config.disk_path}: {detail}") from None
    disk.close()
    if owner is not None:
        os.chown(config.disk_path, *owner)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The daemon changes to / when it daemonizes and re-reads its config on
    # SIGHUP: keep the paths it was given meaning what they meant here.
    args.config = os.path.abspath(args.config)
    if args.pid_file:
        args.pid_file = os.path.abspath(args.pid_file)
    if args.list_builtins:
        from vhostmd.workers.collectors import describe_builtins

        print(describe_builtins())
        return 0
    if args.status:
        from vhostmd.supervisor.status import show_status

        pid_path = args.pid_file or DEFAULT_PID_FILE
        code, text = show_status(pid_path)
        print(text)
        return code
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    if args.check:
        print(f"{args.config}: OK ({len(config.metrics)} metrics, "
              f"transports {', '.join(config.transports)})")
        if args.vms is not None:
            fits, line = check_vms(config, args.vms)
            print(f"{args.config}: {line}" if config.vbd
                  else f"{args.config}: no metrics disk (vbd transport off)")
            return 0 if fits or not config.vbd else 1
        return 0
    if args.vms is not None:
        return fail("--vms goes with --check")

    setup_logging(foreground=args.no_daemonize, verbose=args.verbose)
    pid_path = args.pid_file or (DEFAULT_PID_FILE if os.geteuid() == 0 else None)
    pid_file = PidFile(pid_path) if pid_path else None
    daemonized = False
    try:
        run_as = lookup_user(args.user) if args.user else None
        if run_as is not None and os.geteuid() != 0:
            raise StartupError(f"-u {run_as.user} needs root to switch users")
        if pid_file is not None:
            pid_file.acquire()
        if config.vbd:
            prepare_disk(config, (run_as.uid, run_as.gid) if run_as else None)
        if not args.no_daemonize:
            daemonize()
            daemonized = True
            setup_logging(foreground=False, verbose=args.verbose)
        if pid_file is not None:
            pid_file.write(os.getpid())
            if run_as is not None:
                pid_file.chown(run_as.uid, run_as.gid)
                prepare_status_file(status_path_for(pid_file.path), run_as.uid, run_as.gid)
        if run_as is not None:
            drop_privileges(run_as)
    except StartupError as exc:
        if pid_file is not None:
            pid_file.release()
        if daemonized:
            log.error("%s", exc)
            return 1
        return fail(str(exc))

    for warning in config.warnings:
        log.warning("%s", warning)
    setproctitle.setproctitle("vhostmd: supervisor")
    # Children are forked from the forkserver, started now: as the user we
    # run as, before the supervisor starts any thread.
    start_forkserver()
    log.info("vhostmd %s starting: config %s, period %d s, transports %s, %d workers",
             __version__, args.config, config.update_period, ", ".join(config.transports),
             config.workers)
    supervisor = Supervisor(config, uri=args.connect, config_path=args.config,
                            status_path=status_path_for(pid_path) if pid_path else None,
                            log_level=logging.DEBUG if args.verbose else logging.INFO)
    try:
        status = supervisor.run()
    finally:
        if pid_file is not None:
            pid_file.release()
    return status


if __name__ == "__main__":
    sys.exit(main())
