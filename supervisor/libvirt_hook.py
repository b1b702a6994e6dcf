"""`vhostmd-libvirt-hook`: makes a domain's per-VM metrics disk before QEMU opens it.

The ``vhostmd`` package installs it as ``/etc/libvirt/hooks/qemu.d/vhostmd``.
libvirtd (6.5 and later) runs every executable in that directory, as root,
for every QEMU domain operation: ``HOOK DOMAIN OPERATION SUB-OPERATION
EXTRA``, with the domain XML on stdin.

Only ``prepare begin`` does anything: libvirt runs it when a domain is about
to start, be restored (``virsh restore``) or arrive by migration, after it
gave the domain its id and before QEMU opens the domain's disks. When the
domain XML names a file in the configured ``<vm_disks>`` directory, the file
is the domain's own disk (``DIR/<its UUID>``): it is made (or, when it
exists, claimed so that the daemon does not remove it under the starting
domain) with the daemon's safety rules (``disk/vmdir.py``). The daemon
writes it within a cycle and removes it once its domain is gone.

The configuration is found as the init script finds it: ``VHOSTMD_CONFIG``
in ``/etc/default/vhostmd`` (a ``VAR=value`` line, as systemd's
EnvironmentFile reads it), else ``/etc/vhostmd/vhostmd.conf``.
``VHOSTMD_DEFAULTS`` in the environment names another defaults file
(libvirtd passes no such variable to hooks: for tests and other layouts).

Exit status: 0 (and no output on stdout, which libvirt would take as a new
domain XML for the operations that read one) for every call but one: a
``prepare begin`` whose domain names a file in the directory that cannot be
its disk. Then it exits 1 with one line on stderr, which libvirt puts in the
error of the start: the file is another domain's (a guest would read that
VM's metrics), or it cannot be made or used safely (QEMU would fail on it,
or open what is not our disk). A domain that names no file there is never
failed, nor is one whose XML or the configuration cannot be read (one line
on stderr; QEMU then reports a missing file itself).

Domain names and XML are untrusted: the XML is parsed with expat, any
entity declaration refused and nothing loaded (see ``parse``), the file is
named only by the UUID, and nothing outside the directory is made or touched
(the directory itself is made, mode 0755, if its parent exists).

Fast (libvirt waits for it at every start): nothing but ``os`` and ``sys``
is imported unless the operation is ``prepare begin``; then pyexpat and the
disk code, never lxml, libvirt or the daemon's configuration module.
"""

from __future__ import annotations

import os
import sys

DEFAULTS_FILE = "/etc/default/vhostmd"
DEFAULT_CONFIG = "/etc/vhostmd/vhostmd.conf"  # supervisor.config.DEFAULT_CONFIG
# Larger domain XML is not read (a domain XML is a few KiB; its <description>
# may be long).
MAX_XML = 16 * 1024 * 1024
UNITS = {"k": 1024, "m": 1024 * 1024}  # supervisor.config.UNITS
PROG = "vhostmd-libvirt-hook"


class HookRefusal(Exception):
    """The domain names a file in the directory that cannot be its disk: exit 1."""


