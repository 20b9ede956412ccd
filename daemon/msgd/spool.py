"""The durable on-disk queue store (backend "spool"), with maildir discipline.

    <spool>/<queue>/tmp/      producers write here first
                   /new/      ready: `<id>` or `<id>@<attempts done>[@p<priority>][@x<expiry>]`
                   /cur/<slot>/  claimed by the worker in that slot (renamed, never copied)
                   /defer/    waiting: retries `<...>@<not before, ms>`, delayed sends `<...>@t<ms>`
                   /failed/   dead letters `<id>`, each with `<id>.error.json` beside it
                   /intake/   single durable sends' records, made files in new/ (intake.py)
    <spool>/.msgd/ack.<slot>  names a worker finished but has not unlinked yet (spool_inbox.py)

Guarantees: `send_many` returns ids only once the messages are flushed (with `daemon.fsync`, the
default): a batch's files and their names in new/, a single message's record in the queue's intake
log, which the master turns into a file in new/ (or defer/) at once. Every state change is a rename
inside one filesystem, so a message is always in exactly one place and a crash at any instant loses
nothing. Order: oldest first (ids are 16 hex digits of enqueue time in ns and 8 random hex digits:
sorting them sorts by enqueue time), within a strict priority: a worker claims the highest priority
waiting, and the oldest among equals. The names are spoolname.py's. A delayed send waits in defer/
until its time (a burst does not pull it forward); a message whose TTL passed before it started is
made a dead letter by the master's release (once a second) or by the worker that claims it. The
worker's side (claiming, acknowledging) is in spool_inbox.py.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import stat
import time
from collections.abc import Sequence
from typing import Any

from msgd import intake
from msgd.backend import BackendError, BurstMark, Death, Depths, Inbox, Outcome, Settled
from msgd.config import DaemonConfig, QueueConfig, valid_queue_name
from msgd.counters import crc
from msgd.spoolname import SpoolName
from msgd.sysutil import atomic_write, fsync_dir, make_dirs, syncfs
from msgd.when import NOW, SendOptions

STATES = ("new", "cur", "defer", "failed")
ERROR_SUFFIX = ".error.json"
SWEEP_EVERY = 1.0  # seconds between looks for expired messages in new/


class SpoolError(BackendError):
    """A queue name, id or spool directory that cannot be used."""


def new_id() -> str:
    return f"{time.time_ns():016x}{random.getrandbits(32):08x}"


def id_time(mid: str) -> float | None:
    """The enqueue time (epoch seconds) a new_id() carries; None for a foreign producer's id."""
    if len(mid) == 24:
        try:  # once per message: not contextlib.suppress (~0.25 µs)
            return int(mid[:16], 16) / 1e9
        except ValueError:
            pass
    return None


def check_name(name: str, what: str = "message id") -> str:
    """Refuse anything that could name a path outside its directory."""
    if not name or len(name) > 200 or name.startswith(".") or "/" in name or "\0" in name:
        raise SpoolError(f"bad {what}: {name!r}")
    return name


def split_name(name: str) -> tuple[str, int]:
    """A name of new/ or cur/ -> (id, attempts done); a bare id has none done."""
    parsed = SpoolName.parse(name)
    return parsed.id, parsed.attempts


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

    def queues(self) -> list[str]:
        """The queue directories present (configured or not)."""
        return sorted(n for n in listdir(self.root) if valid_queue_name(n))


