"""Opening files the daemon writes as root in places other users may write to.

The default metrics disk lives in /dev/shm, which every local user can write
to (sticky, mode 1777), and operators point pid and log files at such places
too. A root daemon that follows a symlink there, or adopts a file another user
planted, writes wherever that user wants or publishes what that user writes.
So these files are opened without following a symlink (O_NOFOLLOW, last path
component), created only exclusively (O_EXCL: never through a dangling link or
a file planted between a check and the open), and an existing regular file is
used only if it belongs to the daemon's user and nobody else can write it.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat


class UnsafeFile(Exception):
    """A file the daemon refuses to use; str() is one line naming it and why."""


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def open_no_follow(path: str, flags: int, *, what: str, mode: int = 0o644,
                   dir_fd: int | None = None) -> tuple[int, bool]:
    """Open ``path`` (or create it exclusively with ``mode``): (fd, created).

    ``flags`` get O_NOFOLLOW | O_CLOEXEC | O_NOCTTY; a symlink at ``path`` is an
    UnsafeFile, other errors stay OSError. With ``dir_fd``, the last component
    of ``path`` is opened in that directory (openat) and ``path`` names it in
    messages.
    """
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    name = path if dir_fd is None else os.path.basename(path)
    for _ in range(3):
        try:
            try:
                return os.open(name, flags, dir_fd=dir_fd), False
            except FileNotFoundError:
                pass
            try:
                fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, mode, dir_fd=dir_fd)
            except FileExistsError:
                continue  # created by someone else since: check what it is
            # The umask must not make it unreadable to guests' QEMU (disk) or to
            # `vhostmd --status` (status file).
            os.fchmod(fd, mode)
            return fd, True
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeFile(f"{what} {path} is a symbolic link; vhostmd does not follow "
                                 "links there (name the real file)") from None
            raise
    raise UnsafeFile(f"{what} {path} keeps appearing and disappearing; not using it")


def check_owned(st: os.stat_result, path: str, *, what: str) -> None:
    """The one ownership rule for what the daemon writes as root (files, the
    per-VM disk directory): it is the daemon's user's, and nobody else may write it."""
    me = os.geteuid()
    if st.st_uid != me:
        raise UnsafeFile(f"{what} {path} belongs to {_user(st.st_uid)}, not to {_user(me)}; "
                         "remove it or give it to that user")
    if st.st_mode & 0o022:
        raise UnsafeFile(f"{what} {path} can be written by group or others "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}); remove it or chmod go-w it")


def check_private(fd: int, path: str, *, what: str) -> os.stat_result:
    """Refuse a regular file that another user owns or may write, or that has other names."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return st
    check_owned(st, path, what=what)
    if st.st_nlink != 1:
        # Another name for the same file, possibly in a place another user controls.
        raise UnsafeFile(f"{what} {path} has {st.st_nlink} hard links; not using it")
    return st


def unlink_if_same(path: str, fd: int, *, dir_fd: int | None = None) -> None:
    """Remove ``path`` if it still names the file open as ``fd`` (undo an exclusive create).

    With ``dir_fd``, ``path``'s last component in that directory.
    """
    name = path if dir_fd is None else os.path.basename(path)
    try:
        if os.path.samestat(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), os.fstat(fd)):
            os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def check_parents(path: str, *, what: str) -> None:
    """Refuse ``path`` if a directory above it can be changed by another user than root or us.

    As OpenSSH's StrictModes does: every directory on the way must belong to
    root (or to us) and not be writable by group or others, unless it is
    sticky (/tmp, /dev/shm: others may add names there, but not move ours;
    what is found at the last component is checked when it is opened). A
    symbolic link on the way must belong to root (or to us), and where it
    leads is checked the same way. Components that do not exist yet end the
    check (they will be made by us).
    """
    path = os.path.abspath(path)
    _check_directories(os.path.dirname(path), path, what, [0])


def _check_directories(directory: str, path: str, what: str, hops: list[int]) -> str:
    """Check ``directory`` and those above it; return it with its links resolved."""
    me = os.geteuid()
    current = "/"
    _check_directory(current, os.lstat(current), path, what, me)
    parts = [p for p in directory.split("/") if p and p != "."]
    for index, part in enumerate(parts):
        candidate = os.path.join(current, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return os.path.join(current, *parts[index:])
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, me):
                raise UnsafeFile(f"{what} {path}: {candidate} is a symbolic link that belongs "
                                 f"to {_user(st.st_uid)}; vhostmd only follows links of root's")
            hops[0] += 1
            if hops[0] > 40:
                raise UnsafeFile(f"{what} {path}: too many symbolic links on the way")
            target = os.path.normpath(os.path.join(current, os.readlink(candidate)))
            current = _check_directories(target, path, what, hops)
            continue
        _check_directory(candidate, st, path, what, me)
        current = candidate
    return current


def _check_directory(directory: str, st: os.stat_result, path: str, what: str, me: int) -> None:
    if not stat.S_ISDIR(st.st_mode):
        return  # opening the path fails on its own (ENOTDIR), with its own line
    if st.st_uid not in (0, me):
        raise UnsafeFile(f"{what} {path}: its directory {directory} belongs to "
                         f"{_user(st.st_uid)}, who could replace what vhostmd puts there; "
                         "use a directory of root's")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UnsafeFile(f"{what} {path}: its directory {directory} can be written by group "
                         f"or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod go-w it")


def holds_for_writing(pid: int, st: os.stat_result) -> bool | None:
    """Whether process ``pid`` has the file ``st`` open for writing; None: not ours to see."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except PermissionError:
        return None
    except OSError:
        return False
    for name in names:
        try:
            if not os.path.samestat(os.stat(f"/proc/{pid}/fd/{name}"), st):
                continue
            with open(f"/proc/{pid}/fdinfo/{name}", encoding="ascii") as info:
                flags = next((line.split()[1] for line in info if line.startswith("flags:")),
                             "0")
        except (OSError, IndexError):
            continue
        if int(flags, 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
            return True
    return False