class CannotTell(Exception):
    """The configuration or the XML cannot be read: exit 0 with a note."""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "prepare" or args[2] != "begin":
        return 0
    try:
        prepare(args[0])
    except HookRefusal as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except CannotTell as exc:
        print(f"{PROG}: {exc}; not making a per-VM disk for domain {args[0]!r}",
              file=sys.stderr)
    except Exception as exc:  # our own fault must not fail the domain
        print(f"{PROG}: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
    return 0


def prepare(name: str) -> None:
    """``prepare begin`` of domain ``name``: the domain XML is on stdin."""
    config = config_path(os.environ.get("VHOSTMD_DEFAULTS", DEFAULTS_FILE))
    vm_disks = read_vm_disks(config)
    if vm_disks is None:
        return  # no per-VM disks configured
    directory, size = vm_disks
    xml = sys.stdin.buffer.read(MAX_XML + 1)
    if len(xml) > MAX_XML:
        raise CannotTell(f"domain XML larger than {MAX_XML} bytes")
    uuid, files = disk_files(xml)
    own = our_disk(uuid, files, directory)
    if own is None:
        return
    make_disk(directory, size, own)


def config_path(defaults: str) -> str:
    """VHOSTMD_CONFIG as the defaults file sets it, else the default configuration."""
    try:
        with open(defaults, encoding="utf-8", errors="replace") as lines:
            text = lines.read(1024 * 1024)
    except FileNotFoundError:
        return DEFAULT_CONFIG
    except OSError as exc:
        raise CannotTell(f"cannot read {defaults}: {exc.strerror}") from None
    found = DEFAULT_CONFIG
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep or key.rstrip() != "VHOSTMD_CONFIG":
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if any(c in value for c in "$`\\\"'") or not value:
            raise CannotTell(f"{defaults}: VHOSTMD_CONFIG={value!r} is not a plain path")
        found = value
    return found


def read_vm_disks(config: str) -> tuple[str, int] | None:
    """(directory, size) of ``<vm_disks>`` in ``config`` as the daemon reads them, or None.

    Only ``globals/vm_disks`` is read; ``vhostmd --check`` validates the rest.
    """
    from vhostmd import mdisk

    try:
        with open(config, "rb") as file:
            root = parse(file.read(mdisk.MAX_SIZE), config)
    except OSError as exc:
        raise CannotTell(f"cannot read {config}: {exc.strerror}") from None
    vm_disks = [e for g in root.find("globals") for e in g.find("vm_disks")]
    if not vm_disks:
        return None
    paths = vm_disks[0].find("path")
    directory = paths[0].text.strip() if len(paths) == 1 else ""
    if len(vm_disks) > 1 or not directory:
        raise CannotTell(f"{config}: <vm_disks> needs one <path> (vhostmd --check tells more)")
    if not os.path.isabs(directory):  # relative to the config's directory, as the daemon's
        directory = os.path.join(os.path.dirname(os.path.abspath(config)), directory)
    size = mdisk.MIN_SIZE
    if sizes := vm_disks[0].find("size"):
        try:
            size = int(sizes[0].text.strip()) * UNITS.get(sizes[0].attrs.get("unit", "").lower(),
                                                          1)
        except ValueError:
            size = -1
        if len(sizes) > 1 or not mdisk.MIN_SIZE <= size <= mdisk.MAX_SIZE:
            raise CannotTell(f"{config}: bad <vm_disks><size> (vhostmd --check tells more)")
    return os.path.normpath(directory), size


def disk_files(xml: bytes) -> tuple[str, list[str]]:
    """(the domain's UUID, the files its <disk> elements name) from the domain XML."""
    root = parse(xml, "the domain XML")
    if root.tag != "domain":
        raise CannotTell(f"the XML on stdin is a <{root.tag}>, not a <domain>")
    uuid = "".join(e.text for e in root.find("uuid")).strip().lower()
    files = [source.attrs.get("file") or source.attrs.get("dev") or ""
             for devices in root.find("devices") for disk in devices.find("disk")
             for source in disk.find("source")]
    return uuid, [f for f in files if f]


class Element:
    """What the hook reads of an XML element: tag, attributes, text, children."""

    __slots__ = ("attrs", "children", "tag", "text")

    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag = tag
        self.attrs = attrs
        self.text = ""
        self.children: list[Element] = []

    def find(self, tag: str) -> list[Element]:
        return [child for child in self.children if child.tag == tag]


class _Refused(Exception):
    pass


def parse(data: bytes, what: str) -> Element:
    """The element tree of ``data``, read with expat (a millisecond to import, where
    lxml takes 25); CannotTell if it is not well-formed or declares any entity.

    Only the five predefined entities and character references are allowed:
    an entity declaration (in a DOCTYPE's internal subset) and a reference
    expat would skip (declared in an external DTD, which is never read) are
    refused, so nothing is ever expanded or fetched.
    """
    import pyexpat

    parser = pyexpat.ParserCreate()
    parser.SetParamEntityParsing(pyexpat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[Element] = [Element("", {})]

    def refuse(*_args: object) -> None:
        raise _Refused

    def start(tag: str, attrs: dict[str, str]) -> None:
        element = Element(tag, attrs)
        stack[-1].children.append(element)
        stack.append(element)

    def end(_tag: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        stack[-1].text += data

    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.SkippedEntityHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(data, True)
    except _Refused:
        raise CannotTell(f"{what} declares or references entities") from None
    except pyexpat.ExpatError as exc:
        raise CannotTell(f"{what} is not well-formed XML ({exc})") from None
    return stack[0].children[0]


def our_disk(uuid: str, files: list[str], directory: str) -> str | None:
    """The domain's own disk among ``files`` (its UUID), or None when it names none.

    A file in ``directory`` whose name is a UUID is a per-VM disk; naming
    another domain's is refused. Other names there (the shared disk, when
    <vm_disks> is its directory) are not ours to judge. "In the directory" is
    what QEMU will open: the file's directory with symlinks resolved (only
    root can make them there) and '..' and '//' spelt out.
    """
    from vhostmd.disk.vmdir import UUID_RE

    own = None
    real_directory = os.path.realpath(directory)
    for file in files:
        path = os.path.normpath(file)
        if os.path.realpath(os.path.dirname(path)) != real_directory:
            continue
        disk = os.path.basename(path)
        if not UUID_RE.match(disk):
            continue
        if disk != uuid:
            raise HookRefusal(
                f"the domain names {path}, the per-VM metrics disk of domain {disk}, not its "
                f"own (its UUID is {uuid or 'missing'}); a domain may only name "
                f"{directory}/<its UUID>")
        own = disk
    return own


def make_disk(directory: str, size: int, uuid: str) -> None:
    """Make (or claim) ``directory/uuid`` with the daemon's rules; HookRefusal if it cannot."""
    from vhostmd.disk.handle import DiskRefused
    from vhostmd.disk.vmdir import VmDir, open_vm_dir_fd, prepare_vm_disk

    try:
        fd = open_vm_dir_fd(directory, lock=False, parents=False)
    except DiskRefused as exc:
        raise HookRefusal(str(exc)) from None
    try:
        prepare_vm_disk(VmDir(directory, size, _Fd(fd)), uuid)  # type: ignore[arg-type]
    except DiskRefused as exc:
        raise HookRefusal(str(exc)) from None
    finally:
        os.close(fd)


class _Fd:
    """What VmDir needs of its descriptor (the child runtime's InheritedFd is not loaded)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd


if __name__ == "__main__":
    sys.exit(main())
