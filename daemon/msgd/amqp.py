"""Queues kept by a RabbitMQ broker, reached through pika, so that several daemons share them.

    <amqp_queue>               the queue: classic, durable, x-max-priority 9, its expired messages
                               dead-lettered (exchange "") to <amqp_queue>.expired
    <amqp_queue>.delay.<ms>    one per backoff delay: x-message-ttl <ms>, dead-lettered back
                               (exchange "", routing key <amqp_queue>) when the time is up
    <amqp_queue>.at.<ms>       delayed sends, per delay (rounded up to 100 ms): like the above,
                               and deleted by the broker a minute after its last use
    <amqp_queue>.at-ttl.<ms>   delayed sends with a TTL: the same, dead-lettered to .due
    <amqp_queue>.due           delayed sends with a TTL that came due, until the master moves them
    <amqp_queue>.schedules     markers naming the .at(-ttl).<ms> queues that may hold messages
    <amqp_queue>.schedules.lock  exclusive to the connection counting the delayed sends
    <amqp_queue>.expired       messages the broker expired, until the master makes dead letters
    <amqp_queue>.failed        dead letters: the original body and properties, the error in headers

Every producer and worker declares these queues with exactly the same arguments (a publish to a
queue nobody declared would be dropped, and a declaration with other arguments is refused with
406: a queue declared by an msgd from before the expired route must be drained and deleted, or
the msgd queue given another amqp_queue; the error says so). Messages are published persistent,
with `mandatory` and publisher confirms: `send_many` returns ids only once the broker confirmed
every message. Each carries its msgd id as the AMQP message_id and the attempts done before it
in the header x-msgd-attempts (an integer).

Time: a send's priority is the AMQP priority (the queue's x-max-priority is 9): the broker hands
out the highest priority ready first, but a message already delivered to a consumer (up to its
prefetch) is not overtaken; a retry keeps its priority. A delayed send waits in the queue of its
delay, so it is not pulled forward by a burst. AMQP cannot list queues, so each delayed batch is
followed by a marker (its delay) in .schedules; a count (`depths`: the master once a second,
`msgctl queues`) takes the markers, one counter at a time (the lock), adds up the named queues'
messages, and puts back one marker per queue that still holds some (see `_scheduled`). A batch
whose producer died before its marker is not counted until the next send of that delay.

Expiry: a TTL rides in the header x-msgd-expires (epoch ms) and, published to the queue itself,
as the AMQP expiration (the milliseconds left). The broker never hands out an expired message; it
dead-letters it to .expired, which the master empties once a second (SWEEP_EVERY) into .failed
with the record a worker writes ("Expired"), counted failed and expired. The broker drops a
message's expiration when it dead-letters it, so a delayed send with a TTL waits in a queue of
its own (.at-ttl.<ms>) that hands it to .due, and the master publishes it from there into the
queue with its expiration within a tick (or makes it that dead letter if its TTL passed
meanwhile): like the spool's and Redis's delayed sends, it becomes due only while a daemon runs.
A worker that receives a message past its x-msgd-expires (it expired in the worker's prefetch)
makes it that dead letter itself. So a message is never started after its TTL, and it becomes a
dead letter within about a second of expiring on a queue nobody works, but for the head of the
queue: RabbitMQ expires messages from there only (with priorities too), so a message behind one
that expires later or never (sent before it at any priority, or after it at a higher one)
becomes a dead letter when a worker (a burst) has taken that one. A message requeued after its
TTL passed (its worker died holding it, even while its handler ran) is expired by the broker: an
Expired dead letter, not a Redelivered retry.

A worker's side is amqp_inbox.py (its threads, the attempt rule).

Retries go to the delay queue of their backoff (confirmed, then the original is acknowledged), so
no runner is held while a retry waits. RabbitMQ's dead-lettering out of a classic queue is not
confirmed: a broker crash at the instant a delay expires may lose that one retry (or, at the
instant a TTL passes, that expired message).

A dead letter keeps its body and message_id; the header x-msgd-error holds the error record as
JSON (id, queue, attempts, failed_at, error_type, error, traceback...). `retry_failed` publishes
dead letters back to the queue with no attempts counted and acknowledges them.

What the master sees without the management plugin: queue.declare's ready counts of the queue,
its delay queues, the delayed sends' queues (through .schedules) and .failed. `cur` (delivered,
not yet acknowledged) is what this daemon's workers hold, counted in shared memory set up before
the workers fork; other daemons' are not known. A burst is worked when the queue has no ready
message and this daemon's workers hold none, on two looks at least BURST_LOOK apart: exact for a
burst-mode queue (a worker counts a message before it asks the broker for it), and for a
continuous queue but for a delivery still on the wire at the instant of the check.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from msgd.backend import BackendError, BurstMark, Death, Depths, Inbox, Outcome, Settled
from msgd.spool import id_time, new_id
from msgd.when import NOW, SendOptions

if TYPE_CHECKING:
    from msgd.config import DaemonConfig, QueueConfig

T = TypeVar("T")
ATTEMPTS = "x-msgd-attempts"  # header: attempts done before this delivery
ERROR = "x-msgd-error"  # header of a dead letter: its error record, JSON
EXPIRES = "x-msgd-expires"  # header: epoch ms after which the message must not start (a TTL)
SCHEDULE_STEP = 100  # ms: delayed sends wait in queues of delays rounded up to this
SCHEDULE_KEEP = 60_000  # ms a delayed sends' queue outlives its delay unused, then is deleted
# Never change these: the broker refuses a queue declared again with other arguments (406). The
# type is explicit, so a vhost whose default queue type is quorum still gets a classic queue.
CLASSIC = {"x-queue-type": "classic"}
QUEUE_ARGUMENTS = {**CLASSIC, "x-max-priority": 9}  # and its expired messages' route (Names)
SWEEP_EVERY = 1.0  # seconds between the master's moves of expired messages to the dead letters
LOCK_WAIT = 5.0  # seconds a count of the delayed sends waits for another one to finish
CONNECT_TIMEOUT = 5.0  # seconds
BURST_LOOK = 0.2  # seconds between the two looks that find a burst worked
SLOTS = 1024  # cells of the per-slot held counts (worker slots are small numbers)
MAX_ERROR_TEXT = 8000  # characters of an error text and a traceback kept in a dead letter
BROKER_ERRORS = (pika.exceptions.AMQPError, OSError)
PERSISTENT = pika.BasicProperties(delivery_mode=2)
logging.getLogger("pika").setLevel(logging.CRITICAL)  # msgd logs an outage itself, once


def safe_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def describe(error: BaseException) -> str:
    """The error for a log or an error line; a queue declared with other arguments says why."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if isinstance(error, pika.exceptions.ChannelClosedByBroker) and error.reply_code == 406:
        text += (
            " (declared with other arguments, by another program or msgd version: drain and"
            " delete it, or give the queue another amqp_queue)"
        )
    return text


