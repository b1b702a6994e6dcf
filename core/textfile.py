"""Atomic, symlink-safe writes of one file into a directory (node_exporter's textfiles).

Host and guest both write Prometheus textfiles, often as root, into a
directory another package made (``/var/lib/prometheus/node-exporter`` on
Debian, whose parent belongs to the ``prometheus`` user). A write must never
follow a link someone planted, nor land in a directory swapped in under it:

1. the directory is opened once, ``O_DIRECTORY | O_NOFOLLOW`` (a symbolic
   link as the last component is refused), and checked on that descriptor:
   owned by root or by the writer's effective user, and not writable by group
   or others unless the sticky bit is set (no one else can then rename or
   remove what we create);
2. the new content goes to a temporary file created relative to that
   descriptor with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random name
   (``.NAME.<random>.tmp``, which node_exporter ignores: it reads ``*.prom``
   only); a name that exists already is never opened, another one is drawn;
3. the file is given its mode, written, ``fsync``-ed, then renamed over NAME
   with both sides relative to the directory descriptor (a link at NAME is
   replaced, never followed), and the directory is ``fsync``-ed.

Any failure removes the temporary file and raises :class:`TextfileError`
(:class:`UnsafeDirectory` for a directory that fails step 1) with a one-line
reason; nothing is ever written through an unsafe directory.

Only the standard library: the guest package ships this module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

DEFAULT_MODE = 0o644  # node_exporter runs as its own user and must read the file
TEMP_TRIES = 16


class TextfileError(OSError):
    """The file could not be written; ``str(exc)`` is a one-line reason. An OSError,
    so callers that already catch those catch it too."""


class UnsafeDirectory(TextfileError):
    """The directory is a symbolic link, not a directory, or others could tamper with it."""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_directory(dir_fd: int, where: str) -> None:
    """Raise UnsafeDirectory unless the open directory ``dir_fd`` is safe to write into."""
    info = os.fstat(dir_fd)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"{where} is not a directory")
    if info.st_uid not in (0, os.geteuid()):
        raise UnsafeDirectory(
            f"{where} belongs to uid {info.st_uid}, not to root or uid {os.geteuid()}: "
            "refusing to write into it")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise UnsafeDirectory(
            f"{where} is writable by group or others without the sticky bit "
            f"(mode {stat.S_IMODE(info.st_mode):04o}): refusing to write into it")


def open_directory(path: str) -> int:
    """A descriptor of directory ``path`` (last component not a link), checked as safe.

    The caller closes it. Raises UnsafeDirectory or TextfileError.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        dir_fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            # Linux says ENOTDIR for a link with O_DIRECTORY | O_NOFOLLOW: tell which.
            try:
                link = stat.S_ISLNK(os.lstat(path).st_mode)
            except OSError:
                link = False
            if link:
                raise UnsafeDirectory(
                    f"{path} is a symbolic link: refusing to write through it") from None
            raise UnsafeDirectory(f"{path} is not a directory") from None
        raise TextfileError(f"cannot open directory {path}: {_reason(exc)}") from None
    try:
        check_directory(dir_fd, path)
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd


def temp_name(name: str) -> str:
    """A fresh random temporary name beside ``name`` (not ending in .prom)."""
    return f".{name}.{secrets.token_hex(8)}.tmp"


def _create_temp(dir_fd: int, name: str, where: str) -> tuple[int, str]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(TEMP_TRIES):
        temp = temp_name(name)
        try:
            return os.open(temp, flags, 0o600, dir_fd=dir_fd), temp
        except FileExistsError:
            continue  # planted or left over: never opened, draw another name
        except OSError as exc:
            raise TextfileError(f"cannot create a temporary file in {where}: {_reason(exc)}"
                                ) from None
    raise TextfileError(f"cannot create a temporary file in {where}: "
                        f"{TEMP_TRIES} random names all exist already")


def write_in_directory(dir_fd: int, name: str, data: bytes, *, mode: int = DEFAULT_MODE,
                       where: str | None = None) -> None:
    """Replace ``name`` in the open directory ``dir_fd`` with ``data``, atomically.

    ``dir_fd`` should come from :func:`open_directory`. ``where`` names the file
    in messages (default: ``name``).
    """
    where = where or name
    if not name or "/" in name or name in (".", ".."):
        raise TextfileError(f"{where}: not a file name")
    fd, temp = _create_temp(dir_fd, name, os.path.dirname(where) or ".")
    try:
        try:
            os.fchmod(fd, mode)  # not left to the umask: node_exporter must read it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise TextfileError(f"cannot write {where}: {_reason(exc)}") from None
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)  # the rename itself survives a crash; some filesystems refuse this


def write_atomically(path: str, data: bytes, *, mode: int = DEFAULT_MODE) -> None:
    """Replace the file ``path`` with ``data``: see the module's steps 1 to 3."""
    directory, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise TextfileError(f"{path}: not a file name")
    dir_fd = open_directory(directory or ".")
    try:
        write_in_directory(dir_fd, name, data, mode=mode, where=path)
    finally:
        os.close(dir_fd)
