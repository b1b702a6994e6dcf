#!/usr/bin/env bash
# Build the Debian packages vhostmd and vm-dump-metrics from a copy of this
# checkout, check them, install them on this machine, run the installed
# daemon and guest tool, drive the init script, then purge them.
#
#   tests/packaging/run.sh        (as root, on Debian 12 or later)
#
# Installs the build dependencies with apt-get when they are missing. Builds
# in a temporary directory, so nothing is written next to the checkout. Always
# cleans up, on failure too: daemons it started are killed, /etc/default/vhostmd
# and policy-rc.d are restored, the packages purged.
#
# Exit status: 0 passed, 1 failed, 77 cannot run here (not root, not Debian,
# the packages are installed already...): the pytest wrapper skips on 77.
#
# VHOSTMD_PKG_KEEP=1 keeps the temporary directory (build log, .deb files).

set -eu -o pipefail

REPO=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
# Debian's own tools and python3, never a virtualenv's or pyenv's.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

SKIP=77
PACKAGES=(vhostmd vm-dump-metrics)
BUILD_DEPS=(dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3 python3-setuptools
            lintian)
# Another apt-get may hold the lock (other jobs on the machine): wait for it.
APT=(apt-get -y -q -o DPkg::Lock::Timeout=300)
PRIVATE=usr/share/vhostmd/vhostmd
DEFAULT_PIDFILE=/run/vhostmd.pid
PIDFILE=$DEFAULT_PIDFILE
SHM_DISK=/dev/shm/vhostmd0
POLICY=/usr/sbin/policy-rc.d

START_TIME=$(date +%s)
WORK=""
INSTALLED=0
DEFAULT_BACKUP=""
POLICY_BACKUP=""
SHM_DISK_EXISTED=1
SESSIONS=()   # session ids of every daemon this script started
BUSY=""       # pid of the busy loop of slow_down
LOCK_HOLDER=""  # pid of the process that holds the lock of this test

say() { printf '==> [%3ds] %s\n' "$(($(date +%s) - START_TIME))" "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
skip() { printf 'SKIP: %s\n' "$*" >&2; exit "$SKIP"; }

# --- processes -------------------------------------------------------------

# Live (not zombie) processes of session $1: the daemon and all its children.
# This machine's pid 1 may not reap orphans, so zombies are not "left over".
session_pids() {
    ps -eo pid=,sid=,stat= | awk -v sid="$1" '$2 == sid && $3 !~ /^Z/ { print $1 }'
}

# Remember the session of the daemon with pid $1, for the checks and cleanup.
# Only a session of its own: the daemon leads it (setsid) or its leader, the
# daemon's first fork, is gone (or a zombie). Anything else is some other vhostmd that uses
# the same pid file, whose session (a shell's, a test runner's...) this script
# must never kill.
track() {
    local sid leader
    sid=$(ps -o sid= -p "$1" | tr -d ' ') || fail "process $1 is gone"
    # The first fork exits at once: gone, or a zombie where pid 1 reaps none.
    leader=$(ps -o stat=,args= -p "$sid" || true)
    case $leader in
        ""|Z*|*" vhostmd: "*|*" /usr/sbin/vhostmd "*) SESSIONS+=("$sid") ;;
        *) fail "pid $1 is not a vhostmd this test started (session of: $leader):" \
                "another vhostmd uses the same pid file" ;;
    esac
}

no_process_left() {
    local sid left
    for sid in ${SESSIONS[@]+"${SESSIONS[@]}"}; do
        left=$(session_pids "$sid")
        if [ -n "$left" ]; then
            ps -o pid,stat,cmd -p "$(echo "$left" | paste -sd,)" >&2 || true
            fail "$1: processes of the daemon (session $sid) are left"
        fi
    done
}

# Make the daemon of session $1 slow to exit, for a few seconds: its
# processes on CPU 0 at nice 19, next to a busy loop there. The pid file's
# lock goes some 50-100 ms before the supervisor exits; now it is seconds, so
# a "stop" that returned on the lock alone would leave it. Nice 19 for the
# daemon's autogroup (its session) where the kernel groups sessions so, which
# makes the nice of single threads count only within the session; for every
# thread too where it does not.
slow_down() {
    local pid task
    for pid in $(session_pids "$1"); do
        taskset -a -p -c 0 "$pid" >/dev/null 2>&1 || true
        for task in /proc/"$pid"/task/*; do
            renice -n 19 -p "${task##*/}" >/dev/null 2>&1 || true
        done
        if [ -w "/proc/$pid/autogroup" ]; then
            echo 19 >"/proc/$pid/autogroup" 2>/dev/null || true
        fi
    done
    taskset -c 0 sh -c 'while :; do :; done' &
    BUSY=$!
}

end_slow_down() {
    kill "$BUSY"
    wait "$BUSY" 2>/dev/null || true
    BUSY=""
}

# Like no_process_left, for every session but that of the daemon $1, which runs.
no_process_left_but() {
    local sid keep left
    keep=$(ps -o sid= -p "$1" | tr -d ' ')
    for sid in ${SESSIONS[@]+"${SESSIONS[@]}"}; do
        [ "$sid" != "$keep" ] || continue
        left=$(session_pids "$sid")
        if [ -n "$left" ]; then
            ps -o pid,stat,cmd -p "$(echo "$left" | paste -sd,)" >&2 || true
            fail "$2: processes of an earlier daemon (session $sid) are left"
        fi
    done
}

