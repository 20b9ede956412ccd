"""The queue store interface: everything msgd asks of the place where a queue's messages live.

Three stores implement it, one module each, imported only when a configured queue uses it:

    spool  msgd.spool    files in a local directory (the default; no extra)
    redis  msgd.redisq   a Redis stream and consumer group, shared by several hosts (msgd[redis])
    amqp   msgd.amqp     a RabbitMQ queue through pika (msgd[amqp])

A `Store` is one queue's handle. The master, producers (`msgd.send`, `msgctl send`) and msgctl's
inspection commands hold one per queue; a worker asks it for an `Inbox`, its view for claiming and
settling. Nothing outside a store's module knows which kind it is: adding a backend is one module
and one line in BACKENDS. Each store's docstring states what it guarantees (durability on return,
order, priority); the README's backend table mirrors them.

Blocking: store calls may wait on a disk or a network. The master calls them off its event loop
(with a deadline), so a slow broker never delays a signal; `settle` is the exception, it runs on
the loop when a worker dies and must not touch the network.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from msgd.when import NOW, SendOptions

if TYPE_CHECKING:
    from msgd.config import DaemonConfig, QueueConfig
    from msgd.handlers import Message


class BackendError(Exception):
    """A queue that cannot be used right now (its server unreachable) or a message or name that
    cannot be worked; the text names the queue and says why."""


class Expired(BackendError):
    """A claimed message past its TTL: the worker makes it a dead letter without running it."""


class Outcome(enum.IntEnum):
    """How one handler run ended. The values index the shared counters (counters.py)."""

    SUCCEEDED = 0
    RETRIED = 1
    FAILED = 2
    REJECTED = 3  # counted with FAILED: a handler's msgd.Reject
    TIMED_OUT = 4  # counted with RETRIED or FAILED: the master killed the worker
    EXPIRED = 5  # counted with FAILED: not started within its TTL (a dead letter, never run)

    @property
    def label(self) -> str:
        return self.name.lower()


class Depths(msgspec.Struct, kw_only=True):
    """How many messages of one queue are in each state, as the store can tell."""

    new: int = 0  # waiting to be claimed
    cur: int = 0  # claimed by a worker, not settled yet
    defer: int = 0  # failed, waiting for the retry's time
    scheduled: int = 0  # sent with a delay or a time, waiting for it
    failed: int = 0  # dead letters
    detail: str = ""  # the store's own words for `msgctl queues` (stream length, consumers...)


class BurstMark(msgspec.Struct):
    """Where a queue stood when a burst began: how many messages the burst covers (as well as
    the store can tell) and the store's own record of them."""

    pending: int
    state: Any = None


class Death(msgspec.Struct, frozen=True, kw_only=True):
    """A worker slot whose process went away, as the pool tells its queues' stores.

    `charged`: every message the worker held had a failed attempt (it died unasked: the handler
    may be the cause). `timed_out`: the crc32 of the name of the one message whose handler ran
    past its timeout (then only that one is charged). `intended`: for each run the worker had
    begun to settle (counters.SlotWriter.intend), (crc32 of the name, outcome); the store says
    which of those it made durable, so the master can count them.
    """

    slot: int
    charged: bool
    timed_out: int | None = None
    intended: list[tuple[int, Outcome]] = []
    error: dict[str, Any] = {}


class Settled(msgspec.Struct, kw_only=True):
    """What a store did with a dead worker's messages of one queue."""

    finished: int = 0  # had succeeded: removed
    returned: int = 0  # back to waiting, no attempt counted
    retried: int = 0  # charged an attempt, retried later
    failed: int = 0  # charged an attempt, dead letters now
    uncounted: list[Outcome] = []  # outcomes made durable that the worker did not count

    def add(self, other: Settled) -> None:
        self.finished += other.finished
        self.returned += other.returned
        self.retried += other.retried
        self.failed += other.failed
        self.uncounted += other.uncounted


class Inbox(Protocol):
    """A worker's view of one queue, shared by that queue's runner threads in the worker.

    A runner loops: `claim`; if it got a handle, `read`, run the handler, then `done` or `fail`;
    if not, `wait`. Handles are the store's own strings (a file name, an entry id, a delivery
    tag), meaningful only to this inbox.
    """

    queue: str

    def claim(self) -> str | None:
        """The next message to work, or None when there is none right now. Does not wait long."""
        ...

    def wait(self) -> None:
        """Block until a message may have arrived, the worker's stop fd turns readable, or about
        half a second has passed."""
        ...

    def read(self, handle: str, max_size: int) -> Message:
        """The claimed message; raises BackendError or OSError if it cannot be worked (it goes to
        the dead letters with that error)."""
        ...

    def label(self, handle: str) -> tuple[str, int]:
        """The claimed message's id and the number of this attempt (1 the first time)."""
        ...

    def done(self, handle: str) -> None:
        """The handler returned: forget the message for good (retrying through an outage)."""
        ...

    def fail(self, handle: str, error: dict[str, Any], permanent: bool) -> Outcome:
        """The handler failed: retry later per the queue's backoff, or (permanent, or out of
        attempts) make it a dead letter with `error`. Durable on return: RETRIED or FAILED."""
        ...

    def burst(self) -> None:
        """A burst reached this worker: deferred retries are due now."""
        ...

    def close(self) -> None:
        """The worker is exiting after its runners stopped."""
        ...


