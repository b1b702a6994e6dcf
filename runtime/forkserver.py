"""The forkserver's only preload: everything children run, imported once, then frozen.

Children are forked from the forkserver and share its pages. Importing what
they run here (libvirt and lxml included) makes each child start with it
loaded; ``gc.freeze`` then moves those objects out of the collector's sight,
so a child's garbage collections never write to (and so never copy) the
pages it shares. The title tells operators watching ``ps`` what this is
(Python starts it as ``python3 -c 'from multiprocessing.forkserver ...'``).

Under -u it is started as root: the first thing it does is become the user,
not traceable by that user (``runtime/privileges.py``); everything below is
then imported as the user.
"""

from vhostmd.runtime.privileges import drop_in_forkserver

drop_in_forkserver()

from vhostmd.runtime.footprint import limit_address_space  # noqa: E402

limit_address_space()  # children are forked from here: they inherit it

import gc  # noqa: E402 - imported as the user, after the line above

import setproctitle  # noqa: E402

import vhostmd.disk.vmwriter  # noqa: E402
import vhostmd.disk.writer  # noqa: E402
import vhostmd.virtio.manager  # noqa: E402
import vhostmd.workers.events  # noqa: E402
import vhostmd.workers.worker  # noqa: E402, F401
from vhostmd.runtime.child import clean_up_at_forkserver_exit  # noqa: E402

setproctitle.setproctitle("vhostmd: forkserver")
clean_up_at_forkserver_exit()
gc.collect()
gc.freeze()