kill_sessions() {
    local sid pids signal
    for signal in TERM KILL; do
        for sid in ${SESSIONS[@]+"${SESSIONS[@]}"}; do
            pids=$(session_pids "$sid")
            # shellcheck disable=SC2086 # a list of pids
            [ -z "$pids" ] || kill -"$signal" $pids 2>/dev/null || true
        done
        [ "$signal" = KILL ] || sleep 1
    done
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [ -z "$BUSY" ] || kill "$BUSY" 2>/dev/null
    [ "$rc" -eq 0 ] || [ "$rc" -eq "$SKIP" ] || say "cleaning up after a failure"
    kill_sessions
    if [ -n "$DEFAULT_BACKUP" ] && [ -f "$DEFAULT_BACKUP" ] && [ -d /etc/default ]; then
        cp -p "$DEFAULT_BACKUP" /etc/default/vhostmd
    fi
    if [ "$INSTALLED" -eq 1 ]; then
        "${APT[@]}" purge "${PACKAGES[@]}" >"${WORK:-/tmp}/cleanup-purge.log" 2>&1 \
            || echo "could not purge ${PACKAGES[*]}: see ${WORK:-/tmp}/cleanup-purge.log" >&2
        kill_sessions
    fi
    if [ -n "$POLICY_BACKUP" ]; then
        mv -f "$POLICY_BACKUP" "$POLICY"
    fi
    if [ "$SHM_DISK_EXISTED" -eq 0 ]; then
        rm -f "$SHM_DISK"
    fi
    if [ -n "$WORK" ]; then
        if [ "${VHOSTMD_PKG_KEEP:-0}" = 1 ]; then
            echo "kept $WORK" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    [ -z "$LOCK_HOLDER" ] || kill "$LOCK_HOLDER" 2>/dev/null
    if [ "$rc" -eq 0 ]; then
        say "packaging test passed"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- helpers -----------------------------------------------------------------

installed_state() {
    dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | tr -d ' ' || true
}

# Run "$@" every 0.2 s until it succeeds, for at most $1 seconds.
# The named semaphores (multiprocessing's, in /dev/shm) that the processes of
# session $1 have mapped: this daemon's own, whatever else runs on the machine.
session_semaphores() {
    local p
    for p in $(session_pids "$1"); do
        grep -o '/dev/shm/sem\.[^ ]*$' "/proc/$p/maps" 2>/dev/null || true
    done | sort -u
}
# Whether none of the files "$@" exists.
none_exist() {
    local f
    for f in "$@"; do [ ! -e "$f" ] || return 1; done
}

# Whether session $1 has at least $2 processes whose name starts with vhostmd.
session_has_children() {
    [ "$(pgrep -c -s "$1" '^vhostmd' || true)" -ge "$2" ]
}

retry() {
    local deadline=$(($(date +%s) + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# The value of metric $2 (host context) on metrics disk $1.
metric() {
    /usr/sbin/vm-dump-metrics --disk "$1" --metric "$2"
}

metric_is() {
    [ "$(metric "$1" "$2" 2>/dev/null)" = "$3" ]
}

# Run an init script command; fail unless it exits with status $1.
init_script() {
    local want=$1 rc=0
    shift
    /etc/init.d/vhostmd "$@" || rc=$?
    [ "$rc" -eq "$want" ] || fail "/etc/init.d/vhostmd $*: exit status $rc, expected $want"
}

daemon_pid() {
    [ -s "$PIDFILE" ] && head -n 1 "$PIDFILE"
}

# The pid file the init script uses now (VHOSTMD_PIDFILE).
use_pid_file() {
    PIDFILE=$1
}

# A test configuration: the installed one with the metrics disk at $2, a 1 s
# period and one extra metric, PackagingTest, whose value is $3.
write_config() {
    local conf=$1 disk=$2 value=$3
    sed -e "s#<path>$SHM_DISK</path>#<path>$disk</path>#" \
        -e "s#<update_period>[0-9]*</update_period>#<update_period>1</update_period>#" \
        -e "s#</metrics>#<metric type=\"string\" context=\"host\"><name>PackagingTest</name><action>echo $value</action></metric></metrics>#" \
        /etc/vhostmd/vhostmd.conf >"$conf.new"
    grep -q "<path>$disk</path>" "$conf.new" || fail "no <path>$SHM_DISK</path> in vhostmd.conf"
    grep -q "<update_period>1</update_period>" "$conf.new" || fail "no <update_period> in vhostmd.conf"
    grep -q "PackagingTest" "$conf.new" || fail "no </metrics> in vhostmd.conf"
    mv "$conf.new" "$conf"
}

# --- can it run here? ----------------------------------------------------------

[ "$(id -u)" -eq 0 ] || skip "needs root (installs packages)"
# One packaging test at a time on a machine (several checkouts, several test
# runs): a second one would install and purge the packages under the first.
LOCK=/run/lock/vhostmd-packaging-test.lock
exec 8>>"$LOCK"
if ! flock -n 8; then
    say "another packaging test runs on this machine: waiting for it (at most 300 s)"
    flock -w 300 8 || skip "another packaging test still runs after 300 s ($LOCK)"
fi
# The lock stays with a small process that ends with this script, not with
# fd 8, which every daemon started here would inherit and keep.
tail --pid=$$ -f /dev/null </dev/null >/dev/null 2>&1 &
LOCK_HOLDER=$!
exec 8>&-
if ! [ -r /etc/debian_version ] || ! command -v apt-get >/dev/null; then
    skip "needs Debian (apt-get, dpkg)"
fi
for pkg in "${PACKAGES[@]}"; do
    case $(installed_state "$pkg") in
        ""|un|pn) ;;
        *) skip "package $pkg is installed already; this test installs and purges it: purge it first" ;;
    esac
done
# "9<" opens the file without creating it (flock FILE would).
if [ -s "$PIDFILE" ] && ! flock -n -s 9 2>/dev/null 9<"$PIDFILE"; then
    skip "a vhostmd runs already with the pid file $PIDFILE"
fi
[ -e "$SHM_DISK" ] || SHM_DISK_EXISTED=0
if [ -d /run/systemd/system ]; then
    say "systemd runs here: the init script commands go to vhostmd.service"
fi

# --- build dependencies ------------------------------------------------------------

missing=()
for pkg in "${BUILD_DEPS[@]}"; do
    [ "$(installed_state "$pkg")" = ii ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing build dependencies: ${missing[*]}"
    "${APT[@]}" update >/dev/null
    "${APT[@]}" install --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- build from a copy -------------------------------------------------------------

WORK=$(mktemp -d /tmp/vhostmd-packaging.XXXXXX)
SRC=$WORK/src
mkdir "$WORK/run"

# Every path of the source tree, to compare with what "debian/rules clean"
# leaves after the build (build.sh wrote the list before building).
source_tree() {
    (cd "$SRC" && find . | sort)
}

say "building from a copy of the checkout in $SRC: dpkg-buildpackage -us -uc -b (log: $WORK/build.log)"
VERSION=$(bash "$REPO/tests/packaging/build.sh" "$WORK") || fail "building the packages failed"
say "built $VERSION"

say "debian/rules clean leaves the source tree as it was"
(cd "$SRC" && env -i PATH="$PATH" HOME="$WORK" LC_ALL=C.UTF-8 debian/rules clean) \
    >"$WORK/clean.log" 2>&1 || { cat "$WORK/clean.log" >&2; fail "debian/rules clean failed"; }
source_tree >"$WORK/tree.after"
if ! diff "$WORK/tree.before" "$WORK/tree.after" >&2; then
    fail "debian/rules clean leaves build leftovers in the source tree (> above), or removes sources (<)"
fi
DAEMON_DEB=$WORK/vhostmd_${VERSION}_all.deb
GUEST_DEB=$WORK/vm-dump-metrics_${VERSION}_all.deb
CHANGES=$(ls "$WORK"/vhostmd_"${VERSION}"_*.changes)
if ! [ -f "$DAEMON_DEB" ] || ! [ -f "$GUEST_DEB" ]; then
    fail "no .deb files in $WORK"
fi

# --- file lists ----------------------------------------------------------------------

say "checking the file lists"
# Files and symlinks (not directories), without the leading "./".
deb_files() {
    dpkg-deb -c "$1" | awk '$1 !~ /^d/ { sub(/^\.\//, "", $6); print $6 }' | sort
}
deb_files "$DAEMON_DEB" >"$WORK/vhostmd.files"
deb_files "$GUEST_DEB" >"$WORK/vm-dump-metrics.files"

expect_files() {
    local package=$1 path
    shift
    for path in "$@"; do
        grep -qxF "$path" "$WORK/$package.files" || fail "package $package lacks $path"
    done
}
expect_files vhostmd \
    usr/sbin/vhostmd usr/sbin/rcvhostmd \
    etc/vhostmd/vhostmd.conf etc/vhostmd/vhostmd.dtd etc/vhostmd/metric.dtd \
    etc/default/vhostmd etc/init.d/vhostmd \
    usr/share/man/man8/vhostmd.8.gz usr/share/man/man8/rcvhostmd.8.gz \
    usr/share/doc/vhostmd/copyright usr/share/doc/vhostmd/changelog.gz \
    usr/share/doc/vhostmd/examples/vhostmd.conf \
    usr/share/doc/vhostmd/examples/vhostmd-pvc.conf \
    usr/share/doc/vhostmd/examples/vhostmd-pvc-domain.xml \
    etc/libvirt/hooks/qemu.d/vhostmd \
    "$PRIVATE/etc/vhostmd.dtd" "$PRIVATE/etc/metric.dtd" usr/share/vhostmd/scripts/pagerate.pl
# Upstream configs run it through PATH: it must stay executable.
# (grep without -q: an early exit would fail the pipeline under pipefail.)
dpkg-deb -c "$DAEMON_DEB" | grep -E '^-rwxr-xr-x .* \./usr/share/vhostmd/scripts/pagerate\.pl$' \
    >/dev/null || fail "package vhostmd lacks an executable usr/share/vhostmd/scripts/pagerate.pl"
# libvirtd runs only executable hooks.
dpkg-deb -c "$DAEMON_DEB" | grep -E '^-rwxr-xr-x .* \./etc/libvirt/hooks/qemu\.d/vhostmd$' \
    >/dev/null || fail "package vhostmd lacks an executable /etc/libvirt/hooks/qemu.d/vhostmd"
# dh_compress compresses the README (long enough) or not (short): either.
grep -qxE 'usr/share/doc/vhostmd/README\.md(\.gz)?' "$WORK/vhostmd.files" \
    || fail "package vhostmd lacks usr/share/doc/vhostmd/README.md"
grep -qxE 'usr/share/doc/vhostmd/README\.Debian(\.gz)?' "$WORK/vhostmd.files" \
    || fail "package vhostmd lacks usr/share/doc/vhostmd/README.Debian"
# The pages the README links to, uncompressed so that its links work.
for page in operations configuration lifecycle pvc migrating formats; do
    grep -qx "usr/share/doc/vhostmd/docs/$page.md" "$WORK/vhostmd.files" \
        || fail "package vhostmd lacks usr/share/doc/vhostmd/docs/$page.md"
done
grep -qx 'usr/share/doc/vhostmd/README.md' "$WORK/vhostmd.files" \
    || fail "package vhostmd compresses README.md (its links to docs/ would break)"
grep -qxE '(usr/)?lib/systemd/system/vhostmd\.service' "$WORK/vhostmd.files" \
    || fail "package vhostmd lacks vhostmd.service"
expect_files vm-dump-metrics \
    usr/sbin/vm-dump-metrics usr/sbin/vm_dump_metrics \
    usr/share/man/man1/vm-dump-metrics.1.gz usr/share/man/man1/vm_dump_metrics.1.gz \
    usr/share/doc/vm-dump-metrics/copyright usr/share/doc/vm-dump-metrics/changelog.gz \
    usr/share/doc/vm-dump-metrics/guest.md usr/share/doc/vm-dump-metrics/formats.md
for unit in vm-dump-metrics-textfile.service vm-dump-metrics-textfile.timer; do
    grep -qxE "(usr/)?lib/systemd/system/$unit" "$WORK/vm-dump-metrics.files" \
        || fail "package vm-dump-metrics lacks $unit"
done

# Every module of the checkout is in exactly the package it belongs to.
for pair in core: guest:guest supervisor:supervisor workers:workers disk:disk virtio:virtio runtime:runtime etc:etc; do
    folder=${pair%%:*}
    sub=${pair#*:}
    case $folder in core|guest) owner=vm-dump-metrics ;; *) owner=vhostmd ;; esac
    while IFS= read -r module; do
        rel=${module#"$SRC/$folder/"}
        expect_files "$owner" "$PRIVATE/${sub:+$sub/}$rel"
    done < <(find "$SRC/$folder" -name '*.py' -not -path '*/__pycache__/*')
done

both=$(comm -12 "$WORK/vhostmd.files" "$WORK/vm-dump-metrics.files")
[ -z "$both" ] || fail "files in both packages: $both"
if grep -hE '^usr/lib/python3|^usr/bin/|\.pyc$|__pycache__|\.dist-info/|\.egg-info/' \
        "$WORK/vhostmd.files" "$WORK/vm-dump-metrics.files"; then
    fail "public modules, bytecode, metadata or /usr/bin files in the packages (above)"
fi
if grep -E "^$PRIVATE/(supervisor|workers|disk|virtio|runtime|etc)/" "$WORK/vm-dump-metrics.files"; then
    fail "host-side modules in vm-dump-metrics (above)"
fi

conffiles=$(dpkg-deb -I "$DAEMON_DEB" conffiles | sort | paste -sd' ')
[ "$conffiles" = "/etc/default/vhostmd /etc/init.d/vhostmd /etc/libvirt/hooks/qemu.d/vhostmd /etc/vhostmd/vhostmd.conf" ] \
    || fail "vhostmd conffiles: $conffiles"
dpkg-deb --fsys-tarfile "$DAEMON_DEB" | tar -xOf - ./etc/vhostmd/vhostmd.conf \
    | cmp -s - "$SRC/etc/vhostmd-pvc.conf" \
    || fail "/etc/vhostmd/vhostmd.conf is not etc/vhostmd-pvc.conf"

say "checking the dependencies"
# grep -q reads from here-strings, not "echo ... |": it may exit before echo
# has written everything, and with pipefail the SIGPIPE fails the check.
# Package names of a Depends field, one a line.
depends() {
    dpkg-deb -f "$1" Depends | tr ',' '\n' | sed -e 's/^ *//' -e 's/ *$//'
}
daemon_depends=$(depends "$DAEMON_DEB")
guest_depends=$(depends "$GUEST_DEB")
echo "vhostmd Depends: $(echo "$daemon_depends" | paste -sd,)"
echo "vm-dump-metrics Depends: $(echo "$guest_depends" | paste -sd,)"
for dep in python3-libvirt python3-lxml python3-psutil python3-setproctitle \
           "vm-dump-metrics (= $VERSION)"; do
    grep -qxF "$dep" <<<"$daemon_depends" || fail "vhostmd does not depend on $dep"
done
grep -qE '^python3(:any)? ' <<<"$daemon_depends" || fail "vhostmd does not depend on python3"
grep -qxF python3-lxml <<<"$guest_depends" || fail "vm-dump-metrics does not depend on python3-lxml"
grep -qxF python3-prometheus-client <<<"$guest_depends" \
    || fail "vm-dump-metrics does not depend on python3-prometheus-client"
grep -qE '^python3(:any)? ' <<<"$guest_depends" || fail "vm-dump-metrics does not depend on python3"
if grep -E 'libvirt|psutil|setproctitle|vhostmd' <<<"$guest_depends"; then
    fail "vm-dump-metrics depends on host-side packages (above)"
fi
for deb in "$DAEMON_DEB" "$GUEST_DEB"; do
    [ "$(dpkg-deb -f "$deb" Architecture)" = all ] || fail "$deb is not Architecture: all"
done

# --- lintian -------------------------------------------------------------------------

say "lintian (fails on errors)"
lintian_rc=0
lintian --fail-on error --display-level '>=warning' "$CHANGES" >"$WORK/lintian.log" 2>&1 \
    || lintian_rc=$?
grep -v 'running with root privileges' "$WORK/lintian.log" || true
[ "$lintian_rc" -eq 0 ] || fail "lintian reports errors"

# --- the guest package alone -------------------------------------------------------

say "installing vm-dump-metrics alone"
INSTALLED=1
if ! "${APT[@]}" install --no-install-recommends "$GUEST_DEB" >"$WORK/install-guest.log" 2>&1; then
    # Fresh machines have no package lists for python3-lxml.
    "${APT[@]}" update >/dev/null
    "${APT[@]}" install --no-install-recommends "$GUEST_DEB" >"$WORK/install-guest.log" 2>&1 \
        || { tail -n 20 "$WORK/install-guest.log" >&2; fail "cannot install vm-dump-metrics"; }
fi
C_DISK=$SRC/tests/data/compat/upstream-1.2-disk-4k.img
/usr/sbin/vm-dump-metrics --help >/dev/null || fail "vm-dump-metrics --help"
/usr/sbin/vm-dump-metrics --disk "$C_DISK" | grep -q '<metrics>' \
    || fail "vm-dump-metrics cannot read the C vhostmd's disk $C_DISK"
/usr/sbin/vm_dump_metrics --disk "$C_DISK" --format json >/dev/null \
    || fail "vm_dump_metrics (the C name) does not work"
/usr/sbin/vm-dump-metrics --disk "$C_DISK" --format prometheus \
    | grep -q '^vhostmd_guest_read_success 1' || fail "vm-dump-metrics --format prometheus"
# The textfile timer is installed, neither enabled nor started.
[ ! -e /etc/systemd/system/timers.target.wants/vm-dump-metrics-textfile.timer ] \
    || fail "vm-dump-metrics-textfile.timer is enabled on install"
mkdir -m 0755 "$WORK/textfile"
/usr/sbin/vm-dump-metrics --disk "$C_DISK" --textfile "$WORK/textfile/guest.prom" \
    || fail "vm-dump-metrics --textfile"
grep -q '^vhostmd_guest_read_success 1' "$WORK/textfile/guest.prom" \
    || fail "vm-dump-metrics --textfile wrote no metrics"
# The guest code must work without the host's libraries: make importing them
# fail, and read the disk through the installed modules.
python3 -I - "$C_DISK" <<'EOF' || fail "the guest tool needs libvirt, psutil or setproctitle"
import sys
for name in ("libvirt", "psutil", "setproctitle"):
    sys.modules[name] = None  # "import name" raises ImportError
sys.path.insert(0, "/usr/share/vhostmd")
from vhostmd.guest.cli import main
if main(["--disk", sys.argv[1], "--dest", "/dev/null"]) != 0:
    sys.exit(1)
sys.exit(main(["--disk", sys.argv[1], "--format", "prometheus", "--dest", "/dev/null"]))
EOF

# --- install both: enabled and started ----------------------------------------------

if [ -e "$POLICY" ]; then
    # Containers deny every service start (exit 101). Let vhostmd's through,
    # to see the postinst start it, and keep denying everything else.
    POLICY_BACKUP=$WORK/policy-rc.d.orig
    cp -p "$POLICY" "$POLICY_BACKUP"
    cat >"$POLICY.vhostmd-test" <<'EOF'
#!/bin/sh
# Temporary, from vhostmd's tests/packaging/run.sh: allow vhostmd only.
for arg; do [ "$arg" = vhostmd ] && exit 0; done
exit 101
EOF
    chmod 755 "$POLICY.vhostmd-test"
    mv -f "$POLICY.vhostmd-test" "$POLICY"
fi

say "installing both packages: apt-get install ./vhostmd_*.deb ./vm-dump-metrics_*.deb"
(cd "$WORK" && "${APT[@]}" install --no-install-recommends "./${DAEMON_DEB##*/}" "./${GUEST_DEB##*/}") \
    >"$WORK/install.log" 2>&1 || { tail -n 30 "$WORK/install.log" >&2; fail "apt-get install failed"; }
for pkg in "${PACKAGES[@]}"; do
    [ "$(installed_state "$pkg")" = ii ] || fail "$pkg is not installed"
done
ls /etc/rc2.d/S*vhostmd >/dev/null 2>&1 || fail "not enabled: no /etc/rc2.d/S*vhostmd"
say "checking the shipped configurations"
for conf in /etc/vhostmd/vhostmd.conf /usr/share/doc/vhostmd/examples/vhostmd.conf \
            /usr/share/doc/vhostmd/examples/vhostmd-pvc.conf; do
    /usr/sbin/vhostmd --check -f "$conf" || fail "the shipped configuration $conf is invalid"
    # Every directory of the actions' PATH (<globals><path>) is there.
    python3 -I - "$conf" <<'EOF' || fail "$conf: its <path> names a directory that does not exist"
import os, sys
import xml.etree.ElementTree as ET
entries = ET.parse(sys.argv[1]).getroot().findtext("globals/path", "").split(":")
missing = [e for e in entries if not os.path.isdir(e)]
if missing:
    sys.exit(f"{sys.argv[1]}: no directory {', '.join(missing)}")
EOF
done
if command -v systemd-analyze >/dev/null; then
    for unit in /lib/systemd/system/vhostmd.service /usr/lib/systemd/system/vhostmd.service; do
        [ -e "$unit" ] || continue
        systemd-analyze verify --man=no "$unit" || fail "systemd-analyze verify $unit"
        # The sandboxing stays (5.0 with systemd 252; 9.6 without it). The
        # threshold is the exposure times 10.
        systemd-analyze security --offline=true --threshold=55 "$unit" >"$WORK/security.log" 2>&1 \
            || { tail -n 3 "$WORK/security.log" >&2; fail "systemd-analyze security: exposure above 5.5"; }
        tail -n 1 "$WORK/security.log"
        break
    done
fi

say "the postinst started the daemon (VHOSTMD_URI=qemu:///system, metrics disk $SHM_DISK)"
retry 10 daemon_pid || { cat "$WORK/install.log" >&2; fail "the daemon did not start on install"; }
track "$(daemon_pid)"
init_script 0 status
retry 15 metric "$SHM_DISK" HostName || fail "no metrics on $SHM_DISK"
init_script 0 stop
no_process_left "after stop"

# --- the daemon in the foreground ------------------------------------------------------

say "vhostmd -d -f CONF -c test:///default, disk under $WORK/run"
write_config "$WORK/fg.conf" "$WORK/run/fg-vhostmd0" first
/usr/sbin/vhostmd --check -f "$WORK/fg.conf"
# In its own session, to find all its processes afterwards.
setsid /usr/sbin/vhostmd -d -f "$WORK/fg.conf" -c test:///default -p "$WORK/run/fg.pid" \
    >"$WORK/fg.log" 2>&1 &
fg_pid=$!
track "$fg_pid"
retry 20 metric_is "$WORK/run/fg-vhostmd0" PackagingTest first \
    || { cat "$WORK/fg.log" >&2; fail "the foreground daemon publishes no metrics"; }
/usr/sbin/vm-dump-metrics --disk "$WORK/run/fg-vhostmd0" >"$WORK/fg-metrics.xml"
grep -q "<name>HostName</name>" "$WORK/fg-metrics.xml" || fail "no HostName metric"
# test:///default runs one domain: vm metrics from libvirt must be there.
retry 10 sh -c "/usr/sbin/vm-dump-metrics --disk '$WORK/run/fg-vhostmd0' | grep -q \"context='vm'\"" \
    || fail "no vm metrics from test:///default"
titles=$(ps -o args= --sid "$fg_pid")
for title in "vhostmd: supervisor" "vhostmd: worker" "vhostmd: disk-writer" \
             "vhostmd: forkserver"; do
    grep -q "^$title" <<<"$titles" || fail "no process titled '$title': $titles"
done
# The forkserver unlinks the queues' semaphores: no resource tracker is started.
if grep -q resource <<<"$titles"; then fail "a resource tracker runs: $titles"; fi
# Every process of the daemon says what it is (actions run in sessions of
# their own), and the forkserver's preload ran: libvirt is in its memory
# (the package's private module tree is on the forkserver's path).
if grep -v '^vhostmd: ' <<<"$titles"; then
    fail "processes of the daemon without a vhostmd: title (above)"
fi
forkserver=$(ps -o pid=,args= --sid "$fg_pid" | awk '$2 == "vhostmd:" && $3 == "forkserver" { print $1 }')
grep -q libvirt "/proc/$forkserver/maps" \
    || fail "the forkserver's preload did not run: libvirt is not in its memory"
kill -TERM "$fg_pid"
fg_rc=0
wait "$fg_pid" || fg_rc=$?
[ "$fg_rc" -eq 0 ] || { cat "$WORK/fg.log" >&2; fail "vhostmd exited with status $fg_rc on SIGTERM"; }
[ ! -e "$WORK/run/fg.pid" ] || fail "the pid file is left after SIGTERM"
no_process_left "after SIGTERM"

# --- the libvirt hook ----------------------------------------------------------------------

say "/etc/libvirt/hooks/qemu.d/vhostmd as libvirtd runs it (prepare begin, domain XML on stdin)"
hook=/etc/libvirt/hooks/qemu.d/vhostmd
vm_uuid=5a3c0d2e-7f41-4b8e-9c1d-2e6f8a9b0c11
write_config "$WORK/hook.conf" "$WORK/run/hook-vhostmd0" hook
sed -i "s#</globals>#<vm_disks><path>$WORK/run/vms</path></vm_disks></globals>#" "$WORK/hook.conf"
/usr/sbin/vhostmd --check -f "$WORK/hook.conf" || fail "the hook test's configuration is invalid"
echo "VHOSTMD_CONFIG=$WORK/hook.conf" >"$WORK/hook-default"
cat >"$WORK/hook-domain.xml" <<EOF
<domain type='kvm'><name>web1</name><uuid>$vm_uuid</uuid><devices>
<disk type='file' device='disk'><driver name='qemu' type='raw'/>
<source file='$WORK/run/vms/$vm_uuid'/><target dev='sdz' bus='usb'/><readonly/></disk>
</devices></domain>
EOF
out=$("$hook" web1 started begin - <"$WORK/hook-domain.xml" 2>&1) || fail "hook (started begin) failed: $out"
[ -z "$out" ] && [ ! -e "$WORK/run/vms" ] || fail "hook (started begin) did something: $out"
started=$(date +%s%N)
out=$(VHOSTMD_DEFAULTS="$WORK/hook-default" "$hook" web1 prepare begin - <"$WORK/hook-domain.xml" 2>&1) \
    || fail "hook (prepare begin) failed: $out"
took=$(( ($(date +%s%N) - started) / 1000000 ))
[ -z "$out" ] || fail "hook (prepare begin) printed: $out"
[ "$(stat -c '%s %a %U' "$WORK/run/vms/$vm_uuid")" = "65536 644 root" ] \
    || fail "hook made no 64 KiB root file $WORK/run/vms/$vm_uuid"
say "the hook made $WORK/run/vms/$vm_uuid in $took ms"

# --- the init script ---------------------------------------------------------------------

say "/etc/init.d/vhostmd with URI test:///default and a disk under $WORK/run"
DEFAULT_BACKUP=$WORK/default.orig
cp -p /etc/default/vhostmd "$DEFAULT_BACKUP"
INIT_DISK=$WORK/run/init-vhostmd0
write_config "$WORK/init.conf" "$INIT_DISK" first
cat >/etc/default/vhostmd <<EOF
# Temporary, from vhostmd's tests/packaging/run.sh.
VHOSTMD_CONFIG=$WORK/init.conf
VHOSTMD_URI=test:///default
VHOSTMD_PIDFILE=$WORK/run/init.pid
VHOSTMD_OPTIONS="-v"
EOF
# The test's own pid file: no other vhostmd on this machine can be stopped
# by mistake in this phase.
use_pid_file "$WORK/run/init.pid"

init_script 0 start
pid=$(daemon_pid) || fail "no pid in $PIDFILE after start"
track "$pid"
init_script 0 status
retry 15 metric_is "$INIT_DISK" PackagingTest first || fail "no metrics on $INIT_DISK"
init_script 0 start
[ "$(daemon_pid)" = "$pid" ] || fail "a second start replaced the daemon"

write_config "$WORK/init.conf" "$INIT_DISK" second
init_script 0 reload
retry 10 metric_is "$INIT_DISK" PackagingTest second || fail "reload did not apply the new configuration"
[ "$(daemon_pid)" = "$pid" ] || fail "reload replaced the daemon"

cp "$WORK/init.conf" "$WORK/init.conf.good"
echo "<broken" >>"$WORK/init.conf"
rc=0
out=$(/etc/init.d/vhostmd reload 2>&1) || rc=$?
echo "$out"
[ "$rc" -ne 0 ] || fail "reload with a broken configuration reported success"
grep -q "init.conf:[0-9]*: " <<<"$out" || fail "reload does not say what is wrong in the configuration"
init_script 0 status
metric_is "$INIT_DISK" PackagingTest second || fail "the daemon lost its configuration on a broken reload"
mv "$WORK/init.conf.good" "$WORK/init.conf"
init_script 0 force-reload

# restart and try-restart check the configuration before they stop anything:
# with a broken file the running daemon stays, and they say why.
cp "$WORK/init.conf" "$WORK/init.conf.good"
echo "<broken" >>"$WORK/init.conf"
for command in restart try-restart; do
    rc=0
    out=$(/etc/init.d/vhostmd "$command" 2>&1) || rc=$?
    echo "$out"
    [ "$rc" -eq 1 ] || fail "$command with a broken configuration: exit status $rc, expected 1"
    grep -q "init.conf:[0-9]*: " <<<"$out" \
        || fail "$command does not say what is wrong in the configuration"
    [ "$(daemon_pid)" = "$pid" ] || fail "$command with a broken configuration stopped the daemon"
    init_script 0 status
    kill -0 "$pid" || fail "$command with a broken configuration stopped the daemon"
done
mv "$WORK/init.conf.good" "$WORK/init.conf"

init_script 0 restart
new_pid=$(daemon_pid) || fail "no pid in $PIDFILE after restart"
[ "$new_pid" != "$pid" ] || fail "restart kept the same daemon"
track "$new_pid"
init_script 0 status
/usr/sbin/rcvhostmd status >/dev/null || fail "rcvhostmd status"

pid=$new_pid
init_script 0 try-restart
new_pid=$(daemon_pid) || fail "no pid in $PIDFILE after try-restart"
[ "$new_pid" != "$pid" ] || fail "try-restart kept the same daemon"
track "$new_pid"
retry 15 metric_is "$INIT_DISK" PackagingTest second || fail "no metrics after try-restart"
no_process_left_but "$new_pid" "after try-restart"

# The usage line names the command that was run.
for command in /etc/init.d/vhostmd /usr/sbin/rcvhostmd; do
    rc=0
    out=$("$command" no-such-command 2>&1) || rc=$?
    [ "$rc" -ne 0 ] || fail "$command no-such-command reported success"
    expected="Usage: ${command#/usr/sbin/} {"
    case $out in
        "$expected"*) ;;
        *) fail "$command no-such-command says: $out (expected: $expected...)" ;;
    esac
done

# stop returns once every process of the daemon is gone, not when the lock is.
# Slowed down (nice 19, on a CPU a busy loop holds), a daemon on a machine busy
# besides can need more than the default 30 s to exit: it gets the time, as
# this checks a slow exit, not a kill.
echo "VHOSTMD_STOP_TIMEOUT=300" >>/etc/default/vhostmd
slow_down "$(ps -o sid= -p "$new_pid" | tr -d ' ')"
init_script 0 stop
no_process_left "after /etc/init.d/vhostmd stop (slow to exit)"
end_slow_down
sed -i '/^VHOSTMD_STOP_TIMEOUT=300$/d' /etc/default/vhostmd
init_script 3 status
[ ! -e "$PIDFILE" ] || fail "$PIDFILE is left after stop"
init_script 0 stop
init_script 7 reload
init_script 0 force-reload
# try-restart leaves a daemon that does not run alone.
init_script 0 try-restart
init_script 3 status

cp "$WORK/init.conf" "$WORK/init.conf.good"
echo "<broken" >>"$WORK/init.conf"
rc=0
out=$(/etc/init.d/vhostmd start 2>&1) || rc=$?
echo "$out"
[ "$rc" -ne 0 ] || fail "start with a broken configuration reported success"
grep -q "init.conf:[0-9]*: " <<<"$out" || fail "start does not say what is wrong in the configuration"
init_script 3 status
mv "$WORK/init.conf.good" "$WORK/init.conf"

if [ -d /run/systemd/system ]; then
    say "not stopping a hung daemon through the init script: systemd runs here"
else
    say "stopping a hung daemon (all its processes stopped with SIGSTOP, an action running)"
    echo "VHOSTMD_STOP_TIMEOUT=2" >>/etc/default/vhostmd
    # An action that runs until the cycle's deadline: "sleep" is there most
    # of the time, in a session of its own (the workers start actions so),
    # and without a parent-death signal: when its worker dies, it stays.
    write_config "$WORK/init.conf" "$INIT_DISK" "hung; exec sleep 600"
    init_script 0 start
    pid=$(daemon_pid) || fail "no pid in $PIDFILE after start"
    track "$pid"
    retry 15 metric "$INIT_DISK" HostName || fail "no metrics on $INIT_DISK"
    sid=$(ps -o sid= -p "$pid" | tr -d ' ')
    # The supervisor, its forkserver, 4 workers, the disk-writer and the
    # virtio process; no events process with the in-process test driver
    # (children start once the forkserver has imported everything: the disk
    # may still show the previous daemon's document before that).
    retry 30 session_has_children "$sid" 8 \
        || fail "only $(pgrep -c -s "$sid" '^vhostmd') vhostmd processes in the daemon's session"
    # The daemon's named semaphores (its queues'): none may stay in /dev/shm.
    mapfile -t sems < <(session_semaphores "$sid")
    [ ${#sems[@]} -gt 0 ] || fail "no named semaphore mapped by the daemon's processes"
    # Freeze the daemon (the supervisor first) while a worker runs the action.
    action=""
    for _ in $(seq 50); do
        kill -STOP "$pid"
        # shellcheck disable=SC2046 # a list of pids
        kill -STOP $(session_pids "$sid")
        action=$(pgrep -x -P "$(session_pids "$sid" | paste -sd,)" sleep || true)
        [ -z "$action" ] || break
        # shellcheck disable=SC2046 # a list of pids
        kill -CONT $(session_pids "$sid")
        sleep 0.2
    done
    [ -n "$action" ] || fail "the action never ran: no sleep under the daemon's workers"
    # Its own session: the cleanup kills it if the test fails.
    SESSIONS+=("$action")
    rc=0
    out=$(/etc/init.d/vhostmd stop 2>&1) || rc=$?
    echo "$out"
    [ "$rc" -eq 0 ] || fail "stop of a hung daemon: exit status $rc"
    grep -q "killing" <<<"$out" || fail "stop does not say that it kills a hung daemon"
    if [ -n "$(session_pids "$action")" ]; then
        fail "the hung daemon's action (pid $action) is left"
    fi
    no_process_left "after stopping a hung daemon"
    [ ! -e "$PIDFILE" ] || fail "$PIDFILE is left after stopping a hung daemon"
    retry 5 none_exist "${sems[@]}" \
        || fail "the hung daemon's semaphores are left in /dev/shm: ${sems[*]}"
    init_script 3 status
fi

cp -p "$DEFAULT_BACKUP" /etc/default/vhostmd
DEFAULT_BACKUP=""
use_pid_file "$DEFAULT_PIDFILE"

# --- removal ---------------------------------------------------------------------------

say "purging the packages while the daemon runs"
init_script 0 start
retry 10 daemon_pid || fail "no pid in $PIDFILE after start"
track "$(daemon_pid)"
"${APT[@]}" purge "${PACKAGES[@]}" >"$WORK/purge.log" 2>&1 \
    || { tail -n 20 "$WORK/purge.log" >&2; fail "apt-get purge failed"; }
INSTALLED=0
no_process_left "after purge"
[ ! -e "$PIDFILE" ] || fail "$PIDFILE is left after purge"
for path in /etc/vhostmd /etc/default/vhostmd /etc/init.d/vhostmd /usr/share/vhostmd \
            /etc/libvirt/hooks/qemu.d/vhostmd \
            /usr/sbin/vhostmd /usr/sbin/rcvhostmd /usr/sbin/vm-dump-metrics /usr/sbin/vm_dump_metrics; do
    if [ -e "$path" ] || [ -L "$path" ]; then
        fail "$path is left after purge"
    fi
done
if ls /etc/rc?.d/*vhostmd >/dev/null 2>&1; then
    fail "init script links are left after purge"
fi