# -- the queues and their messages -----------------------------------------------------------------


class Names:
    """The broker queues of one msgd queue, each with the arguments every msgd declares it with."""

    def __init__(self, queue: str, policy: QueueConfig) -> None:
        self.main = policy.amqp_queue or f"msgd.{queue}"
        self.failed = f"{self.main}.failed"
        self.expired = f"{self.main}.expired"
        self.due = f"{self.main}.due"
        self.schedules = f"{self.main}.schedules"
        self.lock = f"{self.schedules}.lock"  # exclusive while one look counts the delayed sends
        self.delays = sorted({ms for ms in map(_ms, policy.backoff) if ms > 0})
        self.arguments: dict[str, dict[str, Any]] = {
            self.main: {
                **QUEUE_ARGUMENTS,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.expired,
            },
            self.failed: CLASSIC,
            self.expired: CLASSIC,
            self.due: CLASSIC,
            self.schedules: CLASSIC,
        }
        for ms in self.delays:
            self.arguments[self.delay(ms)] = self._returning(ms)

    def _returning(self, ms: int, to: str = "") -> dict[str, Any]:
        """A queue whose messages go on to `to` (the main one) `ms` after they arrived."""
        return {
            **CLASSIC,
            "x-message-ttl": ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": to or self.main,
        }

    def scheduled(self, ms: int, expiring: bool = False) -> str:
        """Where a delayed send waits `ms` (a multiple of SCHEDULE_STEP) before it joins the
        queue; one with a TTL (`expiring`) waits apart and joins .due, for the master to give it
        its AMQP expiration. The broker deletes such a queue once nobody declared it for
        SCHEDULE_KEEP past its delay, when every message in it has left (each send declares it
        again)."""
        return f"{self.main}.{'at-ttl' if expiring else 'at'}.{ms}"

    def of_marker(self, body: bytes) -> str | None:
        """The delayed sends' queue a marker in .schedules names (its name past the main
        one's: "at.<ms>" or "at-ttl.<ms>"), None if it names none."""
        family, _, ms = body.decode("ascii", "replace").partition(".")
        if family not in ("at", "at-ttl") or not ms.isdigit() or not 0 < int(ms) < 2**32:
            return None
        return f"{self.main}.{family}.{int(ms)}"

    def delay(self, ms: int) -> str:
        """Where a retry waits `ms` before it returns: the main queue itself for no delay."""
        return f"{self.main}.delay.{ms}" if ms > 0 else self.main

    def declare(self, channel: BlockingChannel) -> None:
        """Create what is missing."""
        for name in self.arguments:
            self.ready(channel, name)

    def ready(self, channel: BlockingChannel, name: str) -> int:
        """Messages waiting in one of these queues (declared again: never a 404, and a 406 if
        someone else's queue has the name)."""
        ok = channel.queue_declare(name, durable=True, arguments=self._arguments(name))
        return int(ok.method.message_count)

    def _arguments(self, name: str) -> dict[str, Any]:
        """A fixed queue's arguments, or those of the delayed sends' queue `name` names."""
        if name in self.arguments:
            return self.arguments[name]
        family, _, ms = name.removeprefix(f"{self.main}.").partition(".")
        to = self.due if family == "at-ttl" else self.main
        return {**self._returning(int(ms), to), "x-expires": int(ms) + SCHEDULE_KEEP}


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def publish(
    channel: BlockingChannel,
    routing_key: str,
    mid: str,
    body: bytes,
    attempts: int,
    error: str | None = None,
    *,
    priority: int = 0,
    expires_ms: int = 0,
    expiring: bool = False,
) -> None:
    """One persistent message, confirmed by the broker before this returns (the channel is in
    confirm mode); `mandatory`, so that a queue that does not exist is an error, not a loss.
    `priority`: the AMQP priority (0-9); `expires_ms`: when its TTL passes (header), and with
    `expiring` (a publish to the main queue) also the broker's: the AMQP expiration, the time
    left, after which the broker dead-letters the message to <amqp_queue>.expired."""
    headers: dict[str, Any] = {ATTEMPTS: attempts}
    if error is not None:
        headers[ERROR] = error
    if expires_ms:
        headers[EXPIRES] = expires_ms
    left = max(0, expires_ms - int(time.time() * 1000))
    properties = pika.BasicProperties(
        message_id=mid,
        delivery_mode=2,
        headers=headers,
        timestamp=int(time.time()),
        priority=priority or None,
        expiration=str(left) if expiring and expires_ms else None,
    )
    channel.basic_publish("", routing_key, body, properties, mandatory=True)


