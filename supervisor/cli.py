"""The `vhostmd` command line: compatible with the C original's options."""

from __future__ import annotations

import argparse
import logging
import multiprocessing.util
import os
import shlex
import sys

import setproctitle

from vhostmd import __version__
from vhostmd.disk.handle import DiskHandle, DiskRefused, existing_disk_refusal, open_disk
from vhostmd.disk.vmdir import VmDir
from vhostmd.runtime.child import start_forkserver, stop_forkserver, unreadable_by_us
from vhostmd.runtime.files import UnsafeFile
from vhostmd.supervisor.arbiter import Supervisor
from vhostmd.supervisor.config import DEFAULT_CONFIG, Config, ConfigError, load_config
from vhostmd.supervisor.daemon import (
    DEFAULT_LOG_FILE,
    SYSLOG_SOCKET,
    PidFile,
    StartupError,
    daemonize,
    drop_privileges,
    lookup_user,
    open_log_target,
    setup_logging,
)
from vhostmd.supervisor.notify import Notifier
from vhostmd.supervisor.planning import count_metrics
from vhostmd.supervisor.sizing import check_vm_disks, check_vms
from vhostmd.supervisor.status import StatusFile, status_path_for
from vhostmd.supervisor.vmdisks import prepare_vm_dir, vm_disks_refusal

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
    p.add_argument("--log-file", metavar="FILE",
                   help="when daemonized, log to FILE instead of syslog (default: syslog, "
                   f"or {DEFAULT_LOG_FILE} when there is no {SYSLOG_SOCKET})")
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
    p.add_argument("--domain-xml", metavar="VM",
                   help="print the libvirt device elements that give domain VM (a name or "
                   "UUID) its metrics: the metrics disk (its own with <vm_disks>, made now "
                   "if missing) and the virtio channel, each usable with `virsh "
                   "attach-device VM FILE --config`, and exit")
    p.add_argument("--device", choices=("disk", "channel"),
                   help="with --domain-xml: print only this element")
    p.add_argument("--version", action="version", version=f"vhostmd {__version__}")
    return p


def fail(message: str, status: int = 1) -> int:
    print(f"vhostmd: {message}", file=sys.stderr)
    return status


