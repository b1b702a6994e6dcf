"""``python3 -m vhostmd.guest``: the same as ``vm-dump-metrics``."""

import sys

from vhostmd.guest.cli import main

sys.exit(main())
