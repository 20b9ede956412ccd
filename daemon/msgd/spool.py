"""The durable on-disk queue store (backend "spool"), with maildir discipline.

    <spool>/<queue>/tmp/      producers write here first
                   /new/      ready: `<id>` or `<id>@<attempts done>`
                   /cur/<slot>/  claimed by the worker in that slot (renamed, never copied)
                   /defer/    waiting to be retried: `<id>@<attempts done>@<not before, ms>`
                   /failed/   dead letters `<id>`, each with `<id>.error.json` beside it
    <spool>/.msgd/ack.<slot>  names a worker finished but has not unlinked yet (spool_inbox.py)

Guarantees: `send_many` returns ids only once the files and their names in new/ are flushed
(with `daemon.fsync`, the default); every state change is a rename inside one filesystem, so a
message is always in exactly one place and a crash at any instant loses nothing. Order: oldest
first (ids are 16 hex digits of enqueue time in ns and 8 random hex digits: sorting them sorts by
enqueue time). No priorities. The worker's side (claiming, acknowledging) is in spool_inbox.py.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import time
from collections.abc import Sequence
from typing import Any

from msgd.backend import BackendError, BurstMark, Death, Depths, Inbox, Outcome, Settled
from msgd.config import DaemonConfig, QueueConfig, valid_queue_name
from msgd.counters import crc
from msgd.sysutil import atomic_write, fsync_dir, make_dirs, syncfs

STATES = ("new", "cur", "defer", "failed")
ERROR_SUFFIX = ".error.json"


class SpoolError(BackendError):
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


def listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


class Spool:
    """The spool root: where the queues' directories live, with the daemon's file modes."""

    def __init__(
        self, root: str, *, fsync: bool = True, file_mode: int = 0o600, dir_mode: int = 0o700
    ) -> None:
        self.root = root
        self.fsync = fsync
        self.file_mode = file_mode
        self.dir_mode = dir_mode

    @classmethod
    def from_config(cls, d: DaemonConfig) -> Spool:
        return cls(d.spool, fsync=d.fsync, file_mode=d.file_mode, dir_mode=d.dir_mode)

    def dir(self, queue: str, state: str = "") -> str:
        if not valid_queue_name(queue):
            raise SpoolError(f"bad queue name: {queue!r}")
        return os.path.join(self.root, queue, state)

    def ensure_root(self) -> None:
        make_dirs(self.root, self.dir_mode)
        make_dirs(os.path.join(self.root, ".msgd"), self.dir_mode)

    def queues(self) -> list[str]:
        """The queue directories present (configured or not)."""
        return sorted(n for n in listdir(self.root) if valid_queue_name(n))


class SpoolStore:
    """One queue of the spool: producing, inspecting, retrying and repairing it."""

    def __init__(self, queue: str, policy: QueueConfig, daemon: DaemonConfig) -> None:
        self.queue, self.policy = queue, policy
        self.spool = Spool.from_config(daemon)
        self.root = self.spool.root
        self.tmp, self.new = self.spool.dir(queue, "tmp"), self.spool.dir(queue, "new")
        self.defer, self.failed = self.spool.dir(queue, "defer"), self.spool.dir(queue, "failed")

    def ensure(self) -> None:
        for state in ("tmp", *STATES):
            make_dirs(self.spool.dir(self.queue, state), self.spool.dir_mode)

    # -- producing -------------------------------------------------------------------------------

    def send_many(self, bodies: Sequence[bytes]) -> list[str]:
        """Make a batch durable with one flush: write all to tmp/, sync once, rename, sync new/.

        Nothing is renamed into new/ until every body is written and flushed, so a failure (a full
        disk) leaves no partial message visible: the tmp files are removed and the error raised.
        """
        self.ensure()
        fsync = self.spool.fsync
        one_by_one = fsync and len(bodies) == 1  # an fsync is cheaper than a syncfs for one
        ids: list[str] = []
        try:
            for body in bodies:
                mid = new_id()
                self._write(os.path.join(self.tmp, mid), body, fsync=one_by_one)
                ids.append(mid)
            if fsync and not one_by_one and ids:
                syncfs(self.tmp)
        except BaseException:
            for mid in ids:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.tmp, mid))
            raise
        for mid in ids:
            os.rename(os.path.join(self.tmp, mid), os.path.join(self.new, mid))
        if fsync and ids:
            fsync_dir(self.new)
        return ids

    def _write(self, path: str, body: bytes, fsync: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, self.spool.file_mode)
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

    def check(self) -> None:
        """The queue's directories exist and this process can create files in them."""
        try:
            self.ensure()
            probe = os.path.join(self.tmp, f".probe.{os.getpid()}")
            atomic_write(probe, b"")
            os.unlink(probe)
        except OSError as e:
            raise SpoolError(f"daemon.spool: not writable: {e}") from None

    # -- inspecting ------------------------------------------------------------------------------

    def names(self, state: str) -> list[str]:
        """File names in one state directory (cur/<slot> included); [] if none."""
        return listdir(self.spool.dir(self.queue, state))

    def cur_slots(self) -> list[int]:
        return [int(s) for s in self.names("cur") if s.isdigit()]

    def claimed(self) -> list[str]:
        """The names in every worker's cur/<slot>/: in flight, or finished and not unlinked."""
        return [n for slot in self.cur_slots() for n in self.names(f"cur/{slot}")]

    def depths(self) -> Depths:
        """Message counts per state. A USR1 dump pays for these listings (~0.2 µs a name), so
        only failed/, where each message has an .error.json beside it, is filtered."""
        failed = self.names("failed")
        return Depths(
            new=len(self.names("new")),
            cur=len(self.claimed()),
            defer=len(self.names("defer")),
            failed=len(failed) - sum(n.endswith(ERROR_SUFFIX) for n in failed),
        )

    # -- retrying ------------------------------------------------------------------------------

    def release_due(self, force: bool) -> None:
        """Move deferred messages whose time has come (all of them with `force`) back to new/."""
        now_ms = time.time() * 1000
        for name in listdir(self.defer):
            mid, attempts, not_before = split_deferred(name)
            if force or not_before is None or not_before <= now_ms:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(
                        os.path.join(self.defer, name), os.path.join(self.new, f"{mid}@{attempts}")
                    )

    def retry_failed(self, ids: Sequence[str] | None) -> list[str]:
        """Give dead letters a fresh start: back to new/ with no attempts counted."""
        names = (
            [check_name(i) for i in ids]
            if ids
            else [n for n in listdir(self.failed) if not n.endswith(ERROR_SUFFIX)]
        )
        moved = []
        for name in names:
            mid = split_name(name)[0]
            try:
                os.rename(os.path.join(self.failed, name), os.path.join(self.new, mid))
            except FileNotFoundError:
                raise SpoolError(f"{self.queue}: no failed message {name}") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.failed, name + ERROR_SUFFIX))
            moved.append(mid)
        return moved

    def fail(self, path: str, error: dict[str, Any], permanent: bool) -> Outcome:
        """Move the claimed file at `path`, whose attempt just failed, to defer/ or, when done
        trying, to failed/. The error record of a dead letter is written before the message
        moves, so a dead letter is never without its reason."""
        mid, done = split_name(os.path.basename(path))
        attempt = done + 1
        if permanent or attempt >= self.policy.max_attempts:
            record = {"id": mid, "queue": self.queue, "attempts": attempt, "failed_at": time.time()}
            fd = os.open(
                os.path.join(self.failed, mid + ERROR_SUFFIX),
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                self.spool.file_mode,
            )
            with os.fdopen(fd, "w") as f:
                json.dump({**record, **error}, f, indent=1)
            os.rename(path, os.path.join(self.failed, mid))
            return Outcome.FAILED
        not_before = int((time.time() + self.policy.delay(attempt)) * 1000)
        os.rename(path, os.path.join(self.defer, f"{mid}@{attempt}@{not_before}"))
        return Outcome.RETRIED

    # -- bursts ----------------------------------------------------------------------------------

    def burst_mark(self) -> BurstMark:
        """Everything in new/ and cur/ now, oldest last in the list still to be seen leave new/."""
        names = {*self.names("new"), *self.claimed()}
        return BurstMark(len(names), (names, sorted(names, reverse=True)))

    def burst_worked(self, mark: BurstMark) -> bool:
        """Whether all of the mark's messages have left new/ and cur/.

        Workers claim oldest first, so it is enough to look at the oldest name still waiting (one
        stat per poll, not a listing of a directory that may hold thousands) until new/ has none
        of them left; then at the few files in cur/.
        """
        names, waiting = mark.state
        while waiting and not os.path.exists(os.path.join(self.new, waiting[-1])):
            waiting.pop()
        return not waiting and not any(n in names for n in self.claimed())

    # -- repairing -------------------------------------------------------------------------------

    def recover(self) -> Settled:
        """At start: what a previous master's workers left in cur/ (a stop: nothing charged)."""
        total = Settled()
        for slot in self.cur_slots():
            total.add(self.settle(Death(slot=slot, charged=False)))
        return total

    def settle(self, death: Death) -> Settled:
        """Settle what a worker slot left in cur/ when its worker went away.

        Names in the slot's ack log were finished: they are unlinked. The rest were in flight:
        those charged (see backend.Death) had a failed attempt and are retried or dead-lettered;
        the others go back to new/ untouched (a stop, a restart).
        """
        cur = self.spool.dir(self.queue, f"cur/{death.slot}")
        names = listdir(cur)
        finished = AckLog(self.root, death.slot).entries(self.queue)
        settled = Settled(uncounted=self._made_durable(death, names, finished))
        for name in names:
            path = os.path.join(cur, name)
            if name in finished:
                os.unlink(path)
                settled.finished += 1
            elif death.charged if death.timed_out is None else crc(name) == death.timed_out:
                if self.fail(path, death.error, permanent=False) is Outcome.FAILED:
                    settled.failed += 1
                else:
                    settled.retried += 1
            else:
                os.rename(path, os.path.join(self.new, name))
                settled.returned += 1
        return settled

    @staticmethod
    def _made_durable(death: Death, names: list[str], finished: set[str]) -> list[Outcome]:
        """The outcomes the dead worker intended whose effect happened: the message left cur/,
        or its success is in the ack log."""
        held = {crc(n): n for n in names}
        return [
            outcome
            for run_crc, outcome in death.intended
            if run_crc not in held or held[run_crc] in finished
        ]

    # -- the worker's side -----------------------------------------------------------------------

    def inbox(self, slot: int, stop_fd: int, log: Any) -> Inbox:
        from msgd.spool_inbox import SpoolInbox

        return SpoolInbox(self, slot, stop_fd)

    def close(self) -> None:
        """Nothing to close: a spool store holds no descriptors."""


