"""The `vhostmd` command line: compatible with the C original's options."""

from __future__ import annotations

import argparse
import logging
import multiprocessing.util
import os
import shlex
import sys
from dataclasses import dataclass

import setproctitle

from vhostmd import __version__
from vhostmd.disk.handle import DiskHandle, DiskRefused, existing_disk_refusal, open_disk
from vhostmd.disk.vmdir import VmDir
from vhostmd.runtime.child import (
    ForkserverUnavailable,
    start_forkserver,
    stop_forkserver,
    unreadable_by_us,
)
from vhostmd.runtime.files import UnsafeFile
from vhostmd.runtime.footprint import limit_address_space
from vhostmd.supervisor.arbiter import Supervisor
from vhostmd.supervisor.config import DEFAULT_CONFIG, Config, ConfigError, load_config
from vhostmd.supervisor.daemon import (
    DEFAULT_LOG_FILE,
    SYSLOG_SOCKET,
    PidFile,
    RunAs,
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
    make_paths_absolute(args)
    if args.list_builtins:
        from vhostmd.workers.collectors import describe_builtins

        print(describe_builtins())
        return 0
    if args.status:
        return status_command(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    if args.check:
        return check_command(args, config)
    if args.vms is not None:
        return fail("--vms goes with --check")
    if args.device is not None and args.domain_xml is None:
        return fail("--device goes with --domain-xml")
    if args.domain_xml is not None:
        return domain_xml_command(args, config)
    return run_daemon(args, config, argv)


def make_paths_absolute(args: argparse.Namespace) -> None:
    """The daemon changes to / when it daemonizes and re-reads its config on
    SIGHUP: keep the paths it was given meaning what they meant here."""
    args.config = os.path.abspath(args.config)
    if args.pid_file:
        args.pid_file = os.path.abspath(args.pid_file)
    if args.log_file:
        args.log_file = os.path.abspath(args.log_file)


def status_command(args: argparse.Namespace) -> int:
    from vhostmd.supervisor.status import show_status

    code, text = show_status(args.pid_file or DEFAULT_PID_FILE)
    print(text)
    return code


def check_command(args: argparse.Namespace, config: Config) -> int:
    """--check [--vms N]: what the daemon would refuse, warn about, or not fit."""
    if config.vbd and (refusal := existing_disk_refusal(config.disk_path)) is not None:
        return fail(refusal)
    print(f"{args.config}: OK ({count_metrics(config)} metrics, "
          f"transports {', '.join(config.transports)})")
    for warning in config.warnings:
        print(f"{warning}")
    if args.vms is None:
        return 0
    checks = []
    if config.vbd:
        checks.append(check_vms(config, args.vms))
    if config.vm_disks_path is not None:
        checks.append(check_vm_disks(config))
    for _fits, line in checks or [(True, "no metrics disk (vbd transport off)")]:
        print(f"{args.config}: {line}")
    return 0 if all(fits for fits, _line in checks) else 1


def domain_xml_command(args: argparse.Namespace, config: Config) -> int:
    from vhostmd.supervisor.domain_xml import DomainXmlError, domain_xml

    try:
        text, notes = domain_xml(config, args.connect, args.domain_xml, args.device)
    except DomainXmlError as exc:
        return fail(str(exc))
    for note in notes:
        print(f"vhostmd: {note}", file=sys.stderr)
    print(text, end="")
    return 0


@dataclass
class RootFiles:
    """What the daemon opens before -u drops root: the processes keep the
    descriptors and the files stay root's."""

    pid_file: PidFile | None
    status_file: StatusFile | None
    disk: DiskHandle | None = None
    vm_dir: VmDir | None = None
    run_as: RunAs | None = None
    notifier: Notifier | None = None
    daemonized: bool = False

    def close(self) -> None:
        """Undo what start_up did, when it could not finish."""
        stop_forkserver()  # started for -u before the refusal: leave nothing behind
        for held in (self.disk, self.vm_dir):
            if held is not None:
                held.close()
        if self.status_file is not None:
            self.status_file.remove()
        if self.pid_file is not None:
            self.pid_file.release()


def start_up(args: argparse.Namespace, config: Config, argv: list[str] | None,
             files: RootFiles) -> None:
    """Everything that needs root, then daemonize and (with -u) drop it; raises StartupError."""
    files.run_as = run_as = lookup_user(args.user) if args.user else None
    if run_as is not None and os.geteuid() != 0:
        raise StartupError(f"-u {run_as.user} needs root to switch users")
    if (refusal := vm_disks_refusal(config, args.user)) is not None:
        raise StartupError(refusal)
    if files.pid_file is not None:
        files.pid_file.acquire()
    if files.status_file is not None:
        try:
            files.status_file.open()
        except UnsafeFile as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot create status file {files.status_file.path}: "
                               f"{exc.strerror}") from None
    if config.vbd:
        files.disk = prepare_disk(config)
    try:
        files.vm_dir = prepare_vm_dir(config)
    except DiskRefused as exc:
        raise StartupError(str(exc)) from None
    if not args.no_daemonize:
        target = open_log_target(args.log_file)
        if target.file is not None:
            why = "" if args.log_file else f" (no syslog at {SYSLOG_SOCKET})"
            print(f"vhostmd: logging to {target.file}{why}", file=sys.stderr)
        daemonize()
        files.daemonized = True
        setup_logging(verbose=args.verbose, target=target)
    # Before the pid appears: whoever reads the pid file sees what it runs.
    setproctitle.setproctitle("vhostmd: supervisor")
    if files.pid_file is not None:
        files.pid_file.write(os.getpid())
    log.info("vhostmd %s starting: %s", __version__,
             shlex.join(sys.argv[1:] if argv is None else argv))
    if run_as is not None:
        # Started as root, it becomes the user itself (runtime/privileges.py);
        # systemd's variables are taken out of the environment first.
        files.notifier = Notifier()
        try:
            start_forkserver((run_as.user, run_as.uid, run_as.gid))
        except ForkserverUnavailable as exc:
            raise StartupError(str(exc)) from None
        drop_privileges(run_as)
        # What children run is imported by the forkserver, as this user.
        problem = unreadable_by_us()
        if problem is not None:
            raise StartupError(f"-u {run_as.user}: {problem}; install vhostmd where "
                               f"{run_as.user} can read it (the Debian package does) "
                               "or run without -u")


def run_daemon(args: argparse.Namespace, config: Config, argv: list[str] | None) -> int:
    limit_address_space()  # before any thread
    # Lines go to stderr until the daemon detaches.
    setup_logging(verbose=args.verbose)
    pid_path = args.pid_file or (DEFAULT_PID_FILE if os.geteuid() == 0 else None)
    files = RootFiles(pid_file=PidFile(pid_path) if pid_path else None,
                      status_file=StatusFile(status_path_for(pid_path)) if pid_path else None)
    try:
        start_up(args, config, argv, files)
    except StartupError as exc:
        files.close()
        if files.daemonized:
            log.error("%s", exc)
            return 1
        return fail(str(exc))

    for warning in config.warnings:
        log.warning("%s", warning)
    run_as = files.run_as
    # Takes systemd's variables out of the environment before any child exists
    # (under -u, in start_up, before the forkserver was started).
    notifier = files.notifier if files.notifier is not None else Notifier()
    # Children are forked from the forkserver, started now (with -u: in
    # start_up, before dropping root), before the supervisor starts any thread.
    if run_as is None:
        try:
            start_forkserver()
        except ForkserverUnavailable as exc:
            files.close()
            log.error("%s", exc)
            return 1
    log.info("config %s: period %d s, transports %s, %d worker%s", args.config,
             config.update_period, ", ".join(config.transports), config.workers,
             "" if config.workers == 1 else "s")
    supervisor = Supervisor(config, uri=args.connect, config_path=args.config,
                            status_file=files.status_file, disk=files.disk,
                            dropped_to=run_as.user if run_as is not None else None,
                            log_level=logging.DEBUG if args.verbose else logging.INFO,
                            vm_dir=files.vm_dir, notifier=notifier)
    try:
        status = supervisor.run()
        if supervisor.all_stopped:
            # Every child is gone: stop the forkserver too, so that nothing
            # of the daemon outlives it (no orphan for init to reap). As the
            # very last exit step: multiprocessing's own exit handler first
            # unlinks the queues' semaphores (its finalizers of priority 0
            # and up), which the forkserver would otherwise remove under
            # them as it exits.
            multiprocessing.util.Finalize(None, stop_forkserver, exitpriority=-100)
    finally:
        if files.pid_file is not None:
            files.pid_file.release()
    return status


if __name__ == "__main__":
    sys.exit(main())
