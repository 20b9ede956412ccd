"""The durable on-disk queue, with maildir discipline.

    <spool>/<queue>/tmp/      producers write here first
                   /new/      ready: `<id>` or `<id>@<attempts done>`
                   /cur/<slot>/  claimed by the worker in that slot (renamed, never copied)
                   /defer/    waiting to be retried: `<id>@<attempts done>@<not before, ms>`
                   /failed/   dead letters `<id>`, each with `<id>.error.json` beside it
    <spool>/.msgd/ack.<slot>  names a worker finished but has not unlinked yet (see AckLog)

Every state change is a rename inside one filesystem, so a message is always in exactly one place
and a crash at any instant loses nothing. Ids are 16 hex digits of enqueue time in ns and 8 random
hex digits: unique, and sorting them sorts by enqueue time.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import queue as queue_mod
import random
import select
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from msgd.config import Config, QueueConfig, valid_queue_name
from msgd.handlers import Message
from msgd.sysutil import drain, fsync_dir, make_dirs, syncfs, watch_arrivals

STATES = ("new", "cur", "defer", "failed")
ERROR_SUFFIX = ".error.json"
ACK_THREADS = 4  # concurrent unlinks: the filesystem overlaps their waits (~50 µs each)
POLL_INTERVAL = 0.05  # only where inotify is unavailable


class SpoolError(Exception):
    """A queue name, id or spool directory that cannot be used."""


def new_id() -> str:
    return f"{time.time_ns():016x}{random.getrandbits(32):08x}"


def check_name(name: str, what: str = "message id") -> str:
    """Refuse anything that could name a path outside its directory."""
    if not name or len(name) > 200 or name.startswith(".") or "/" in name or "\0" in name:
        raise SpoolError(f"bad {what}: {name!r}")
    return name


def split_name(name: str) -> tuple[str, int]:
    """`<id>@<attempts>` -> (id, attempts done); a bare id has none done.

    Parsed from the right, and a name that does not end in `@<digits>` is all id: a foreign
    producer's `a@b` is message `a@b` with no attempts done, never an error that stalls a runner.
    """
    mid, at, attempts = name.rpartition("@")
    if at and _is_count(attempts):
        return mid, int(attempts)
    return name, 0


def split_deferred(name: str) -> tuple[str, int, int | None]:
    """A defer/ name `<id>@<attempts>@<not before, ms>` -> its parts (None: no valid time)."""
    parts = name.rsplit("@", 2)
    if len(parts) == 3 and _is_count(parts[1]) and _is_count(parts[2]):
        return parts[0], int(parts[1]), int(parts[2])
    mid, attempts = split_name(name)
    return mid, attempts, None


def _is_count(text: str) -> bool:
    return text.isascii() and text.isdigit()


def enqueued_at(mid: str, fd: int) -> float:
    """The enqueue time encoded in msgd's ids; a foreign producer's file gives its mtime."""
    if len(mid) == 24:
        with contextlib.suppress(ValueError):
            return int(mid[:16], 16) / 1e9
    return os.fstat(fd).st_mtime


class Spool:
    """The spool root: producing, inspecting and repairing queues. Cheap to create."""

    def __init__(
        self, root: str, *, fsync: bool = True, file_mode: int = 0o600, dir_mode: int = 0o700
    ) -> None:
        self.root = root
        self.fsync = fsync
        self.file_mode = file_mode
        self.dir_mode = dir_mode

    @classmethod
    def from_config(cls, config: Config) -> Spool:
        d = config.daemon
        return cls(d.spool, fsync=d.fsync, file_mode=d.file_mode, dir_mode=d.dir_mode)

    def dir(self, queue: str, state: str = "") -> str:
        if not valid_queue_name(queue):
            raise SpoolError(f"bad queue name: {queue!r}")
        return os.path.join(self.root, queue, state)

    def ensure_root(self) -> None:
        make_dirs(self.root, self.dir_mode)
        make_dirs(os.path.join(self.root, ".msgd"), self.dir_mode)

    def ensure(self, queue: str) -> None:
        for state in ("tmp", *STATES):
            make_dirs(self.dir(queue, state), self.dir_mode)

    # -- producing -------------------------------------------------------------------------------

    def send(self, queue: str, body: bytes) -> str:
        return self.send_many(queue, [body])[0]

    def send_many(self, queue: str, bodies: Iterable[bytes]) -> list[str]:
        """Make a batch durable with one flush: write all to tmp/, sync once, rename, sync new/.

        Nothing is renamed into new/ until every body is written and flushed, so a failure (a full
        disk) leaves no partial message visible: the tmp files are removed and the error raised.
        """
        self.ensure(queue)
        bodies = list(bodies)
        tmp, new = self.dir(queue, "tmp"), self.dir(queue, "new")
        one_by_one = self.fsync and len(bodies) == 1  # an fsync is cheaper than a syncfs for one
        ids: list[str] = []
        try:
            for body in bodies:
                mid = new_id()
                self._write(os.path.join(tmp, mid), body, fsync=one_by_one)
                ids.append(mid)
            if self.fsync and not one_by_one and ids:
                syncfs(tmp)
        except BaseException:
            for mid in ids:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(tmp, mid))
            raise
        for mid in ids:
            os.rename(os.path.join(tmp, mid), os.path.join(new, mid))
        if self.fsync and ids:
            fsync_dir(new)
        return ids

    def _write(self, path: str, body: bytes, fsync: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, self.file_mode)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)

    # -- inspecting ------------------------------------------------------------------------------

    def queues(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if valid_queue_name(n))

    def names(self, queue: str, state: str) -> list[str]:
        """File names in one state directory of a queue (cur/<slot> included); [] if none."""
        return _listdir(self.dir(queue, state))

    def cur_slots(self, queue: str) -> list[str]:
        return [s for s in _listdir(self.dir(queue, "cur")) if s.isdigit()]

    def claimed(self, queue: str) -> list[str]:
        """The names in every worker's cur/<slot>/ of a queue: what is in flight (or finished and
        not yet unlinked)."""
        return [n for slot in self.cur_slots(queue) for n in self.names(queue, f"cur/{slot}")]

    def depths(self, queue: str) -> dict[str, int]:
        """Message counts per state. A USR1 dump pays for these listings (~0.2 µs a name), so
        only failed/, where each message has an .error.json beside it, is filtered."""
        failed = self.names(queue, "failed")
        return {
            "new": len(self.names(queue, "new")),
            "cur": len(self.claimed(queue)),
            "defer": len(self.names(queue, "defer")),
            "failed": len(failed) - sum(n.endswith(ERROR_SUFFIX) for n in failed),
        }

    # -- retrying and repairing ------------------------------------------------------------------

    def release_due(self, queue: str, force: bool = False) -> int:
        """Move deferred messages whose time has come (all of them with `force`) back to new/."""
        defer, new = self.dir(queue, "defer"), self.dir(queue, "new")
        now_ms = time.time() * 1000
        moved = 0
        for name in _listdir(defer):
            mid, attempts, not_before = split_deferred(name)
            if force or not_before is None or not_before <= now_ms:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(os.path.join(defer, name), os.path.join(new, f"{mid}@{attempts}"))
                    moved += 1
        return moved

    def retry_failed(self, queue: str, ids: list[str] | None = None) -> list[str]:
        """Give dead letters a fresh start: back to new/ with no attempts counted."""
        failed, new = self.dir(queue, "failed"), self.dir(queue, "new")
        names = (
            [check_name(i) for i in ids]
            if ids
            else [n for n in _listdir(failed) if not n.endswith(ERROR_SUFFIX)]
        )
        moved = []
        for name in names:
            mid = split_name(name)[0]
            try:
                os.rename(os.path.join(failed, name), os.path.join(new, mid))
            except FileNotFoundError:
                raise SpoolError(f"{queue}: no failed message {name}") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(failed, name + ERROR_SUFFIX))
            moved.append(mid)
        return moved

    def recover(
        self,
        slot: int,
        queues: Iterable[str],
        counts: Callable[[str, str], bool] = lambda queue, name: False,
        policies: Mapping[str, QueueConfig] | None = None,
        error: dict[str, Any] | None = None,
    ) -> Counter[tuple[str, str]]:
        """Settle what a worker slot left in cur/ when its worker went away.

        Names in the slot's ack log were finished: they are unlinked. The rest were in flight:
        those for which `counts(queue, name)` holds had a failed attempt (the handler may have
        killed the worker) and are retried or dead-lettered; the others go back to new/ untouched
        (a stop, a restart). Returns how many of each (queue, outcome) there were.
        """
        acklog = AckLog(self.root, slot)
        finished = acklog.entries()
        outcome: Counter[tuple[str, str]] = Counter()
        for queue in queues:
            cur = self.dir(queue, f"cur/{slot}")
            for name in _listdir(cur):
                path = os.path.join(cur, name)
                if f"{queue}/{name}" in finished:
                    os.unlink(path)
                    state = "finished"
                elif policies and queue in policies and counts(queue, name):
                    mid, done = split_name(name)
                    state = settle_failure(
                        self,
                        queue,
                        path,
                        mid,
                        done + 1,
                        policies[queue],
                        dict(error or {}),
                        permanent=False,
                    )
                else:
                    os.rename(path, os.path.join(self.dir(queue, "new"), name))
                    state = "returned"
                outcome[queue, state] += 1
        acklog.reset()
        return outcome

    def slots_in_use(self) -> set[int]:
        """Slots with anything under cur/ or an ack log: what a previous master left behind."""
        slots = set()
        for queue in self.queues():
            slots.update(int(s) for s in self.cur_slots(queue))
        for name in _listdir(os.path.join(self.root, ".msgd")):
            if name.startswith("ack.") and name[4:].isdigit():
                slots.add(int(name[4:]))
        return slots


def settle_failure(
    spool: Spool,
    queue: str,
    path: str,
    mid: str,
    attempt: int,
    policy: QueueConfig,
    error: dict[str, Any],
    permanent: bool,
) -> str:
    """Move a message that failed `attempt` to defer/ or, when done trying, to failed/.

    Returns "retried" or "failed". The error record of a dead letter is written before the
    message moves, so a dead letter is never without its reason.
    """
    if permanent or attempt >= policy.max_attempts:
        failed = spool.dir(queue, "failed")
        record = {"id": mid, "queue": queue, "attempts": attempt, "failed_at": time.time(), **error}
        fd = os.open(
            os.path.join(failed, mid + ERROR_SUFFIX),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            spool.file_mode,
        )
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.rename(path, os.path.join(failed, mid))
        return "failed"
    not_before = int((time.time() + policy.delay(attempt)) * 1000)
    os.rename(path, os.path.join(spool.dir(queue, "defer"), f"{mid}@{attempt}@{not_before}"))
    return "retried"


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


class AckLog:
    """Per worker slot: messages whose handler succeeded but whose file is not unlinked yet.

    Unlinking a flushed file waits ~50 µs on the filesystem, longer than the rest of a no-op
    message costs, so workers unlink on background threads. If a worker died between success and
    unlink, the file would still sit in cur/ and be worked a second time; this log, a small file
    mapped into memory (writes survive the process; a power loss only means a re-run), says which
    of those files are finished. A record is written after the handler returns and zeroed after the
    unlink; recovery treats the files it names as done.
    """

    RECORD = 128
    RECORDS = 1024

    def __init__(self, root: str, slot: int) -> None:
        self.path = os.path.join(root, ".msgd", f"ack.{slot}")
        self._map: mmap.mmap | None = None

    def open(self) -> None:
        make_dirs(os.path.dirname(self.path))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.RECORD * self.RECORDS)
            self._map = mmap.mmap(fd, self.RECORD * self.RECORDS)
        finally:
            os.close(fd)

    def write(self, index: int, queue: str, name: str) -> bool:
        """Record `queue/name` as finished; False if it is too long to record (unlink at once)."""
        record = f"{queue}/{name}".encode()
        if len(record) >= self.RECORD:
            return False
        start = index * self.RECORD
        self._map[start : start + self.RECORD] = record.ljust(self.RECORD, b"\0")
        return True

    def clear(self, index: int) -> None:
        start = index * self.RECORD
        self._map[start : start + 1] = b"\0"

    def entries(self) -> set[str]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return set()
        records = (data[i : i + self.RECORD] for i in range(0, len(data), self.RECORD))
        return {r.rstrip(b"\0").decode(errors="replace") for r in records if r[:1] != b"\0"}

    def reset(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Acker:
    """Unlinks finished messages on background threads, with a crash-proof record of each."""

    def __init__(self, root: str, slot: int) -> None:
        self.acklog = AckLog(root, slot)
        self.acklog.open()
        self.free: queue_mod.SimpleQueue[int] = queue_mod.SimpleQueue()
        for i in range(AckLog.RECORDS):
            self.free.put(i)
        self.todo: queue_mod.SimpleQueue[tuple[str, int] | None] = queue_mod.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._run, name=f"ack-{i}", daemon=True)
            for i in range(ACK_THREADS)
        ]
        for t in self.threads:
            t.start()

    def done(self, queue: str, name: str, path: str) -> None:
        index = self.free.get()  # blocks only if 1,024 unlinks are outstanding
        if self.acklog.write(index, queue, name):
            self.todo.put((path, index))
        else:
            self.free.put(index)
            os.unlink(path)

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            path, index = item
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            self.acklog.clear(index)
            self.free.put(index)

    def close(self) -> None:
        for _ in self.threads:
            self.todo.put(None)
        for t in self.threads:
            t.join()


class SpoolInbox:
    """A worker's view of one queue: claim the oldest message, wait without polling.

    Shared by the handler threads of one queue in one worker. Claiming renames new/<name> into
    this worker's cur/<slot>/; when another worker won the race the rename fails and the next
    name is tried. Listing happens only when the local batch is used up.
    """

    def __init__(
        self, spool: Spool, queue: str, slot: int, stop_fd: int, acker: Acker, policy: QueueConfig
    ) -> None:
        self.spool, self.queue = spool, queue
        self.acker, self.policy = acker, policy
        self.new = spool.dir(queue, "new") + "/"
        self.cur = spool.dir(queue, f"cur/{slot}") + "/"
        make_dirs(self.cur, spool.dir_mode)
        self._stop_fd = stop_fd
        self._batch: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._watching = False
        try:
            self._inotify: int | None = watch_arrivals(self.new)
        except OSError:
            self._inotify = None

    def claim(self) -> str | None:
        """Claim the next message into cur/; None when new/ is empty right now."""
        while True:
            with self._lock:
                if not self._batch:
                    self._batch = sorted(
                        (n for n in os.listdir(self.new) if not n.startswith(".")), reverse=True
                    )
                    if not self._batch:
                        return None
                name = self._batch.pop()
            try:
                os.rename(self.new + name, self.cur + name)
            except FileNotFoundError:
                continue  # another worker took it
            return name

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
        """Open a claimed file; OSError or SpoolError (too large) mean it cannot be worked."""
        mid, done = split_name(name)
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
        """The message id and the number of the attempt this claim is."""
        mid, done = split_name(name)
        return mid, done + 1

    def done(self, name: str) -> None:
        self.acker.done(self.queue, name, self.cur + name)

    def fail(self, name: str, error: dict[str, Any], permanent: bool) -> str:
        mid, attempt = self.label(name)
        return settle_failure(
            self.spool, self.queue, self.cur + name, mid, attempt, self.policy, error, permanent
        )

    def burst(self) -> None:
        """Nothing to do: the master releases deferred spool messages itself."""


def _read_all(fd: int, size: int) -> bytes:
    """One read for the usual case: a message file does not change once it is in new/."""
    body = os.read(fd, size)
    while len(body) < size and (more := os.read(fd, size - len(body))):
        body += more
    return body