class AckLog:
    """Per worker slot: messages whose handler succeeded but whose file is not unlinked yet.

    If a worker died between success and unlink, the file would still sit in cur/ and be worked a
    second time; this log, a small file mapped into memory (writes survive the process; a power
    loss only means a re-run), says which of those files are finished. A record `queue/name` is
    written after the handler returns and zeroed after the unlink; the master's settlement treats
    the files it names as done, and a new worker in the slot starts it empty (the master settles a
    slot before it starts the slot's next worker).
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
            os.ftruncate(fd, 0)  # what it named was settled before this worker started
            os.ftruncate(fd, self.RECORD * self.RECORDS)
            self._map = mmap.mmap(fd, self.RECORD * self.RECORDS)
        finally:
            os.close(fd)

    def write(self, index: int, queue: str, name: str) -> bool:
        """Record `queue/name` as finished; False if it is too long to record (unlink at once)."""
        assert self._map is not None
        record = f"{queue}/{name}".encode()
        if len(record) >= self.RECORD:
            return False
        start = index * self.RECORD
        self._map[start : start + self.RECORD] = record.ljust(self.RECORD, b"\0")
        return True

    def clear(self, index: int) -> None:
        assert self._map is not None
        start = index * self.RECORD
        self._map[start : start + 1] = b"\0"

    def entries(self, queue: str) -> set[str]:
        """The names of `queue` the log holds as finished."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return set()
        prefix = queue + "/"
        records = (data[i : i + self.RECORD] for i in range(0, len(data), self.RECORD))
        texts = (r.rstrip(b"\0").decode(errors="replace") for r in records if r[:1] != b"\0")
        return {t[len(prefix) :] for t in texts if t.startswith(prefix)}
