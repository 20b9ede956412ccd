"""A worker's side of the spool: claim by rename, wait on inotify, acknowledge cheaply.

Claiming renames new/<name> into the worker's own cur/<slot>/; success unlinks the file, at once
while unlinks are fast and on background threads while they wait on the device (Acker); failure
renames it into defer/ or failed/ (SpoolStore.fail).
"""

from __future__ import annotations

import heapq
import math
import os
import queue as queue_mod
import select
import threading
import time
from typing import Any

from msgd.backend import Expired, Outcome
from msgd.handlers import Message
from msgd.spool import AckLog, SpoolError, SpoolStore, expired_error, id_time, split_name
from msgd.spoolname import SpoolName
from msgd.sysutil import arrived, drain, make_dirs, watch_arrivals

ACK_THREADS = 4  # concurrent unlinks: the filesystem overlaps their waits (~60 µs each)
SLOW_UNLINK_NS = 20_000  # an unlink slower than this, on average, waited on the device
PROBE_EVERY = 1.0  # seconds between unlinks done at once while the threads do the others
ARRIVALS_EVERY = 0.002  # seconds: how late a higher priority's arrival may be noticed
POLL_INTERVAL = 0.05  # only where inotify is unavailable


class Acker:
    """Unlinks finished messages, with a crash-proof record of each.

    An unlink of a flushed file takes ~5 µs, unless the filesystem discards online (mounted with
    `discard`): it then waits ~60 µs for the device, longer than the rest of a no-op message. So
    a worker unlinks at once while its unlinks are fast, and hands them to ACK_THREADS background
    threads (started then) while they are slow, trying one at once every PROBE_EVERY seconds to
    see whether they still are. Handing one over costs ~20 µs of CPU in thread switches: measured
    on one disk remounted each way, a drain made 68-71k msgs/s unlinking at once without online
    discard (21-55k on the threads), and 27-31k on the threads with it (15k at once).

    One per worker process, shared by its spool queues (`Acker.of`), since the ack log is per slot.
    """

    _mine: Acker | None = None

    @classmethod
    def of(cls, root: str, slot: int) -> Acker:
        if cls._mine is None:
            cls._mine = cls(root, slot)
        return cls._mine

    def __init__(self, root: str, slot: int) -> None:
        self.acklog = AckLog(root, slot)
        self.acklog.open()
        self.free: queue_mod.SimpleQueue[int] = queue_mod.SimpleQueue()
        for i in range(AckLog.RECORDS):
            self.free.put(i)
        self.todo: queue_mod.SimpleQueue[tuple[str, int] | None] = queue_mod.SimpleQueue()
        self.threads: list[threading.Thread] = []  # started on the first slow unlinks
        self.average_ns = 0.0  # of the unlinks done at once, recent ones weighing most
        self.on_threads = False  # the unlinks are slow: the threads do them
        self.probe_at = 0.0  # meanwhile, when to do one at once again (monotonic)

    def done(self, queue: str, name: str, path: str) -> None:
        index = self.free.get()  # blocks only if 1,024 unlinks are outstanding
        if not self.acklog.write(index, queue, name):  # too long to record: at once, unjudged
            self.free.put(index)
            os.unlink(path)
        elif self.on_threads and time.monotonic() < self.probe_at:
            self.todo.put((path, index))
        else:
            began = time.monotonic_ns()
            self._unlink(path, index)
            self.judge(time.monotonic_ns() - began)

    def judge(self, took_ns: int) -> None:
        """Where the next unlinks go, given how long one done at once took. A probe (one done
        at once while the threads work) counts alone: a fast one brings the unlinks back.
        Otherwise one counts at most twice the limit: a lone wait (a journal commit, a
        preemption: 1 in ~1,000 took 0.5 ms) must not send fast unlinks to the threads; ~6 slow
        ones in a row do."""
        if self.on_threads:
            self.average_ns = took_ns
        else:
            self.average_ns += (min(took_ns, 2 * SLOW_UNLINK_NS) - self.average_ns) / 8
        self.on_threads = self.average_ns > SLOW_UNLINK_NS
        if self.on_threads:
            self.probe_at = time.monotonic() + PROBE_EVERY
            self._start_threads()

    def _start_threads(self) -> None:
        while len(self.threads) < ACK_THREADS:
            t = threading.Thread(target=self._run, name=f"ack-{len(self.threads)}", daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            self._unlink(*item)

    def _unlink(self, path: str, index: int) -> None:
        try:  # not contextlib.suppress: ~0.25 µs a message, with the GIL held
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.acklog.clear(index)
        self.free.put(index)

    def close(self) -> None:
        """Finish the unlinks queued so far (idempotent: every spool inbox calls it)."""
        if Acker._mine is not self:
            return
        Acker._mine = None
        for _ in self.threads:
            self.todo.put(None)
        for t in self.threads:
            t.join()


class SpoolInbox:
    """A worker's view of one spool queue: claim the highest priority, oldest first, and wait
    without polling.

    Shared by the handler threads of one queue in one worker. Claiming renames new/<name> into
    this worker's cur/<slot>/; when another worker won the race the rename fails and the next
    name is tried. Listing happens only when the local batch is used up; arrivals since are
    added to it from a second inotify watch, which names them.
    """

    def __init__(self, store: SpoolStore, slot: int, stop_fd: int) -> None:
        self.store, self.queue = store, store.queue
        self.acker = Acker.of(store.root, slot)
        self.new = store.new + "/"
        self.cur = os.path.join(store.spool.dir(store.queue, "cur"), str(slot)) + "/"
        make_dirs(self.cur, store.spool.dir_mode)
        self._stop_fd = stop_fd
        self._listed: list[str] = []  # names of the last listing in claim order, the next last
        self._arrived: list[str] = []  # a heap of the _claim_key()s of names reported since
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._watching = False
        self._next_look = 0.0  # when claim looks at the arrivals watch next
        try:
            self._inotify: int | None = watch_arrivals(self.new)  # for the waiting runner
            self._arrivals: int | None = watch_arrivals(self.new)  # for claim's priorities
        except OSError:
            self._inotify = self._arrivals = None
            self._next_look = math.inf

    def claim(self) -> str | None:
        """Claim the next message into cur/: the highest priority, the oldest among equals;
        None when new/ is empty right now."""
        while True:
            with self._lock:
                if (self._listed or self._arrived) and time.monotonic() >= self._next_look:
                    self._take_arrivals()
                if not (self._listed or self._arrived) and not self._list():
                    return None
                name = self._next_name()
            try:
                os.rename(self.new + name, self.cur + name)
            except FileNotFoundError:
                continue  # another worker took it
            return name

    def _list(self) -> bool:
        """List new/ as the next batch; False if it is empty. What the arrivals watch reported
        until now is in the listing: drained unread (after a burst's fill, its kernel queue
        holds ~16,000 names: decoding them cost a worker ~12 ms, draining ~3 ms)."""
        if self._arrivals is not None:
            drain(self._arrivals)
            self._next_look = time.monotonic() + ARRIVALS_EVERY
        listed = [n for n in os.listdir(self.new) if not n.startswith(".")]
        fields = any("@" in n for n in listed)  # else each name orders as its key does
        listed.sort(key=_claim_key if fields else None, reverse=True)  # 40,000: 8 ms, not 12
        self._listed = listed
        return bool(listed)

    def _take_arrivals(self) -> None:
        """Add what arrived in new/ since the batch was listed, so that a message of a higher
        priority overtakes the batch. Claim looks every ARRIVALS_EVERY at most: a look is a
        system call, and a drain claims every ~50 µs. (A name listed and also reported is
        claimed once: the second rename finds nothing.)"""
        assert self._arrivals is not None  # else _next_look stays infinite
        self._next_look = time.monotonic() + ARRIVALS_EVERY
        names = arrived(self._arrivals)
        if names is None:  # the kernel's queue overflowed: list again
            self._listed, self._arrived = [], []
            return
        for name in names:
            if not name.startswith("."):
                heapq.heappush(self._arrived, _claim_key(name))

    def _next_name(self) -> str:
        """Take the first name in claim order, from the listing or the arrivals (not both empty).

        The listing is sorted once and taken from its end, and only arrivals go through a heap:
        popping each of a 40,000-name listing from a heap cost a drain ~3 µs a message (perf:
        siftup)."""
        listed, late = self._listed, self._arrived
        if late and (not listed or late[0] < _claim_key(listed[-1])):
            return heapq.heappop(late).partition("\0")[2]
        return listed.pop()

    def wait(self) -> None:
        """Sleep until something arrives in new/ (or the worker is told to stop).

        The runner threads of one queue share the inotify descriptor: one of them watches it and,
        once woken, wakes the others. Were they all to select on it, the first to drain it would
        leave the rest asleep with messages waiting.
        """
        with self._wake:
            if self._watching:
                self._wake.wait()
                return
            self._watching = True
        try:
            if self._inotify is None:
                select.select([self._stop_fd], [], [], POLL_INTERVAL)
                return
            if self._inotify in select.select([self._stop_fd, self._inotify], [], [])[0]:
                drain(self._inotify)
        finally:
            with self._wake:
                self._watching = False
                self._wake.notify_all()

    def read(self, name: str, max_size: int) -> Message:
        """Open a claimed file; OSError, or SpoolError if it is not a file or too large, or
        Expired if its TTL passed before it started."""
        parsed = SpoolName.parse(name)
        if parsed.expires_ms and parsed.expired(time.time() * 1000):  # no clock read for most
            raise Expired(expired_error(parsed)["error"])
        mid, done = parsed.id, parsed.attempts
        fd = os.open(self.cur + name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not (st.st_mode & 0o170000 == 0o100000):
                raise SpoolError("not a regular file")
            if max_size and st.st_size > max_size:
                raise SpoolError(f"message of {st.st_size} bytes exceeds max_message_size")
            body = _read_all(fd, st.st_size)
            when = enqueued_at(mid, fd)
        finally:
            os.close(fd)
        return Message(id=mid, queue=self.queue, body=body, attempt=done + 1, enqueued_at=when)

    def label(self, name: str) -> tuple[str, int]:
        mid, done = split_name(name)
        return mid, done + 1

    def done(self, name: str) -> None:
        self.acker.done(self.queue, name, self.cur + name)

    def fail(self, name: str, error: dict[str, Any], permanent: bool) -> Outcome:
        return self.store.fail(self.cur + name, error, permanent)

    def burst(self) -> None:
        """Nothing to do: the master releases deferred spool messages itself."""

    def close(self) -> None:
        self.acker.close()


def enqueued_at(mid: str, fd: int) -> float:
    """The enqueue time encoded in msgd's ids; a foreign producer's file gives its mtime."""
    when = id_time(mid)
    return os.fstat(fd).st_mtime if when is None else when


def _claim_key(name: str) -> str:
    """A name of new/ as its claim-order key (the listing's sort key, the arrivals' heap entry):
    highest priority first, then oldest (ids sort by time).

    One string, `9 - priority`, the id, NUL, the name: comparing two is one C call, where the
    (priority, id, name) tuples this replaced cost ~8% of a drain's worker CPU (perf)."""
    if "@" not in name:  # never retried, priority 0: most names, parsed for nothing
        return f"9{name}\0{name}"
    parsed = SpoolName.parse(name)
    return f"{9 - parsed.priority}{parsed.id}\0{name}"


def _read_all(fd: int, size: int) -> bytes:
    """One read for the usual case: a message file does not change once it is in new/."""
    body = os.read(fd, size)
    while len(body) < size and (more := os.read(fd, size - len(body))):
        body += more
    return body
