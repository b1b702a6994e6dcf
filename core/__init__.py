"""vhostmd: the Virtual Host Metrics Daemon, re-made in Python.

The top-level package holds only what host and guest share: the metrics-disk
format (:mod:`vhostmd.mdisk`), the XML document layout
(:mod:`vhostmd.document`), the virtio request framing
(:mod:`vhostmd.protocol`) and a safe XML parser (:mod:`vhostmd.xmlsafe`).
None of these import libvirt or psutil, so the guest package can ship them.
"""

__version__ = "2.0.0"
