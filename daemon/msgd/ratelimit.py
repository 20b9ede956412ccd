"""Rate limits: at most `rate_limit` starts of a queue in any sliding one-second window, counted
across every worker process and handler thread of the daemon.

Each limited queue has a ring of its last N start times (CLOCK_MONOTONIC, which every process
on the host shares) in shared memory, and a lock; both are allocated by the master before it forks
the workers. A runner may start a message once the oldest of the last N starts is a second old:
it then overwrites that slot with its own start. N starts fit in any window of one second, never
N + 1, however the window is placed. A queue without a limit has no ring and no lock: its runners
never touch this module. A runner that waits for its turn sleeps in its own thread, so other
queues' runners go on.

The lock is a thread lock within a process and an flock across processes, on an anonymous
file (memfd) each process opens for itself: the kernel releases it when its holder dies, so a
worker killed (-9) inside the few instructions it is held for cannot stall the queue (a
semaphore would stay taken for ever).
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from msgd.config import Config

WINDOW_NS = 1_000_000_000

_fork = multiprocessing.get_context("fork")


class Gate:
    """One limited queue's shared ring of start times: `limit` slots and the index of the
    oldest, behind one lock shared by every process forked after it was made."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ring: Any = _fork.Array("q", limit + 1, lock=False)  # [oldest index, starts...]
        self.inode = os.memfd_create("msgd-rate", os.MFD_CLOEXEC)  # flocked (see the doc)
        self.threads = threading.Lock()
        self.fd, self.fd_pid = -1, -1  # this process's own open file of `inode`
        for i in range(1, limit + 1):
            self.ring[i] = -WINDOW_NS  # "a second ago or more" even just after boot

    def take_turn(self) -> None:
        """Block until this runner may start a message, and count its start."""
        while (wait_ns := self._try()) > 0:
            time.sleep(wait_ns / 1e9)

    def _try(self) -> int:
        """Take a turn if one is free (0), else say how long until the oldest start expires."""
        with self._locked():
            now = time.monotonic_ns()
            oldest = self.ring[0]
            wait_ns = self.ring[1 + oldest] + WINDOW_NS - now
            if wait_ns > 0:
                return wait_ns
            self.ring[1 + oldest] = now
            self.ring[0] = (oldest + 1) % self.limit
            return 0

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self.threads:
            if self.fd_pid != os.getpid():  # an open file of our own: flocks of one shared
                path = f"/proc/self/fd/{self.inode}"  # with the master would not
                self.fd, self.fd_pid = os.open(path, os.O_RDWR | os.O_CLOEXEC), os.getpid()
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)


class RateLimits:
    """Every limited queue's gate. Made by the master before forking; a worker asks for its
    queues' gates (None: no limit) once, when its runners start."""

    def __init__(self, config: Config, previous: RateLimits | None = None) -> None:
        """`previous`: the limits before a reload; a queue whose limit did not change keeps its
        gate, so the starts just before the reload still count against the new workers."""
        kept = previous.gates if previous else {}
        self.gates: dict[str, Gate] = {}
        for name, q in config.queues.items():
            if q.rate_limit:
                same = kept.get(name)
                self.gates[name] = (
                    same if same and same.limit == q.rate_limit else Gate(q.rate_limit)
                )

    def close_unshared(self, other: RateLimits) -> None:
        """Close the gates `other` does not share: the old limits' once a reload is applied (old
        workers still using one hold their own copies), the new ones' if it is rejected."""
        for gate in set(self.gates.values()) - set(other.gates.values()):
            os.close(gate.inode)

    def gate(self, queue: str) -> Gate | None:
        return self.gates.get(queue)
