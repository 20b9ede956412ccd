"""The pidfile, held under an exclusive lock for the daemon's life, and the state (ack) file.

A pidfile alone proves nothing: pids are reused. The lock does: it is released by the kernel
when the daemon dies, however it dies. So "running" means "the pidfile is locked", and a pidfile
that is not locked is stale, whatever pid it names. The state file beside it tells msgctl that an
action it asked for has happened: one generation counter per action, and the last outcome.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from typing import Any

from msgd.sysutil import atomic_write, make_dirs


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None) -> None:
        super().__init__(f"already running (pid {pid})" if pid else "already running")
        self.pid = pid


class Pidfile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.stale_pid: int | None = None  # what a dead predecessor left, if anything

    def acquire(self) -> None:
        """Lock the pidfile and write our pid; raise AlreadyRunning if another msgd holds it.

        The lock is taken on the file at `path`, then our pid is written to a fresh file that is
        locked before it is renamed into place, so readers never see a partial pid and the lock
        is never let go between the two. A symlink at `path` is refused, not followed.
        """
        make_dirs(os.path.dirname(self.path), 0o700)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        while True:
            fd = os.open(self.path, flags, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise AlreadyRunning(read_pid(self.path)) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # replaced while we waited for the lock: try the new file
        self.stale_pid = read_pid(self.path)
        tmp = f"{self.path}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        self.fd = os.open(tmp, flags | os.O_EXCL, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        os.rename(tmp, self.path)
        os.close(fd)

    def release(self) -> None:
        """Remove the pidfile if it is still ours, then drop the lock."""
        if self.fd < 0:
            return
        if _same_file(self.fd, self.path):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def state_path(pidfile: str) -> str:
    """The state (ack) file lives beside the pidfile: msgd.pid -> msgd.state."""
    root, _ = os.path.splitext(pidfile)
    return root + ".state"


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def read_pid(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def is_locked(path: str) -> bool:
    """Whether a live process holds the pidfile's lock (i.e. msgd is really running)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class StateFile:
    """The daemon's public state, rewritten atomically after every action."""

    ACTIONS = ("reload", "stats", "burst", "burst_done", "scale")

    def __init__(self, path: str, info: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            **info,
            "generations": dict.fromkeys(self.ACTIONS, 0),
            "last": {},
        }

    def record(
        self,
        action: str,
        outcome: dict[str, Any],
        generation: int | None = None,
        began: float | None = None,
    ) -> int:
        """Count one run of `action` (or set its generation), keep its outcome, publish.

        `began` is when the action's task woke (CLOCK_MONOTONIC, the same clock in every process:
        a sender can tell how long its signal took to reach the task). Returns the action's
        generation: msgctl waits for it to move past the one it read.
        """
        gens = self.data["generations"]
        gens[action] = gens[action] + 1 if generation is None else generation
        last = {"at": time.time(), **outcome}
        if began is not None:
            last["began_monotonic"] = began
        self.data["last"][action] = last
        self.write()
        return self.data["generations"][action]

    def generation(self, action: str) -> int:
        return self.data["generations"][action]

    def write(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=1).encode(), 0o600)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