class Delivery(msgspec.Struct):
    """A message as the broker delivered it to one channel generation of an inbox."""

    generation: int
    tag: int
    mid: str
    attempts: int  # done before this delivery
    body: bytes
    timestamp: float
    priority: int = 0
    expires_ms: int = 0  # its TTL passes then (0: never)

    @classmethod
    def of(
        cls, generation: int, method: Any, properties: pika.BasicProperties, body: bytes
    ) -> Delivery:
        headers = properties.headers or {}
        return cls(
            generation,
            method.delivery_tag,
            properties.message_id or new_id(),
            _count(headers.get(ATTEMPTS)),
            body,
            float(properties.timestamp or time.time()),
            _count(properties.priority),
            _count(headers.get(EXPIRES)),
        )

    def enqueued_at(self) -> float:
        """msgd's ids carry the enqueue time; a foreign message has its timestamp."""
        when = id_time(self.mid)
        return self.timestamp if when is None else when


def _count(value: Any) -> int:
    """A non-negative integer from a header or property a foreign producer may have set badly."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def expired_error(expires_ms: int) -> str:
    """The error text of a message not started within its TTL (the worker's and the master's)."""
    return f"not started within its TTL (expired at {expires_ms} ms)"


def error_record(queue: str, mid: str, attempt: int, error: dict[str, Any]) -> str:
    """The JSON a dead letter carries in its x-msgd-error header (kept under a frame's size)."""
    record = {"id": mid, "queue": queue, "attempts": attempt, "failed_at": time.time(), **error}
    if isinstance(record.get("error"), str):
        record["error"] = record["error"][:MAX_ERROR_TEXT]
    if isinstance(record.get("traceback"), str):
        record["traceback"] = record["traceback"][-MAX_ERROR_TEXT:]
    return json.dumps(record, default=str)


def settle_failure(
    channel: BlockingChannel,
    names: Names,
    policy: QueueConfig,
    queue: str,
    delivery: Delivery,
    attempt: int,
    error: dict[str, Any],
    permanent: bool = False,
) -> Outcome:
    """Publish a failed delivery to its next home (a delay queue, or .failed), confirmed; then
    acknowledge the original. Returns RETRIED or FAILED."""
    if permanent or attempt >= policy.max_attempts:
        record = error_record(queue, delivery.mid, attempt, error)
        publish(channel, names.failed, delivery.mid, delivery.body, attempt, record)
        outcome = Outcome.FAILED
    else:
        ms = _ms(policy.delay(attempt))  # one of names.delays, or 0
        publish(
            channel, names.delay(ms), delivery.mid, delivery.body, attempt,
            priority=delivery.priority,
        )  # fmt: skip
        outcome = Outcome.RETRIED
    channel.basic_ack(delivery.tag)
    return outcome


# -- the held counts: what this daemon's workers hold, visible to its master -----------------------

_HELD: dict[str, Any] = {}


def held_counts(main: str) -> Any:
    """Per worker slot, how many messages of the queue `main` that worker holds unacknowledged.

    Shared memory made on first use in the master (which opens its stores before it forks the
    workers), so the workers' counts are the master's to read.
    """
    if main not in _HELD:
        _HELD[main] = multiprocessing.RawArray("q", SLOTS)
    return _HELD[main]


# -- the store: producers, msgctl and the master ---------------------------------------------------


class Link:
    """One connection and confirm-mode channel for the calls of a store, one call at a time."""

    def __init__(self, queue: str, url: str, names: Names) -> None:
        self.queue, self.url, self.names = queue, url, names
        self._lock = threading.Lock()
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._pid = 0

    def run(self, operation: Callable[[BlockingChannel], T]) -> T:
        """Run `operation` on the channel; any broker error is a BackendError naming the URL.

        A connection left idle may have been dropped by the broker meanwhile (nobody pumped its
        heartbeats): a failure on a reused connection is tried once more on a new one.
        """
        with self._lock:
            if self._channel is not None:
                try:
                    return operation(self._open())
                except BROKER_ERRORS:
                    self._drop()
            try:
                return operation(self._open())
            except BROKER_ERRORS as e:
                self._drop()
                raise BackendError(f"{self.queue}: {safe_url(self.url)}: {describe(e)}") from None

    def _open(self) -> BlockingChannel:
        if self._pid != os.getpid():  # a forked copy: the parent's socket is not ours to use
            self._connection = self._channel = None
        if self._channel is None or not self._channel.is_open:
            self._drop()
            self._connection = connect(self.url)
            self._pid = os.getpid()
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            self.names.declare(self._channel)
        return self._channel

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and self._pid == os.getpid() and connection.is_open:
            try:
                connection.close()
            except BROKER_ERRORS:
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()


def connect(url: str) -> pika.BlockingConnection:
    parameters = pika.URLParameters(url)
    parameters.socket_timeout = CONNECT_TIMEOUT
    parameters.stack_timeout = CONNECT_TIMEOUT * 2
    parameters.blocked_connection_timeout = 60.0
    parameters.connection_attempts = 1
    return pika.BlockingConnection(parameters)


class EmptySince(msgspec.Struct):
    """A burst mark's state: when the queue and this daemon's hands were first seen empty."""

    at: float | None = None


class AmqpStore:
    """One RabbitMQ queue: produce, inspect, revive dead letters; `inbox` for a worker."""

    local = False

    def __init__(self, queue: str, policy: QueueConfig, daemon: DaemonConfig) -> None:
        self.queue, self.policy = queue, policy
        self.url = policy.url
        self.names = Names(queue, policy)
        self.link = Link(queue, self.url, self.names)
        self.held = held_counts(self.names.main)
        self._next_sweep = 0.0  # time.monotonic() of the next move of expired messages
        self._resume = 0.0  # time.monotonic() before which release_due rests after a failure

    def send_many(self, bodies: Sequence[bytes], options: SendOptions = NOW) -> list[str]:
        """Publish to the queue, with the AMQP priority and the TTL's expiration; a delayed
        batch to the queue of its delay (rounded up to SCHEDULE_STEP), whence the broker moves
        it at its time, and then a marker naming that queue to <amqp_queue>.schedules (where
        `depths` finds the delayed sends' queues to count)."""
        ids = [new_id() for _ in bodies]
        delay = 0
        if options.due:
            steps = math.ceil((options.due - time.time()) * 1000 / SCHEDULE_STEP)
            delay = max(1, steps) * SCHEDULE_STEP
        into = self.names.scheduled(delay, options.expires > 0) if delay else self.names.main
        expires = int(options.expires * 1000)

        def send(channel: BlockingChannel) -> None:
            self.names.ready(channel, into)  # a delayed sends' queue may have been deleted
            for mid, body in zip(ids, bodies, strict=True):
                publish(
                    channel, into, mid, body, 0,
                    priority=options.priority, expires_ms=expires, expiring=not delay,
                )  # fmt: skip
            if delay:
                self._mark(channel, into)

        if ids:
            self.link.run(send)
        return ids

    def check(self) -> None:
        """Nothing on the network: a daemon starts while its broker is down (its spool queues
        work meanwhile), and the workers log the outage. The names must fit AMQP's 255 bytes,
        and "amq." names are the broker's own."""
        if max(len(name.encode()) for name in (*self.names.arguments, self.names.lock)) > 255:
            raise BackendError(f"{self.queue}: amqp_queue {self.names.main!r} is too long")
        if self.names.main.startswith("amq."):
            raise BackendError(f"{self.queue}: amqp_queue {self.names.main!r}: amq. is reserved")

    def depths(self) -> Depths:
        names = self.names

        def look(channel: BlockingChannel) -> tuple[int, int, int, int]:
            ready = names.ready(channel, names.main)
            deferred = sum(names.ready(channel, names.delay(ms)) for ms in names.delays)
            scheduled = self._scheduled(channel) + names.ready(channel, names.due)
            return ready, deferred, scheduled, names.ready(channel, names.failed)

        ready, deferred, scheduled, failed = self.link.run(look)
        return Depths(
            new=ready,
            cur=sum(self.held),
            defer=deferred,
            scheduled=scheduled,
            failed=failed,
            detail=f"amqp queue {names.main}; cur: held by this daemon's workers (0 in msgctl)",
        )

    def _scheduled(self, channel: BlockingChannel) -> int:
        """The delayed sends waiting, in the queues the markers in <amqp_queue>.schedules name.

        AMQP cannot list queues, nor read a queue without taking its messages, so one look at a
        time (an exclusive queue is the lock; the broker drops it with a dead looker's
        connection) takes every marker, publishes one back (confirmed: in the queue before the
        next look counts it, which a requeue does not promise) per queue that still holds
        messages, and only then acknowledges those it took (a looker that dies in between
        leaves duplicates, not gaps).
        Markers of emptied queues are dropped: counting a queue renews its lease (x-expires),
        and an emptied one must be left to expire. A send's marker follows its messages."""
        side = self._locked(channel)
        try:
            waiting: dict[str, int] = {}
            taken = self._take(side, self.names.schedules)
            for _, _, body in taken:
                name = self.names.of_marker(body)
                if name is not None and name not in waiting:
                    waiting[name] = self.names.ready(side, name)
            for name in (name for name, count in waiting.items() if count):
                self._mark(channel, name)
            if taken:
                side.basic_ack(multiple=True)  # every marker taken
            side.queue_delete(self.names.lock)
        finally:
            if side.is_open:
                side.close()
        return sum(waiting.values())

    def _mark(self, channel: BlockingChannel, name: str) -> None:
        """A marker in .schedules naming the delayed sends' queue `name` (confirmed)."""
        marker = name.removeprefix(f"{self.names.main}.").encode()
        channel.basic_publish("", self.names.schedules, marker, PERSISTENT, mandatory=True)

    def _locked(self, channel: BlockingChannel) -> BlockingChannel:
        """A channel of this connection that holds the exclusive <amqp_queue>.schedules.lock,
        once no other connection holds it (each refusal closes a channel: a new one per try)."""
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            side = channel.connection.channel()
            try:
                side.queue_declare(self.names.lock, exclusive=True, auto_delete=True)
                return side
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code != 405 or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)

    def release_due(self, force: bool) -> int:
        """The broker keeps the retries' and delayed sends' time; a burst (`force`) moves the
        retries back now (not the delayed sends). The periodic call: the delayed sends with a
        TTL that came due join the queue, and once a second the messages the broker expired
        become dead letters; returns how many dead letters it made. After a failure it rests a
        second (the master calls it every tick; reconnecting that often helps nobody)."""
        if force:
            self.link.run(self._release_all)
            return 0
        now = time.monotonic()
        if now < self._resume:
            return 0
        sweep = now >= self._next_sweep
        if sweep:
            self._next_sweep = now + SWEEP_EVERY

        def release(channel: BlockingChannel) -> int:
            return self._join(channel) + (self._expire(channel) if sweep else 0)

        try:
            return self.link.run(release)
        except BackendError:
            self._resume = now + SWEEP_EVERY
            raise

    def _join(self, channel: BlockingChannel) -> int:
        """The delayed sends with a TTL in .due into the queue, with the AMQP expiration (the
        broker drops it from a message it dead-letters, here out of its delay queue); one past
        its TTL already becomes a dead letter. Returns how many did."""
        expired = 0
        for method, properties, body in self._take(channel, self.names.due):
            delivery = Delivery.of(0, method, properties, body)
            if 0 < delivery.expires_ms <= time.time() * 1000:
                self._dead_letter_expired(channel, delivery)
                expired += 1
            else:
                publish(
                    channel, self.names.main, delivery.mid, body, delivery.attempts,
                    priority=delivery.priority, expires_ms=delivery.expires_ms, expiring=True,
                )  # fmt: skip
            channel.basic_ack(method.delivery_tag)
        return expired

    def _expire(self, channel: BlockingChannel) -> int:
        """Dead letters of the messages the broker expired into .expired."""
        taken = self._take(channel, self.names.expired)
        for method, properties, body in taken:
            self._dead_letter_expired(channel, Delivery.of(0, method, properties, body))
            channel.basic_ack(method.delivery_tag)
        return len(taken)

    def _dead_letter_expired(self, channel: BlockingChannel, delivery: Delivery) -> None:
        """To .failed (confirmed), with the error record a worker writes for a message it
        receives past its TTL."""
        attempt = delivery.attempts + 1
        error = {"error_type": "Expired", "error": expired_error(delivery.expires_ms)}
        record = error_record(self.queue, delivery.mid, attempt, error)
        publish(channel, self.names.failed, delivery.mid, delivery.body, attempt, record)

    def _release_all(self, channel: BlockingChannel) -> None:
        for ms in self.names.delays:
            for method, properties, body in self._take(channel, self.names.delay(ms)):
                delivery = Delivery.of(0, method, properties, body)
                publish(
                    channel, self.names.main, delivery.mid, body, delivery.attempts,
                    priority=delivery.priority,
                )  # fmt: skip
                channel.basic_ack(method.delivery_tag)

    def _take(self, channel: BlockingChannel, name: str) -> list[tuple[Any, Any, bytes]]:
        """The messages in one of the queues when asked (not those that arrive meanwhile, which
        may be the ones being moved coming back), unacknowledged."""
        taken = []
        for _ in range(self.names.ready(channel, name)):
            method, properties, body = channel.basic_get(name)
            if method is None:
                break
            taken.append((method, properties, body))
        return taken

    def burst_mark(self) -> BurstMark:
        """The messages ready in the queue and held by this daemon's workers at the signal."""
        ready = self.link.run(lambda channel: self.names.ready(channel, self.names.main))
        return BurstMark(pending=ready + sum(self.held), state=EmptySince())

    def burst_worked(self, mark: BurstMark) -> bool:
        """Whether the queue has no ready message and this daemon's workers hold none, on two
        looks BURST_LOOK apart (the ready count is read before the held counts: a worker counts
        a message before it takes it). False while the broker cannot be asked."""
        empty: EmptySince = mark.state
        try:
            ready = self.link.run(lambda channel: self.names.ready(channel, self.names.main))
        except BackendError:
            return False
        now = time.monotonic()
        if ready or sum(self.held):
            empty.at = None
        elif empty.at is None:
            empty.at = now
        return empty.at is not None and now - empty.at >= BURST_LOOK

    def retry_failed(self, ids: Sequence[str] | None) -> list[str]:
        """Dead letters back to the queue, attempts 0. All-or-nothing: if an id asked for is
        not a dead letter, nothing moves and the error names it."""
        return self.link.run(lambda channel: self._revive(channel, ids))

    def _revive(self, channel: BlockingChannel, ids: Sequence[str] | None) -> list[str]:
        """Move the chosen dead letters of those there at the start (a revived one that fails
        again at once is a new dead letter, not moved twice); the others go back to .failed, in
        order, by a confirmed publish (a requeue would return them only some time later)."""
        wanted = set(ids) if ids else None
        taken = self._take(channel, self.names.failed)
        chosen = {m.delivery_tag for m, p, _ in taken if wanted is None or p.message_id in wanted}
        missing = (wanted or set()) - {
            p.message_id for m, p, _ in taken if m.delivery_tag in chosen
        }
        moved = []
        for method, properties, body in taken:
            if method.delivery_tag in chosen and not missing:
                publish(channel, self.names.main, properties.message_id or new_id(), body, 0)
                moved.append(properties.message_id)
            else:
                channel.basic_publish("", self.names.failed, body, properties, mandatory=True)
            channel.basic_ack(method.delivery_tag)
        if missing:
            raise BackendError(f"{self.queue}: no failed message {sorted(missing)[0]}")
        return moved

    def recover(self) -> Settled:
        """Nothing: the broker gave a previous master's unacknowledged messages back itself."""
        return Settled()

    def settle(self, death: Death) -> Settled:
        """Nothing on the network: the broker redelivers what the dead worker held when its
        connection closes (and the next worker charges it, see the module's attempt rule). The
        slot's held count is cleared, and the runs it had begun to settle are counted: their
        acknowledgement or retry was sent or will be redone, so the outcome stands."""
        self.held[death.slot % SLOTS] = 0
        return Settled(uncounted=[outcome for _, outcome in death.intended])

    def inbox(self, slot: int, stop_fd: int, log: Any) -> Inbox:
        from msgd.amqp_inbox import AmqpInbox

        return AmqpInbox(self, slot, stop_fd, log)

    def close(self) -> None:
        self.link.close()