def _is_directory(path: str) -> bool:
    """A directory, not a symbolic link to one (make_dirs refuses those)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class SpoolStore:
    """One queue of the spool: producing, inspecting, retrying and repairing it."""

    local = True

    def __init__(self, queue: str, policy: QueueConfig, daemon: DaemonConfig) -> None:
        self.queue, self.policy = queue, policy
        self.spool = Spool.from_config(daemon)
        self.root = self.spool.root
        self.dir = self.spool.dir(queue)
        self.tmp, self.new = self.spool.dir(queue, "tmp"), self.spool.dir(queue, "new")
        self.defer, self.failed = self.spool.dir(queue, "defer"), self.spool.dir(queue, "failed")
        self._next_sweep = 0.0  # time.monotonic() of the next look for expired messages

    def ensure(self) -> None:
        for state in ("tmp", *STATES):
            make_dirs(self.spool.dir(self.queue, state), self.spool.dir_mode)
        intake.ensure(self.dir, self.spool.dir_mode, self.spool.file_mode)

    # -- producing -------------------------------------------------------------------------------

    def send_many(self, bodies: Sequence[bytes], options: SendOptions = NOW) -> list[str]:
        """Make a batch durable with one flush: write all to tmp/, sync once, rename, sync new/
        (or defer/, for a delayed batch).

        Nothing is renamed into new/ until every body is written and flushed, so a failure (a full
        disk) leaves no partial message visible: the tmp files are removed and the error raised.
        A single durable message (up to intake.LARGEST) is appended to the intake log instead:
        one flush, not two.
        """
        fsync = self.spool.fsync
        one_by_one = fsync and len(bodies) == 1  # an fsync is cheaper than a syncfs for one
        if one_by_one and len(bodies[0]) <= intake.LARGEST:
            return [self._append(bodies[0], options)]
        if not _is_directory(self.tmp):  # the queue's first message (a stat, not a mkdir each)
            self.ensure()
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
        into = self.defer if options.due else self.new
        for mid in ids:
            os.rename(os.path.join(self.tmp, mid), os.path.join(into, _sent_name(mid, options)))
        if fsync and ids:
            fsync_dir(into)
        return ids

    def _append(self, body: bytes, options: SendOptions) -> str:
        """One message into the intake log, under its full spool name (options included)."""
        mid = new_id()
        records = [(_sent_name(mid, options), body)]
        try:
            intake.append(self.dir, records, self.spool.file_mode)
        except FileNotFoundError:  # the queue's first message: create its directories
            self.ensure()
            intake.append(self.dir, records, self.spool.file_mode)
        except intake.IntakeError as e:
            raise SpoolError(f"queue {self.queue}: {e}") from None
        return mid

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
        failed, defer = self.names("failed"), self.names("defer")
        scheduled = sum("@t" in n for n in defer)  # msgd's own names: an id holds no @
        waiting = intake.pending(self.dir)  # sent, not yet made files: they count as such
        later = sum("@t" in n for n in waiting)
        return Depths(
            new=len(self.names("new")) + len(waiting) - later,
            cur=len(self.claimed()),
            defer=len(defer) - scheduled,
            scheduled=scheduled + later,
            failed=len(failed) - sum(n.endswith(ERROR_SUFFIX) for n in failed),
        )

    # -- retrying ------------------------------------------------------------------------------

    def release_due(self, force: bool) -> int:
        """Move deferred messages whose time has come back to new/: with `force` (a burst) every
        retry, but a delayed send only at its time. Once a second (not in a burst's call), make
        the messages in new/ whose TTL passed dead letters; returns how many. Only the master
        calls this: it also makes sure this process converts the queue's intake as records
        arrive (a queue a reload added included)."""
        intake.converter(self.spool.file_mode).watch(self.dir)
        now_ms = time.time() * 1000
        for name in listdir(self.defer):
            waiting = SpoolName.parse(name, deferred=True)
            due = waiting.not_before_ms is None or waiting.not_before_ms <= now_ms
            if due or (force and not waiting.scheduled):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(
                        os.path.join(self.defer, name), os.path.join(self.new, waiting.ready())
                    )
        if force or time.monotonic() < self._next_sweep:  # the master's periodic call counts
            return 0
        self._next_sweep = time.monotonic() + SWEEP_EVERY
        return self._expire(now_ms)

    def _expire(self, now_ms: float) -> int:
        """Dead letters of the messages in new/ whose TTL has passed (the `@x` in their name).

        Each is first taken out of new/ into tmp/ (a rename: a worker claiming it at the same
        instant gets it, or does not), so its error record is written for a message nobody
        else holds. One left in tmp/ by a crash goes back to new/ at the next start (recover)."""
        expired = 0
        for name in listdir(self.new):
            parsed = SpoolName.parse(name) if "@x" in name else None
            if parsed is None or not parsed.expired(now_ms):
                continue
            taken = os.path.join(self.tmp, name)
            try:
                os.rename(os.path.join(self.new, name), taken)
            except FileNotFoundError:  # a worker claimed it: it sees the expiry itself
                continue
            self.dead_letter(taken, expired_error(parsed))
            expired += 1
        return expired

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
        """Move the claimed file at `path`, whose attempt just failed, to defer/ (keeping its
        priority; its TTL no longer applies: it has started) or, when done trying, to failed/."""
        claimed = SpoolName.parse(os.path.basename(path))
        attempt = claimed.attempts + 1
        if permanent or attempt >= self.policy.max_attempts:
            self.dead_letter(path, {"attempts": attempt, **error})
            return Outcome.FAILED
        not_before = int((time.time() + self.policy.delay(attempt)) * 1000)
        retry = SpoolName(
            id=claimed.id, attempts=attempt, priority=claimed.priority, not_before_ms=not_before
        )
        os.rename(path, os.path.join(self.defer, retry.waiting()))
        return Outcome.RETRIED

    def dead_letter(self, path: str, error: dict[str, Any]) -> None:
        """Move the message at `path` to failed/. Its error record is written first, so a dead
        letter is never without its reason."""
        parsed = SpoolName.parse(os.path.basename(path))
        record = {
            "id": parsed.id,
            "queue": self.queue,
            "attempts": parsed.attempts,
            "failed_at": time.time(),
            **error,
        }
        fd = os.open(
            os.path.join(self.failed, parsed.id + ERROR_SUFFIX),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            self.spool.file_mode,
        )
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.rename(path, os.path.join(self.failed, parsed.id))

    # -- bursts ----------------------------------------------------------------------------------

    def burst_mark(self) -> BurstMark:
        """Everything in new/ and cur/ now, oldest last in the list still to be seen leave new/.
        What waits in the intake is made a message first: it was sent before the burst too."""
        intake.convert(self.dir, self.spool.file_mode)
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
        """At start: what a previous master's workers left in cur/ (a stop: nothing charged),
        then the intake's records no master made messages yet (after the slots: a power loss's
        replay looks for its messages in new/, defer/ and failed/)."""
        total = Settled()
        for slot in self.cur_slots():
            total.add(self.settle(Death(slot=slot, charged=False)))
        intake.recover(self.dir, self.spool.file_mode)  # converting from now on: release_due
        for name in listdir(self.tmp):  # taken to expire (_expire): a producer's names hold no @
            if "@x" in name:
                os.rename(os.path.join(self.tmp, name), os.path.join(self.new, name))
                total.returned += 1
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
        """Holds no descriptors; in the master, makes what it converted of the intake durable."""
        intake.flush_converted(self.dir, self.spool.file_mode)


def _sent_name(mid: str, options: SendOptions) -> str:
    """A new message's file name: in new/, or in defer/ (a delayed send) until its time."""
    name = SpoolName(
        id=mid,
        priority=options.priority,
        expires_ms=int(options.expires * 1000),
        not_before_ms=int(options.due * 1000),
        scheduled=True,
    )
    return name.waiting() if options.due else name.ready()


def expired_error(name: SpoolName) -> dict[str, Any]:
    """The error record of a message whose TTL passed before it started."""
    at = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(name.expires_ms / 1000))
    return {"error_type": "Expired", "error": f"not started within its TTL (expired {at})"}


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
