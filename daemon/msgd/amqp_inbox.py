"""A worker's side of a RabbitMQ queue (amqp.py has the layout, the store and the master's side).

Workers consume with manual acknowledgement, sent after the handler returned. A pika connection is
not thread-safe, so each inbox has one I/O thread that owns its connection and channel: it pumps
the connection (heartbeats go on while a handler runs for minutes), hands deliveries to the runner
threads, and performs their acknowledgements and publishes (`add_callback_threadsafe`, waiting
for the result). A continuous queue consumes with `basic_qos(prefetch or threads)`; a burst-mode
queue takes one message per claim with basic.get, whose "empty" is the broker's own word that the
queue is drained. A delivery tag belongs to its channel: after a reconnect, a message taken
before it is never acknowledged on the new channel; the broker redelivers it (a duplicate, which
at-least-once allows).

The attempt rule. Classic queues do not count deliveries; they only flag a message `redelivered`
when it comes back unacknowledged: its worker or daemon was killed, its connection was lost, or the
broker restarted while it was delivered. msgd charges that as a failed attempt: a worker that
receives a redelivered message does not run it, but settles it as a failure (error_type
"Redelivered") - retried after the queue's backoff, or a dead letter once out of attempts. So a
message that kills its workers ends in <amqp_queue>.failed after max_attempts deliveries, as on the
spool; the price is that the innocent ones delivered with it are charged too (at most the prefetch
of the worker that died, also when the master killed it for a timeout, a QUIT or a TERM past the
grace period; every unacknowledged message on a broker restart), and that a dead letter made so
says "Redelivered", not why the worker died. A worker that stops cleanly (drain, reload) gives back
the deliveries it had not begun uncharged: it cancels its consumer, publishes them again with the
same attempts and acknowledges the originals (_stop_consuming: at most a delivery per runner can
cross the cancel, which pika requeues, and is charged). These charges are not in the daemons'
retried/failed counters (no daemon saw that run end).
"""

from __future__ import annotations

import collections
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from msgd.amqp import (
    BROKER_ERRORS,
    SLOTS,
    AmqpStore,
    Delivery,
    connect,
    describe,
    expired_error,
    publish,
    safe_url,
    settle_failure,
)  # fmt: skip
from msgd.backend import BackendError, Expired, Outcome
from msgd.handlers import Message

T = TypeVar("T")
TICK = 0.1  # seconds the I/O thread pumps the connection between looks at its stop fd
WAIT = 0.5  # seconds a runner's wait lasts at most
BACKOFF = (0.1, 5.0)  # first and longest wait between attempts to reach the broker

REDELIVERED = {
    "error_type": "Redelivered",
    "error": "delivered before and never acknowledged: its worker or daemon died, its "
    "connection was lost, or the broker restarted",
}


class Gone(Exception):
    """The channel a delivery or a request belonged to is closed."""