def prepare_disk(config: Config) -> DiskHandle:
    """Open and lock the metrics disk now, as root: a bad path fails before we daemonize."""
    try:
        return open_disk(config.disk_path, config.disk_size)
    except DiskRefused as exc:
        raise StartupError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The daemon changes to / when it daemonizes and re-reads its config on
    # SIGHUP: keep the paths it was given meaning what they meant here.
    args.config = os.path.abspath(args.config)
    if args.pid_file:
        args.pid_file = os.path.abspath(args.pid_file)
    if args.log_file:
        args.log_file = os.path.abspath(args.log_file)
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
        if config.vbd and (refusal := existing_disk_refusal(config.disk_path)) is not None:
            return fail(refusal)
        print(f"{args.config}: OK ({count_metrics(config)} metrics, "
              f"transports {', '.join(config.transports)})")
        for warning in config.warnings:
            print(f"{warning}")
        if args.vms is not None:
            checks = []
            if config.vbd:
                checks.append(check_vms(config, args.vms))
            if config.vm_disks_path is not None:
                checks.append(check_vm_disks(config))
            for _fits, line in checks or [(True, "no metrics disk (vbd transport off)")]:
                print(f"{args.config}: {line}")
            return 0 if all(fits for fits, _line in checks) else 1
        return 0
    if args.vms is not None:
        return fail("--vms goes with --check")
    if args.device is not None and args.domain_xml is None:
        return fail("--device goes with --domain-xml")
    if args.domain_xml is not None:
        from vhostmd.supervisor.domain_xml import DomainXmlError, domain_xml

        try:
            text, notes = domain_xml(config, args.connect, args.domain_xml, args.device)
        except DomainXmlError as exc:
            return fail(str(exc))
        for note in notes:
            print(f"vhostmd: {note}", file=sys.stderr)
        print(text, end="")
        return 0

    # Lines go to stderr until the daemon detaches.
    setup_logging(verbose=args.verbose)
    pid_path = args.pid_file or (DEFAULT_PID_FILE if os.geteuid() == 0 else None)
    pid_file = PidFile(pid_path) if pid_path else None
    status_file = StatusFile(status_path_for(pid_path)) if pid_path else None
    disk: DiskHandle | None = None
    vm_dir: VmDir | None = None
    daemonized = False
    notifier: Notifier | None = None
    # Everything below that needs root (pid, status and log files, the disk)
    # is opened here, before -u drops it; the processes keep the descriptors
    # and the files stay root's.
    try:
        run_as = lookup_user(args.user) if args.user else None
        if run_as is not None and os.geteuid() != 0:
            raise StartupError(f"-u {run_as.user} needs root to switch users")
        if (refusal := vm_disks_refusal(config, args.user)) is not None:
            raise StartupError(refusal)
        if pid_file is not None:
            pid_file.acquire()
        if status_file is not None:
            try:
                status_file.open()
            except UnsafeFile as exc:
                raise StartupError(str(exc)) from None
            except OSError as exc:
                raise StartupError(f"cannot create status file {status_file.path}: "
                                   f"{exc.strerror}") from None
        if config.vbd:
            disk = prepare_disk(config)
        try:
            vm_dir = prepare_vm_dir(config)
        except DiskRefused as exc:
            raise StartupError(str(exc)) from None
        if not args.no_daemonize:
            target = open_log_target(args.log_file)
            if target.file is not None:
                why = "" if args.log_file else f" (no syslog at {SYSLOG_SOCKET})"
                print(f"vhostmd: logging to {target.file}{why}", file=sys.stderr)
            daemonize()
            daemonized = True
            setup_logging(verbose=args.verbose, target=target)
        # Before the pid appears: whoever reads the pid file sees what it runs.
        setproctitle.setproctitle("vhostmd: supervisor")
        if pid_file is not None:
            pid_file.write(os.getpid())
        log.info("vhostmd %s starting: %s", __version__,
                 shlex.join(sys.argv[1:] if argv is None else argv))
        if run_as is not None:
            # Started as root, it becomes the user itself (runtime/privileges.py);
            # systemd's variables are taken out of the environment first.
            notifier = Notifier()
            start_forkserver((run_as.user, run_as.uid, run_as.gid))
            drop_privileges(run_as)
            # What children run is imported by the forkserver, as this user.
            problem = unreadable_by_us()
            if problem is not None:
                raise StartupError(f"-u {run_as.user}: {problem}; install vhostmd where "
                                   f"{run_as.user} can read it (the Debian package does) "
                                   "or run without -u")
    except StartupError as exc:
        stop_forkserver()  # started for -u before the refusal: leave nothing behind
        for held in (disk, vm_dir):
            if held is not None:
                held.close()
        if status_file is not None:
            status_file.remove()
        if pid_file is not None:
            pid_file.release()
        if daemonized:
            log.error("%s", exc)
            return 1
        return fail(str(exc))

    for warning in config.warnings:
        log.warning("%s", warning)
    # Takes systemd's variables out of the environment before any child exists
    # (under -u, above, before the forkserver was started).
    if notifier is None:
        notifier = Notifier()
    # Children are forked from the forkserver, started now (with -u: above,
    # before dropping root), before the supervisor starts any thread.
    if run_as is None:
        start_forkserver()
    log.info("config %s: period %d s, transports %s, %d worker%s", args.config,
             config.update_period, ", ".join(config.transports), config.workers,
             "" if config.workers == 1 else "s")
    supervisor = Supervisor(config, uri=args.connect, config_path=args.config,
                            status_file=status_file, disk=disk,
                            dropped_to=run_as.user if run_as is not None else None,
                            log_level=logging.DEBUG if args.verbose else logging.INFO,
                            vm_dir=vm_dir, notifier=notifier)
    try:
        status = supervisor.run()
        if supervisor.all_stopped:
            # Every child is gone: stop multiprocessing's helpers too, so that
            # nothing of the daemon outlives it (no orphan for init to reap).
            # As the very last exit step: multiprocessing's own exit handler
            # first frees the queues' semaphores (its finalizers of priority
            # 0 and up), which the resource tracker would otherwise remove
            # under them.
            multiprocessing.util.Finalize(None, stop_forkserver, exitpriority=-100)
    finally:
        if pid_file is not None:
            pid_file.release()
    return status


if __name__ == "__main__":
    sys.exit(main())
