#!/usr/bin/env bash
# Build the Debian packages vhostmd and vm-dump-metrics from a copy of this
# checkout (what git knows of, uncommitted changes included), in WORK:
#
#   tests/packaging/build.sh WORK
#
# Leaves WORK/src (the copy, as the build left it), WORK/tree.before (every
# path of the copy before the build), WORK/build.log and WORK/*.deb, and
# prints the version built. Used by tests/packaging/run.sh and by the
# systemd rig (tests/systemd_rig.py). Needs dpkg-dev and the build
# dependencies (debian/control); not root.

set -eu -o pipefail

REPO=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH LC_ALL=C.UTF-8
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

WORK=${1:?usage: build.sh WORK}
SRC=$WORK/src
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

mkdir -p "$SRC"
# .git is a file in a worktree ("git worktree add"), a directory elsewhere.
if [ -e "$REPO/.git" ] && command -v git >/dev/null; then
    # What git knows of, with the working tree's content (uncommitted changes
    # too), not what it ignores (.venv, build/, run/...).
    git -C "$REPO" ls-files -z -co --exclude-standard \
        | (cd "$REPO" && while IFS= read -r -d '' f; do
               # Skip files deleted but not yet committed.
               if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
           done) \
        | tar -C "$REPO" --null -T - -cf - | tar -C "$SRC" -xf -
else
    tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=run --exclude=build \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
        --exclude=.ruff_cache --exclude=.hypothesis -cf - . | tar -C "$SRC" -xf -
fi

VERSION=$(dpkg-parsechangelog -l "$SRC/debian/changelog" -S Version)
CODE_VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$SRC/core/__init__.py")
[ "$VERSION" = "$CODE_VERSION" ] \
    || fail "debian/changelog says $VERSION, core/__init__.py says $CODE_VERSION: add a changelog entry"

# Every path of the source tree, to compare with what "debian/rules clean"
# leaves after the build.
(cd "$SRC" && find . | sort) >"$WORK/tree.before"

if ! (cd "$SRC" && env -i PATH="$PATH" HOME="$WORK" LC_ALL=C.UTF-8 \
        dpkg-buildpackage -us -uc -b) >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log" >&2
    fail "dpkg-buildpackage failed"
fi
for deb in "$WORK/vhostmd_${VERSION}_all.deb" "$WORK/vm-dump-metrics_${VERSION}_all.deb"; do
    [ -f "$deb" ] || fail "no $deb after the build"
done
echo "$VERSION"