class Store(Protocol):
    """One queue's store. Cheap to create; connects (if it must) on first use."""

    queue: str
    local: bool  # answers from this machine's files, never a network (see reporter.py)

    def send_many(self, bodies: Sequence[bytes], options: SendOptions = NOW) -> list[str]:
        """Enqueue a batch; returns the new ids, in order, only once all of them are durable.
        `options`: when the batch may start, until when, and its priority (when.py); a store
        that cannot honour one raises BackendError and sends nothing."""
        ...

    def check(self) -> None:
        """Raise BackendError unless this process can use the queue (a spool it can write).
        Called at start and before a reload is applied; may create what is missing."""
        ...

    def depths(self) -> Depths:
        """Messages per state; raises BackendError when the store cannot be asked."""
        ...

    def release_due(self, force: bool) -> int:
        """Called every tick by the master: make due retries and delayed sends claimable (every
        retry with `force`, a burst; a delayed send only at its time). Without `force`, also
        make dead letters of waiting messages whose TTL passed (as often as the store can
        afford); returns how many, for the master to count. A no-op (0) where the broker or the
        workers keep that time."""
        ...

    def burst_mark(self) -> BurstMark:
        """A mark of everything claimable now (what a burst must see worked)."""
        ...

    def burst_worked(self, mark: BurstMark) -> bool:
        """Whether every message pending at `mark` has been settled (False while unknown)."""
        ...

    def retry_failed(self, ids: Sequence[str] | None) -> list[str]:
        """Dead letters (all, or those with these ids) back to waiting with no attempts counted;
        returns the ids moved. Raises BackendError for an id that is not a dead letter here."""
        ...

    def recover(self) -> Settled:
        """At the master's start: settle what a previous master's workers left claimed."""
        ...

    def settle(self, death: Death) -> Settled:
        """A worker slot's process went away: settle what it held of this queue. Runs on the
        master's loop: it must not wait on a network (a broker redelivers by itself)."""
        ...

    def inbox(self, slot: int, stop_fd: int, log: Any) -> Inbox:
        """In a worker process: the runners' view of this queue."""
        ...

    def close(self) -> None:
        """Drop connections; the store may be used again (it reconnects)."""
        ...


class StoreFactory(Protocol):
    def __call__(self, queue: str, policy: QueueConfig, daemon: DaemonConfig) -> Store: ...


# backend name -> (module, class, the library it needs or "", the extra that installs it, the
# module of its workers' side if apart)
BACKENDS: dict[str, tuple[str, str, str, str, str]] = {
    "spool": ("msgd.spool", "SpoolStore", "", "", "msgd.spool_inbox"),
    "redis": ("msgd.redisq", "RedisStore", "redis", "redis-py", ""),
    "amqp": ("msgd.amqp", "AmqpStore", "pika", "pika", "msgd.amqp_inbox"),
}
EXTRA = {"redis": "redis", "amqp": "amqp"}


def missing_library(backend: str) -> str | None:
    """Why a backend cannot be used here (its library is not installed), or None. Looks for the
    library without importing it."""
    _, _, library, what, _ = BACKENDS[backend]
    if library and importlib.util.find_spec(library) is None:
        return f"\"{backend}\" needs {what}: pip install 'msgd[{EXTRA[backend]}]'"
    return None


def close_all(stores: Mapping[str, Store], log: Any) -> None:
    """In a thread, at a stop or for a reload's old stores: each lets go of its connections (the
    spool makes what the master converted of its intake durable, so that a power loss after a
    clean stop replays nothing); one that fails is logged and the others still close."""
    for name, store in stores.items():
        try:
            store.close()
        except Exception:
            log.exception("closing the queue's store failed", queue=name)


def open_store(queue: str, policy: QueueConfig, daemon: DaemonConfig) -> Store:
    """The store for one configured queue; imports its backend's modules on first use (the
    workers' side too: the master opens its stores before it drops privileges, and a worker it
    forks after may not be able to read msgd's files)."""
    module, name, _, _, workers_side = BACKENDS[policy.backend]
    factory: StoreFactory = getattr(importlib.import_module(module), name)
    if workers_side:
        importlib.import_module(workers_side)
    return factory(queue, policy, daemon)
