"""The Debian packages, end to end: tests/packaging/run.sh builds them from a
copy of the checkout, checks them, installs them on this machine, runs the
daemon, the init script and the guest tool, and purges them.

It needs root and dpkg-buildpackage; elsewhere it is skipped. Leave it out
with ``-m 'not packaging'``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

SCRIPT = Path(__file__).parent / "packaging" / "run.sh"
SKIP_STATUS = 77  # run.sh: cannot run here


@pytest.mark.timeout(600)
def test_debian_packages() -> None:
    if os.geteuid() != 0:
        pytest.skip("installs packages: needs root")
    if shutil.which("dpkg-buildpackage", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        pytest.skip("dpkg-buildpackage is not installed (apt-get install dpkg-dev)")
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=570)
    finally:
        if proc.poll() is None:
            # Timed out (here or through pytest-timeout): SIGTERM lets the
            # script clean up (kill its daemons, restore /etc/default, purge).
            proc.terminate()
            proc.communicate(timeout=120)
    if proc.returncode == SKIP_STATUS:
        reason = [line for line in output.splitlines() if line.startswith("SKIP:")]
        pytest.skip(reason[-1] if reason else "tests/packaging/run.sh cannot run here")
    assert proc.returncode == 0, f"tests/packaging/run.sh failed:\n{output}"
