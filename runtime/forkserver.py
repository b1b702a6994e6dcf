"""Imported only by the forkserver (first of its preloads): names it for `ps`.

Python starts the forkserver as ``python3 -c 'from multiprocessing.forkserver
import main; ...'``; operators watching ``ps`` should see what it is.
"""

import setproctitle

setproctitle.setproctitle("vhostmd: forkserver")
