"""Small OS operations the standard library lacks: atomic files, safe directories, prctl,
inotify, syncfs, statx, and dropping root's privileges."""

from __future__ import annotations

import ctypes
import errno
import functools
import grp
import json
import os
import pwd
import signal
import struct
from collections.abc import Iterable
from typing import Any

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies (no orphans)."""
    _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


IN_MODIFY, _IN_CLOSE_WRITE, IN_MOVED_TO, _IN_Q_OVERFLOW = 0x2, 0x8, 0x80, 0x4000
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC


def watch_arrivals(directory: str, also: int = 0) -> int:
    """An inotify descriptor that turns readable when a file is renamed or written into
    `directory` (and on the `also` events: IN_MODIFY, each write)."""
    return watch(directory, IN_MOVED_TO | _IN_CLOSE_WRITE | also)


def watch(directory: str, events: int) -> int:
    """A non-blocking inotify descriptor for `events` in `directory`. (Three libc calls;
    inotify_simple would run `ldconfig -p` in every worker to find libc, costing each one ~1 MB
    and a subprocess.)"""
    fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0 or _libc.inotify_add_watch(fd, os.fsencode(directory), events) < 0:
        err = ctypes.get_errno()
        if fd >= 0:
            os.close(fd)
        raise OSError(err, os.strerror(err), directory)
    return fd


def arrived(fd: int) -> list[str] | None:
    """The names that arrived on a non-blocking watch_arrivals() descriptor since the last call;
    None if the kernel's queue overflowed (events were lost: list the directory instead)."""
    names: list[str] = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return names
        pos = 0
        while pos < len(data):
            _, mask, _, size = struct.unpack_from("iIII", data, pos)
            if mask & _IN_Q_OVERFLOW:
                drain(fd)
                return None
            names.append(os.fsdecode(data[pos + 16 : pos + 16 + size].rstrip(b"\0")))
            pos += 16 + size


def drain(fd: int) -> None:
    """Read and forget whatever is pending on a non-blocking descriptor."""
    try:
        while os.read(fd, 65536):
            pass
    except BlockingIOError:
        pass


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that readers see the old file or the new one, never a part.

    The temporary file is created exclusively and without following links, so a planted symlink
    cannot redirect the write.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
    except FileExistsError:  # left by a process killed mid-write that had our pid (a container
        os.unlink(tmp)  # restarted, pid 1 again): never followed, only removed
        fd = os.open(tmp, flags, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise


def read_json(path: str) -> Any:
    """A JSON file's content, or None if it is missing or not (yet) valid JSON."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def make_dirs(path: str, mode: int = 0o700) -> None:
    """Create `path` and missing parents with `mode`, refusing a symlink in its place.

    Every directory created gets `mode` (os.makedirs gives intermediate ones the umask's default,
    so spool/<queue>/ would have been 0755 under a 0700 spool setting).
    """
    parent = os.path.dirname(os.path.normpath(path))
    if parent and parent != path and not os.path.isdir(parent):
        make_dirs(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    if os.path.islink(path):
        raise OSError(f"{path}: is a symbolic link")


def syncfs(path: str) -> None:
    """Flush the whole filesystem holding `path` in one pass: a batch of files at the cost of one
    flush (os has no syncfs wrapper)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


_STATX_NLINK = 0x4
_STATX_MNT_ID_UNIQUE = 0x4000  # Linux 6.8: a mount's id, never reused until the next boot
_STATX_SIZE, _STATX_NLINK_AT, _STATX_MNT_ID_AT = 256, 16, 0x90  # the record; where two fields are
_AT_FDCWD, _AT_EMPTY_PATH = -100, 0x1000
_UNKNOWN_MOUNT = os.urandom(8)  # never equal to what another process wrote


def _statx(dirfd: int, path: str, flags: int, mask: int) -> tuple[int, bytes] | None:
    """(the mask of what the kernel filled, the statx record), asking only for `mask`; None
    without statx (glibc < 2.28, Linux < 4.11, or a seccomp filter that refuses it)."""
    statx = getattr(_libc, "statx", None)
    if statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if statx(dirfd, os.fsencode(path), flags, mask, buf) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM):
            return None
        raise OSError(err, os.strerror(err), path)
    return struct.unpack_from("<I", buf.raw, 0)[0], buf.raw


def link_count(fd: int) -> int:
    """How many names the open file has (0 once unlinked or renamed over), asking for nothing
    else. os.fstat would read the timestamps too, and once they are read (Linux >= 6.13) the
    file's next write must stamp a finer time, which dirties its inode: that write's fdatasync
    then commits the journal as well (a durable send's flush here: 126 -> 186 µs)."""
    found = _statx(fd, "", _AT_EMPTY_PATH, _STATX_NLINK)
    if found is None or not found[0] & _STATX_NLINK:
        return os.fstat(fd).st_nlink
    (links,) = struct.unpack_from("<I", found[1], _STATX_NLINK_AT)
    return links


def mount_instance(path: str) -> bytes:
    """24 bytes that name this boot and this mount of the filesystem holding `path`: they stay
    the same while its page cache lives (a process may crash), and change after a power loss
    (a new boot), or once the filesystem is mounted anew. Without the kernel's unique mount ids,
    a value of this process's own: every other process counts as after a power loss."""
    found = _statx(_AT_FDCWD, path, 0, _STATX_MNT_ID_UNIQUE)
    if found is None or not found[0] & _STATX_MNT_ID_UNIQUE:
        return _boot_id() + _UNKNOWN_MOUNT
    return _boot_id() + found[1][_STATX_MNT_ID_AT : _STATX_MNT_ID_AT + 8]


@functools.cache
def _boot_id() -> bytes:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return bytes.fromhex(f.read().strip().replace("-", ""))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PrivilegeError(Exception):
    """Root without a user to become, or a user or group that does not exist."""


def drop_privileges(user: str, group: str, allow_root: bool, keep: Iterable[int]) -> None:
    """As root, become `user` (and `group`, else the user's own) for good; or refuse to go on.

    `keep` are descriptors opened as root that the daemon must still rewrite, remove or reopen
    after the switch (the pidfile, the log): they are given to the new owner first.
    """
    if os.geteuid() != 0 or (not user and allow_root):
        return
    if not user:
        raise PrivilegeError(
            "daemon.user: refusing to run as root without a user to become "
            "(set daemon.user, or daemon.allow_root = true)"
        )
    try:
        entry = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError as e:
        raise PrivilegeError(f"daemon.user/group: no such user or group: {e}") from None
    for fd in keep:
        if fd > 2:
            os.fchown(fd, entry.pw_uid, gid)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(entry.pw_uid)