class AmqpInbox:
    """A worker's view of one RabbitMQ queue; see the module docstring for the threads."""

    def __init__(self, store: AmqpStore, slot: int, stop_fd: int, log: Any) -> None:
        self.queue, self.policy, self.names = store.queue, store.policy, store.names
        self.url = store.url
        self.log = log.bind(queue=store.queue)
        self.bursty = store.policy.mode == "burst"
        self._held_cells, self._cell = store.held, slot % SLOTS
        self._stop_fd = stop_fd
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._ready: collections.deque[Delivery] = collections.deque()  # delivered, not claimed
        self._claimed: dict[str, Delivery] = {}
        self._counted = 0  # this worker's held count: ready + claimed + reserved basic.gets
        self._pending: set[Future[Any]] = set()  # runners' requests the I/O thread has not run
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._generation = 0
        self._consumer = ""
        self._stopping = self._down = self._broken = False
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._pump, name=f"amqp-{store.queue}", daemon=True)
        self._thread.start()

    # -- the runners' side -----------------------------------------------------------------------

    def claim(self) -> str | None:
        if self.bursty:
            return self._get()
        with self._lock:
            if not self._ready:
                return None
            return self._hold(self._ready.popleft())

    def wait(self) -> None:
        with self._arrived:
            self._arrived.wait_for(lambda: self._ready or self._stopping, WAIT)

    def read(self, handle: str, max_size: int) -> Message:
        delivery = self._claimed[handle]
        if delivery.expires_ms and delivery.expires_ms <= time.time() * 1000:
            raise Expired(expired_error(delivery.expires_ms))
        if max_size and len(delivery.body) > max_size:
            raise BackendError(f"message of {len(delivery.body)} bytes exceeds max_message_size")
        return Message(
            id=delivery.mid,
            queue=self.queue,
            body=delivery.body,
            attempt=delivery.attempts + 1,
            enqueued_at=delivery.enqueued_at(),
        )

    def label(self, handle: str) -> tuple[str, int]:
        delivery = self._claimed[handle]
        return delivery.mid, delivery.attempts + 1

    def done(self, handle: str) -> None:
        """Acknowledge; if its channel is gone, the broker will redeliver it (a duplicate)."""
        delivery = self._claimed[handle]
        try:
            self._on_channel(delivery, lambda channel: channel.basic_ack(delivery.tag))
        finally:
            self._release(handle)

    def fail(self, handle: str, error: dict[str, Any], permanent: bool) -> Outcome:
        """Retry through a delay queue or dead-letter; if the channel is gone, the broker's
        redelivery does it (and counts the attempt)."""
        delivery = self._claimed[handle]
        attempt = delivery.attempts + 1
        expected = (
            Outcome.FAILED if permanent or attempt >= self.policy.max_attempts else Outcome.RETRIED
        )

        def settle(channel: BlockingChannel) -> Outcome:
            return settle_failure(
                channel, self.names, self.policy, self.queue, delivery, attempt, error, permanent
            )

        try:
            outcome = self._on_channel(delivery, settle)
        finally:
            self._release(handle)
        return expected if outcome is None else outcome

    def burst(self) -> None:
        """Nothing: the broker keeps the retries' time (the master releases them in a burst)."""

    def close(self) -> None:
        """Give back what was delivered and not begun, then close the connection."""
        self._closing.set()
        self._thread.join()

    # -- handing work between the runners and the I/O thread -------------------------------------

    def _hold(self, delivery: Delivery) -> str:
        """Under the lock: a delivery becomes a runner's, under a handle of this channel."""
        handle = f"{delivery.generation}.{delivery.tag}"
        self._claimed[handle] = delivery
        return handle

    def _release(self, handle: str) -> None:
        with self._lock:
            del self._claimed[handle]
            self._count(-1)

    def _count(self, change: int) -> None:
        """Under the lock: this worker's held count, published for the master."""
        self._counted += change
        self._held_cells[self._cell] = self._counted

    def _get(self) -> str | None:
        """A burst-mode claim: one basic.get, counted as held before it is asked for. Through an
        outage it waits for the broker (or the stop fd): None must mean "drained"."""
        while True:
            with self._lock:
                self._count(1)
            try:
                delivery = self._call(self._basic_get)
                drained = delivery is None
            except Gone:
                delivery, drained = None, False
            with self._lock:
                if delivery is not None:
                    return self._hold(delivery)
                self._count(-1)
            if drained or select.select([self._stop_fd], [], [], WAIT)[0]:
                return None

    def _on_channel(
        self, delivery: Delivery, operation: Callable[[BlockingChannel], T]
    ) -> T | None:
        """Run `operation` in the I/O thread if `delivery`'s channel is still the open one."""
        if delivery.generation != self._generation:
            return None
        try:
            return self._call(lambda: self._same_channel(delivery, operation))
        except Gone:
            return None

    def _same_channel(self, delivery: Delivery, operation: Callable[[BlockingChannel], T]) -> T:
        if delivery.generation != self._generation or self._channel is None:
            raise Gone
        try:
            return operation(self._channel)
        except BROKER_ERRORS:
            self._broken = True  # a refused publish: the original must come back by redelivery
            raise

    def _call(self, operation: Callable[[], T]) -> T:
        """Run `operation` in the I/O thread and wait for its result; Gone if the connection is
        (or goes) down before it ran."""
        future: Future[T] = Future()
        with self._lock:
            connection = self._connection
            if connection is None:
                raise Gone
            self._pending.add(future)

        def run() -> None:
            with self._lock:
                self._pending.discard(future)
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(operation())
            except BaseException as e:
                future.set_exception(e)

        try:
            connection.add_callback_threadsafe(run)
        except BROKER_ERRORS:
            with self._lock:
                self._pending.discard(future)
            raise Gone from None
        try:
            return future.result()
        except BROKER_ERRORS:
            raise Gone from None

    # -- the I/O thread --------------------------------------------------------------------------

    def _pump(self) -> None:
        """Keep a connection, pump it, and hand deliveries over, until `close`."""
        backoff = BACKOFF[0]
        while not self._closing.is_set():
            if self._connection is None:
                try:
                    self._connect()
                    backoff = BACKOFF[0]
                except BROKER_ERRORS as e:
                    self._lost(e)
                    self._closing.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF[1])
                continue
            try:
                self._connection.process_data_events(time_limit=TICK)
                if self._broken:
                    raise BackendError("a settlement was refused; reconnecting")
                if not self._stopping and select.select([self._stop_fd], [], [], 0)[0]:
                    self._stop_consuming()
            except (*BROKER_ERRORS, BackendError) as e:
                self._lost(e)
        self._shut()

    def _connect(self) -> None:
        connection = connect(self.url)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            self.names.declare(channel)
            channel.basic_qos(prefetch_count=self.policy.prefetch or self.policy.threads)
        except BaseException:
            connection.close()
            raise
        with self._lock:
            self._generation += 1
            self._connection, self._channel = connection, channel
        if not self.bursty and not self._stopping:
            self._consumer = channel.basic_consume(self.names.main, self._deliver)
        if self._down:
            self._down = False
            self.log.info("amqp back", url=safe_url(self.url))

    def _deliver(self, channel: BlockingChannel, method: Any, properties: Any, body: bytes) -> None:
        """A consumer delivery, in the I/O thread: to the runners, unless it is a redelivery."""
        delivery = self._accept(method, properties, body)
        if delivery is not None:
            with self._arrived:
                self._ready.append(delivery)
                self._count(1)
                self._arrived.notify()

    def _basic_get(self) -> Delivery | None:
        """In the I/O thread: the next message for a burst-mode claim (None when drained)."""
        assert self._channel is not None
        while True:
            method, properties, body = self._channel.basic_get(self.names.main)
            if method is None:
                return None
            delivery = self._accept(method, properties, body)
            if delivery is not None:
                return delivery

    def _accept(self, method: Any, properties: Any, body: bytes) -> Delivery | None:
        """A delivery to work, or None for a redelivered one, which is charged an attempt and
        settled here (the module docstring's attempt rule)."""
        delivery = Delivery.of(self._generation, method, properties, body)
        if not method.redelivered:
            return delivery
        assert self._channel is not None
        attempt = delivery.attempts + 1
        outcome = settle_failure(
            self._channel,
            self.names,
            self.policy,
            self.queue,
            delivery,
            attempt,
            REDELIVERED,
            False,
        )
        self.log.warning(
            "message " + outcome.label,
            id=delivery.mid,
            attempt=attempt,
            error=f"{REDELIVERED['error_type']}: {REDELIVERED['error']}",
        )
        return None

    def _stop_consuming(self) -> None:
        """The worker is stopping: no more deliveries; those not begun go back uncharged.

        pika requeues a delivery that reaches a cancelled consumer, so it would come back
        flagged and be charged. So the channel's window shrinks to one first (global: that binds
        the consumer already there), then what arrived meanwhile is taken in, then the consumer
        is cancelled: the broker sends nothing more while we hold a delivery unacknowledged. A
        delivery that a last acknowledgement made room for may still cross (the queue learns
        of the window after the channel does): under load, ~1 in 4 reloads charged one, where
        every reload charged some before (tests/test_amqp.py, 300 messages, prefetch 20)."""
        with self._lock:
            self._stopping = True
            self._arrived.notify_all()
        if self._consumer and self._channel is not None and self._connection is not None:
            self._channel.basic_qos(prefetch_count=1, global_qos=True)
            self._connection.process_data_events(time_limit=0)
            self._channel.basic_cancel(self._consumer)
            self._consumer = ""
        self._give_back()

    def _give_back(self) -> None:
        """Publish the deliveries not begun again (same attempts) and acknowledge the originals,
        so that a clean stop charges nothing."""
        while self._channel is not None:
            with self._lock:
                if not self._ready:
                    return
                delivery = self._ready[0]
            publish(
                self._channel, self.names.main, delivery.mid, delivery.body, delivery.attempts,
                priority=delivery.priority, expires_ms=delivery.expires_ms, expiring=True,
            )  # fmt: skip
            self._channel.basic_ack(delivery.tag)
            with self._lock:
                self._ready.popleft()
                self._count(-1)

    def _lost(self, error: BaseException) -> None:
        """The connection failed: forget its deliveries (the broker has them back), fail the
        runners' requests, log the outage once."""
        connection = self._connection
        if connection is not None and connection.is_open:
            try:  # unacknowledged deliveries go back to the queue when it closes
                connection.close()
            except BROKER_ERRORS:
                pass
        with self._lock:
            self._connection = self._channel = None
            self._consumer = ""
            self._broken = False
            self._count(-len(self._ready))
            self._ready.clear()
            pending, self._pending = self._pending, set()
        for future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(Gone())
        if not self._down:
            self._down = True
            self.log.warning("amqp unavailable", url=safe_url(self.url), error=describe(error))

    def _shut(self) -> None:
        try:
            if self._connection is not None:
                if not self._stopping:
                    self._stop_consuming()
                self._connection.close()
        except BROKER_ERRORS:
            pass
        with self._lock:
            self._connection = self._channel = None
