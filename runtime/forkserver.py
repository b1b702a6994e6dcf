"""The forkserver's only preload: everything children run, imported once, then frozen.

Children are forked from the forkserver and share its pages. Importing what
they run here (libvirt and lxml included) makes each child start with it
loaded; ``gc.freeze`` then moves those objects out of the collector's sight,
so a child's garbage collections never write to (and so never copy) the
pages it shares. The title tells operators watching ``ps`` what this is
(Python starts it as ``python3 -c 'from multiprocessing.forkserver ...'``).
"""

import gc

import setproctitle

import vhostmd.disk.vmwriter
import vhostmd.disk.writer
import vhostmd.virtio.manager
import vhostmd.workers.events
import vhostmd.workers.worker  # noqa: F401
from vhostmd.runtime.child import clean_up_at_forkserver_exit

setproctitle.setproctitle("vhostmd: forkserver")
clean_up_at_forkserver_exit()
gc.collect()
gc.freeze()
