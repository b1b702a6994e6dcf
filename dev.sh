#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) and run vhostmd from this checkout.
#
#   ./dev.sh demo   install what is needed, run the daemon in the foreground on
#                   libvirt's test:///default driver with a metrics disk in
#                   ./run/, and show what a guest reads from it
#   ./dev.sh test   install what is needed and run the whole test suite
#   ./dev.sh demo-qemu
#                   optional: boot one real QEMU guest under libvirtd's QEMU
#                   driver next to vhostmd and show what the guest reads
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

# libvirt-daemon: the fault tests start a private libvirtd (test driver only);
# dpkg-dev ... lintian: the packaging test builds and checks the .deb files;
# qemu-system-x86 ... busybox-static: the real-hypervisor tests (tests/test_qemu.py)
# run libvirtd's QEMU driver and boot guests from Debian's cloud kernel and a
# busybox initramfs built at test time (ss, from iproute2, shows who holds a channel);
# debootstrap, systemd-container: the systemd tests (tests/test_systemd.py) boot a
# Debian root under systemd-nspawn and install the packages there.
APT_PACKAGES=(python3 python3-venv python3-dev gcc pkg-config libvirt-dev libvirt-clients
              libvirt-daemon socat procps util-linux
              dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-setuptools lintian
              qemu-system-x86 libvirt-daemon-driver-qemu linux-image-cloud-amd64 busybox-static
              iproute2 debootstrap systemd-container)
VENV=.venv

say() { printf '==> %s\n' "$*" >&2; }

install_system_packages() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        say "missing Debian packages: ${missing[*]} (run as root, or install them first)"
        exit 1
    fi
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

install_python_env() {
    # Debian's python3, not whatever python3 comes first on PATH.
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        /usr/bin/python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        say "installing vhostmd and its test tools into $VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
        touch "$stamp"
    fi
}

# PVC attaches the metrics disk as a USB disk and Debian's cloud kernel has no
# USB: the real-hypervisor tests boot that guest on Debian's generic kernel.
# Its package is only downloaded (apt-get download; installing it would add
# 400 MB of modules and an initramfs in /boot, and repoint /vmlinuz, for
# nothing) into the rig's kernel cache, and tests/qemu_rig.py extracts the
# kernel and the few modules it needs, once.
fetch_usb_kernel() {
    # tests/qemu_rig.py: _kernel_cache_dir()
    local cache="${VHOSTMD_QEMU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhostmd-qemu}-kernel/debs"
    local deb
    for deb in "$cache"/linux-image-*-amd64_*_amd64.deb; do
        case $deb in *-cloud-amd64_*|*'*'*) ;; *) return 0 ;; esac
    done
    [ "$(id -u)" -eq 0 ] && [ "$(dpkg --print-architecture)" = amd64 ] || return 0
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
          | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }') || pkg=
    [ -n "$pkg" ] || { say "no linux-image-amd64 in apt: the USB guest test will skip"; return 0; }
    say "downloading $pkg into $cache (the USB guest's kernel; not installed)"
    mkdir -p "$cache"
    (cd "$cache" && { apt-get download -qq -o APT::Sandbox::User=root "$pkg" \
        || { apt-get update -qq && apt-get download -qq -o APT::Sandbox::User=root "$pkg"; }; }) \
        || say "could not download $pkg: the USB guest test will skip"
}

setup() {
    install_system_packages
    install_python_env
}

demo() {
    setup
    mkdir -p run
    local conf=run/demo.conf disk="$PWD/run/vhostmd0"
    # The shipped default config, with the disk under the checkout.
    sed -e "s#<path>/dev/shm/vhostmd0</path>#<path>$disk</path>#" etc/vhostmd.conf > "$conf"
    rm -f "$disk"
    say "starting vhostmd in the foreground (Ctrl-C stops it): config $conf, libvirt test:///default"
    "$VENV/bin/vhostmd" -d -f "$conf" -c test:///default -p run/vhostmd.pid &
    local pid=$!
    trap 'kill -TERM $pid 2>/dev/null; wait $pid; exit 0' INT TERM
    local tries=0
    until "$VENV/bin/vm-dump-metrics" --disk "$disk" >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ $tries -gt 100 ] || ! kill -0 $pid 2>/dev/null; then
            say "no metrics on $disk after 10 s"; kill -TERM $pid 2>/dev/null; wait $pid; exit 1
        fi
        sleep 0.1
    done
    say "what a guest reads from the metrics disk ($VENV/bin/vm-dump-metrics --disk $disk):"
    "$VENV/bin/vm-dump-metrics" --disk "$disk"
    say "processes (the daemon and its descendants, as ps shows them):"
    # Every process of the daemon: children hang below its forkserver.
    "$VENV/bin/python" -c 'import psutil, sys
root = psutil.Process(int(sys.argv[1]))
for p in [root, *root.children(recursive=True)]:
    print(f"{p.pid:>7}", " ".join(p.cmdline()).strip())' "$pid"
    say "vhostmd keeps running; Ctrl-C stops it"
    wait $pid
}

demo_qemu() {
    setup
    say "booting a real QEMU guest under libvirtd (qemu:///system) next to vhostmd"
    "$VENV/bin/python" tests/qemu_rig.py demo "$@"
}

run_tests() {
    setup
    fetch_usb_kernel
    # Lint problems do not hide the test results: pytest runs either way and its
    # summary line ("N passed ...") is printed; the exit status reports both.
    # No -q of our own: with the caller's -q it would become -qq, which drops that line.
    local lint=0 status=0
    say "ruff"
    "$VENV/bin/ruff" check . || lint=$?
    # Two pytest workers (tests/conftest.py says which tests share one);
    # VHOSTMD_TEST_JOBS=0 runs everything in one process. The whole suite runs
    # in two steps: first all but the systemd container and the real QEMU
    # guests, on both workers; then those two alone, because booting them takes
    # every CPU the machine has and the other tests' bounded waits would pay.
    local jobs=${VHOSTMD_TEST_JOBS:-2}
    local parallel=(-p no:cacheprovider -n "$jobs" --dist loadgroup --no-loadscope-reorder)
    if [ $# -gt 0 ]; then
        say "pytest $* ($jobs workers)"
        "$VENV/bin/pytest" "${parallel[@]}" "$@" || status=$?
    else
        say "pytest: all but the systemd and QEMU tests ($jobs workers)"
        "$VENV/bin/pytest" "${parallel[@]}" -m "not systemd and not qemu" || status=$?
        say "pytest: the systemd and QEMU tests"
        "$VENV/bin/pytest" -p no:cacheprovider -m "systemd or qemu" || status=$?
    fi
    if [ "$lint" -ne 0 ]; then
        say "ruff found problems (above)"
    fi
    if [ "$status" -ne 0 ]; then
        return "$status"
    fi
    return "$lint"
}

case "${1:-}" in
    demo) shift; demo "$@" ;;
    demo-qemu) shift; demo_qemu "$@" ;;
    test) shift; run_tests "$@" ;;
    *) echo "usage: $0 demo|demo-qemu|test [pytest args]" >&2; exit 2 ;;
esac
