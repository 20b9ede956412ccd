"""RabbitMQ queues through pika, against a real broker (tests/rabbitkit.py, one per session).

First the store and inbox in this process (what msgd.amqp promises the master and the workers),
then real daemons. Each test has its own queue names, so the session's broker is shared.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from conftest import Msgd, alive, wait_for
from faultkit import report
from msgd.backend import BackendError, Death, Outcome
from msgd.config import DaemonConfig, QueueConfig

pytestmark = pytest.mark.xdist_group("rabbit")  # one worker: see pyproject's addopts

pika = pytest.importorskip("pika", reason="pika missing (pip install -e '.[amqp]')")
amqp = pytest.importorskip("msgd.amqp")

LOG = structlog.get_logger()


def policy(rabbit: Any, **overrides: Any) -> QueueConfig:
    settings: dict[str, Any] = {
        "handler": "handlers:record",
        "backend": "amqp",
        "url": rabbit.url,
        "amqp_queue": f"t.{uuid.uuid4().hex[:12]}",
        "backoff": [0.2],
        **overrides,
    }
    return msgspec.convert(settings, QueueConfig)


@pytest.fixture
def opened() -> Iterator[list[Any]]:
    """Stores and inboxes a test opens, closed at its end."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.close()


class Opener:
    def __init__(self, rabbit: Any, opened: list[Any]) -> None:
        self.rabbit, self.opened = rabbit, opened
        self.stops: dict[int, int] = {}  # id of an inbox -> the write end of its stop pipe

    def store(self, p: QueueConfig, queue: str = "jobs") -> Any:
        store = amqp.AmqpStore(queue, p, DaemonConfig())
        self.opened.append(store)
        return store

    def inbox(self, store: Any, slot: int = 0) -> Any:
        stop_r, stop_w = os.pipe()
        inbox = store.inbox(slot, stop_r, LOG)
        self.stops[id(inbox)] = stop_w
        self.opened.append(inbox)
        return inbox

    def close(self, inbox: Any) -> None:
        """As a worker stops: the stop fd turns readable, the runners stop, then close."""
        os.write(self.stops[id(inbox)], b"x")
        inbox.close()
        self.opened.remove(inbox)


@pytest.fixture
def op(rabbit: Any, opened: list[Any]) -> Opener:
    return Opener(rabbit, opened)


def peek(rabbit: Any, queue: str) -> list[tuple[Any, Any, bytes]]:
    """Every message in a broker queue, looked at and given back (an outside observer)."""
    connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    channel = connection.channel()
    seen = []
    while True:
        method, properties, body = channel.basic_get(queue)
        if method is None:
            break
        seen.append((method, properties, body))
    connection.close()  # unacknowledged: back in the queue, some time later
    wait_for(lambda: ready(rabbit, queue) == len(seen), 10, "the peeked messages back")
    return seen


def ready(rabbit: Any, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    count = connection.channel().queue_declare(queue, passive=True).method.message_count
    connection.close()
    return int(count)


def claim(inbox: Any, timeout: float = 10.0) -> str:
    def one() -> str | None:
        handle = inbox.claim()
        if handle is None:
            inbox.wait()
        return handle

    return wait_for(one, timeout, "a delivery")


# -- the store and inbox in this process ---------------------------------------------------------


def test_send_many_publishes_durable_messages_with_their_ids(rabbit: Any, op: Opener) -> None:
    p = policy(rabbit)
    store = op.store(p)
    ids = store.send_many([b"one", b"two", b"three"])
    assert len(set(ids)) == 3
    assert store.depths().new == 3
    seen = peek(rabbit, p.amqp_queue)
    assert [m[2] for m in seen] == [b"one", b"two", b"three"]
    assert [m[1].message_id for m in seen] == ids
    assert all(m[1].delivery_mode == 2 and m[1].headers == {amqp.ATTEMPTS: 0} for m in seen)


def test_inbox_works_a_message_and_acknowledges_it(rabbit: Any, op: Opener) -> None:
    store = op.store(policy(rabbit))
    inbox = op.inbox(store)
    [mid] = store.send_many([b"hello"])
    handle = claim(inbox)
    message = inbox.read(handle, 0)
    assert (message.id, message.body, message.attempt, message.queue) == (mid, b"hello", 1, "jobs")
    assert inbox.label(handle) == (mid, 1)
    with pytest.raises(BackendError, match="exceeds max_message_size"):
        inbox.read(handle, 4)
    assert store.depths().cur == 1  # this daemon holds it
    inbox.done(handle)
    depths = store.depths()
    assert (depths.new, depths.cur, depths.defer, depths.failed) == (0, 0, 0, 0)


def test_a_failure_waits_in_its_delay_queue_and_comes_back(rabbit: Any, op: Opener) -> None:
    p = policy(rabbit, backoff=[0.3], max_attempts=3)
    store = op.store(p)
    inbox = op.inbox(store)
    [mid] = store.send_many([b"flaky"])
    handle = claim(inbox)
    assert inbox.fail(handle, {"error_type": "E", "error": "boom"}, False) == Outcome.RETRIED
    assert store.depths().defer == 1
    again = claim(inbox)
    assert inbox.label(again) == (mid, 2)
    assert store.depths().defer == 0
    inbox.done(again)


def test_out_of_attempts_is_a_dead_letter_with_its_record(rabbit: Any, op: Opener) -> None:
    p = policy(rabbit, max_attempts=1)
    store = op.store(p)
    inbox = op.inbox(store)
    [mid] = store.send_many([b"doomed"])
    handle = claim(inbox)
    error = {"error_type": "ValueError", "error": "bad", "traceback": "Traceback..."}
    assert inbox.fail(handle, error, False) == Outcome.FAILED
    assert store.depths().failed == 1
    [(_, properties, body)] = peek(rabbit, f"{p.amqp_queue}.failed")
    record = json.loads(properties.headers[amqp.ERROR])
    assert body == b"doomed" and properties.message_id == mid
    assert record["id"] == mid and record["attempts"] == 1 and record["error"] == "bad"
    assert record["error_type"] == "ValueError" and record["queue"] == "jobs"


def test_a_reject_is_a_dead_letter_at_once(rabbit: Any, op: Opener) -> None:
    store = op.store(policy(rabbit, max_attempts=5))
    inbox = op.inbox(store)
    store.send_many([b"no"])
    assert inbox.fail(claim(inbox), {"error_type": "Reject"}, True) == Outcome.FAILED
    assert store.depths().failed == 1


def test_retry_failed_brings_dead_letters_back_with_no_attempts(rabbit: Any, op: Opener) -> None:
    p = policy(rabbit, max_attempts=2, backoff=[0.05])
    store = op.store(p)
    inbox = op.inbox(store)
    ids = store.send_many([b"a", b"b", b"c"])
    for _ in range(6):  # three messages, two failed attempts each
        inbox.fail(claim(inbox), {"error": "x"}, False)
    wait_for(lambda: store.depths().failed == 3, 10, "three dead letters")
    with pytest.raises(BackendError, match="no failed message nope"):
        store.retry_failed([ids[0], "nope"])
    assert store.depths().failed == 3  # all or nothing
    assert [m[1].message_id for m in peek(rabbit, f"{p.amqp_queue}.failed")] == ids  # in order
    assert store.retry_failed([ids[1]]) == [ids[1]]
    handle = claim(inbox)
    assert inbox.label(handle) == (ids[1], 1)
    inbox.done(handle)
    assert sorted(store.retry_failed(None)) == sorted([ids[0], ids[2]])
    assert store.depths().failed == 0


def test_burst_mark_is_worked_once_queue_and_hands_are_empty(
    rabbit: Any, op: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(amqp, "BURST_LOOK", 0.0)  # one look decides
    store = op.store(policy(rabbit, mode="burst"))
    inbox = op.inbox(store)
    store.send_many([b"1", b"2"])
    mark = store.burst_mark()
    assert mark.pending == 2
    assert not store.burst_worked(mark)
    first = wait_for(inbox.claim, 10, "a basic.get")
    second = wait_for(inbox.claim, 10, "a basic.get")
    assert inbox.claim() is None  # the broker says: drained
    inbox.done(first)
    assert not store.burst_worked(mark)  # one still in hand (the queue itself is empty)
    inbox.done(second)
    assert store.burst_worked(mark)


def test_a_burst_releases_the_delayed_retries(rabbit: Any, op: Opener) -> None:
    store = op.store(policy(rabbit, backoff=[300.0]))
    inbox = op.inbox(store)
    [mid] = store.send_many([b"later"])
    inbox.fail(claim(inbox), {"error": "x"}, False)
    assert store.depths().defer == 1
    store.release_due(False)  # the broker keeps time: nothing due yet
    assert store.depths().defer == 1
    store.release_due(True)
    assert store.depths().defer == 0
    assert inbox.label(claim(inbox)) == (mid, 2)


def test_a_killed_consumer_charges_an_attempt(rabbit: Any, op: Opener) -> None:
    """A process takes the message and is killed with -9: the broker redelivers it, and the
    next worker settles it as a failed attempt instead of running it."""
    p = policy(rabbit, backoff=[0.2], max_attempts=2)
    store = op.store(p)
    [mid] = store.send_many([b"poison"])
    for attempt in (1, 2):
        taker = take_and_hang(rabbit, p.amqp_queue)
        taker.send_signal(signal.SIGKILL)
        taker.wait()
        if attempt == 1:  # charged: waits in the delay queue, then back with one attempt done
            inbox = op.inbox(store)
            wait_for(lambda: store.depths().defer == 1, 10, "the charged retry")
            op.close(inbox)
            wait_for(lambda: store.depths().new == 1, 10, "the retry back in the queue")
    inbox = op.inbox(store)
    wait_for(lambda: store.depths().failed == 1, 10, "a dead letter")
    [(_, properties, _)] = peek(rabbit, f"{p.amqp_queue}.failed")
    record = json.loads(properties.headers[amqp.ERROR])
    assert (record["id"], record["attempts"], record["error_type"]) == (mid, 2, "Redelivered")


def take_and_hang(rabbit: Any, queue: str) -> subprocess.Popen[str]:
    """A process that takes one message without acknowledging it, then waits to be killed."""
    script = (
        "import pika, sys\n"
        f"c = pika.BlockingConnection(pika.URLParameters({rabbit.url!r}))\n"
        f"m, p, b = c.channel().basic_get({queue!r})\n"
        "print(p.headers, flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip()  # it holds the message now
    return proc


def test_a_clean_stop_gives_back_what_was_not_begun(rabbit: Any, op: Opener) -> None:
    p = policy(rabbit, prefetch=4)
    store = op.store(p)
    first = op.inbox(store, slot=1)
    ids = store.send_many([b"%d" % i for i in range(6)])
    wait_for(lambda: store.depths().cur == 4, 10, "the prefetch")
    assert store.depths().new == 2  # basic_qos: no more than the prefetch in hand
    op.close(first)
    assert store.depths().cur == 0 and store.depths().new == 6
    second = op.inbox(store, slot=2)
    taken = []
    for _ in ids:
        handle = claim(second)
        taken.append(second.label(handle))
        second.done(handle)
    assert sorted(taken) == sorted((mid, 1) for mid in ids)  # uncharged


def test_settle_clears_the_dead_slot_and_counts_its_intended(rabbit: Any, op: Opener) -> None:
    store = op.store(policy(rabbit))
    store.held[3] = 2
    death = Death(slot=3, charged=True, intended=[(123, Outcome.SUCCEEDED)])
    assert store.settle(death).uncounted == [Outcome.SUCCEEDED]
    assert sum(store.held) == 0


def test_a_queue_declared_otherwise_is_a_clear_error(rabbit: Any, op: Opener) -> None:
    p = policy(rabbit)
    connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    connection.channel().queue_declare(p.amqp_queue, durable=True)  # none of msgd's arguments
    connection.close()
    with pytest.raises(BackendError, match=r"PRECONDITION_FAILED - inequivalent arg"):
        op.store(p).send_many([b"x"])


def test_a_publish_to_a_deleted_queue_is_refused_not_lost(rabbit: Any, op: Opener) -> None:
    """`mandatory`: the broker would confirm a message it routed nowhere. Refused, the store
    declares the queue again on a new channel and publishes there."""
    p = policy(rabbit)
    store = op.store(p)
    store.send_many([b"first"])  # the store's channel has declared the queue
    connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    connection.channel().queue_delete(p.amqp_queue)
    connection.close()
    [mid] = store.send_many([b"lost?"])
    [(_, properties, body)] = peek(rabbit, p.amqp_queue)
    assert (properties.message_id, body) == (mid, b"lost?")


def test_broker_outage_is_logged_once_and_work_carries_on(rabbit: Any, op: Opener) -> None:
    p = policy(rabbit)
    store = op.store(p)
    with structlog.testing.capture_logs() as logs:
        inbox = op.inbox(store)
        store.send_many([b"before"])
        inbox.done(claim(inbox))
        rabbit.stop_app()
        try:
            with pytest.raises(BackendError) as raised:
                store.send_many([b"during"])
            assert ":guest@" not in str(raised.value) and "127.0.0.1" in str(raised.value)
            wait_for(lambda: any(e["event"] == "amqp unavailable" for e in logs), 10, "log")
        finally:
            rabbit.start_app()
        [mid] = store.send_many([b"after"])
        handle = claim(inbox, 30)
        assert inbox.label(handle) == (mid, 1)
        inbox.done(handle)
    events = [e["event"] for e in logs]
    assert events.count("amqp unavailable") == 1 and events.count("amqp back") == 1


def test_heartbeats_go_on_while_a_handler_runs(rabbit: Any, op: Opener) -> None:
    """A broker that hears nothing for two heartbeats (1 s here) drops the connection, and the
    message would be redelivered; the I/O thread keeps talking while the runner works."""
    store = op.store(policy(rabbit, url=rabbit.url + "?heartbeat=1"))
    with structlog.testing.capture_logs() as logs:
        inbox = op.inbox(store)
        store.send_many([b"slow"])
        handle = claim(inbox)
        time.sleep(4)  # the handler's work: four heartbeat intervals
        inbox.done(handle)
    assert store.depths().new == 0 and store.depths().cur == 0
    assert [e for e in logs if e["event"] == "amqp unavailable"] == []


def test_check_refuses_names_the_broker_would(rabbit: Any, op: Opener) -> None:
    op.store(policy(rabbit)).check()  # nothing on the network: fine even with the broker down
    with pytest.raises(BackendError, match=r"amq\. is reserved"):
        op.store(policy(rabbit, amqp_queue="amq.jobs")).check()
    with pytest.raises(BackendError, match="too long"):
        op.store(policy(rabbit, amqp_queue="q" * 250)).check()


# -- real daemons ---------------------------------------------------------------------------------


def on_amqp(d: Msgd, rabbit: Any, **queue: Any) -> str:
    """Give `d` an AMQP queue "jobs" (the spool queue "default" stays); returns its broker name."""
    name = queue.pop("amqp_queue", None) or f"t.{uuid.uuid4().hex[:12]}"
    d.queues["jobs"] = {
        "handler": "handlers:record",
        "backend": "amqp",
        "url": rabbit.url,
        "amqp_queue": name,
        "timeout": 5.0,
        "backoff": [0.2],
        **queue,
    }
    d.write_config()
    return name


def dead_letters(rabbit: Any, name: str) -> dict[str, dict[str, Any]]:
    """The error records of a queue's dead letters, by id."""
    letters = peek(rabbit, f"{name}.failed")
    return {p.message_id: json.loads(p.headers[amqp.ERROR]) for _, p, _ in letters}


@pytest.fixture
def other(tmp_path: Path) -> Iterator[Msgd]:
    """A second daemon, beside `daemon` (which lives in tmp_path itself)."""
    (tmp_path / "other").mkdir()
    d = Msgd(tmp_path / "other")
    yield d
    d.cleanup()


def test_an_amqp_queue_end_to_end(daemon: Msgd, rabbit: Any) -> None:
    """Sends (msgd.send_many, msgctl send), retries, dead letters, stats, msgctl queues and
    retry-failed on a RabbitMQ queue worked by a real daemon."""
    name = on_amqp(daemon, rabbit, handler="handlers:by_body", max_attempts=2, threads=2)
    daemon.start()
    bodies = [b"ok", b"fail", b"reject", b"fail-once"]
    ids = dict(zip(bodies, daemon.send_many(bodies, "jobs"), strict=True))
    sent = daemon.msgctl("send", "-q", "jobs", input=b"ok")
    assert sent.returncode == 0, sent.stderr
    ids[b"ctl"] = sent.stdout.strip()
    wait_for(lambda: ready(rabbit, f"{name}.failed") == 2, 15, "two dead letters")
    letters = dead_letters(rabbit, name)
    assert letters[ids[b"reject"]]["error_type"] == "Reject"
    assert letters[ids[b"reject"]]["attempts"] == 1
    assert letters[ids[b"fail"]]["error"] == "failing attempt 2"
    assert letters[ids[b"fail"]]["attempts"] == 2
    assert "Traceback" in letters[ids[b"fail"]]["traceback"]
    ok = {ids[b"ok"], ids[b"fail-once"], ids[b"ctl"]}
    wait_for(lambda: ok <= set(daemon.succeeded()), 10, "the successes")
    assert f"{ids[b'fail-once']} 2" in (daemon.out / "started").read_text().split("\n")

    def counted() -> dict[str, Any] | None:
        daemon.msgctl("stats")
        q = daemon.stats().get("queues", {}).get("jobs", {})
        return q if q.get("succeeded") == 3 and q.get("depth", {}).get("failed") == 2 else None

    q = wait_for(counted, 15, "the stats to count the queue")
    assert (q["failed"], q["retried"], q["rejected"]) == (2, 2, 1)
    listing = daemon.msgctl("queues")
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if x.startswith("jobs "))
    assert line.split()[1:5] == ["0", "0", "0", "2"], line  # new, cur, defer, failed
    revived = daemon.msgctl("retry-failed", "jobs", ids[b"fail"])
    assert revived.returncode == 0 and revived.stdout.startswith("1 message"), revived
    runs = lambda: (daemon.out / "started").read_text().split("\n")  # noqa: E731
    wait_for(lambda: runs().count(f"{ids[b'fail']} 1") == 2, 10, "a fresh first attempt")
    missing = daemon.msgctl("retry-failed", "jobs", "nosuchid")
    assert missing.returncode == 1 and "no failed message nosuchid" in missing.stderr
    assert daemon.stop() == 0


def test_burst_mode_amqp_queue_waits_for_the_burst(daemon: Msgd, rabbit: Any) -> None:
    name = on_amqp(daemon, rabbit, handler="handlers:by_body", mode="burst", threads=2)
    daemon.start()
    night = daemon.send_many([b"ok"] * 36 + [b"sleep:1"] * 4, "jobs")  # the last ones in hand
    marker = daemon.send(b"day", "default")
    wait_for(lambda: marker in daemon.succeeded(), 10, "the continuous queue to work")
    assert ready(rabbit, name) == 40  # not taken before the burst
    done = daemon.msgctl("burst", "--wait")
    assert done.returncode == 0, done.stderr
    assert set(night) <= set(daemon.succeeded())  # all worked when --wait returned
    assert done.stdout.strip() == "burst done: 40 succeeded, 0 retried, 0 failed"
    assert daemon.stop() == 0


def test_timeouts_and_deaths_count_as_attempts(daemon: Msgd, rabbit: Any) -> None:
    """A handler past its timeout gets its worker killed; the broker redelivers the message,
    and that counts as an attempt, so it ends as a dead letter after max_attempts."""
    name = on_amqp(daemon, rabbit, handler="handlers:by_body", timeout=0.5, max_attempts=2)
    daemon.start()
    hang, abort = daemon.send_many([b"hang", b"abort"], "jobs")
    wait_for(lambda: ready(rabbit, f"{name}.failed") == 2, 30, "both dead letters")
    letters = dead_letters(rabbit, name)
    assert {letters[i]["error_type"] for i in (hang, abort)} == {"Redelivered"}
    assert {letters[i]["attempts"] for i in (hang, abort)} == {2}
    started = (daemon.out / "started").read_text().split("\n")
    assert started.count(f"{hang} 1") == 1 and started.count(f"{hang} 2") == 1
    after = daemon.send(b"ok", "jobs")
    wait_for(lambda: after in daemon.succeeded(), 10, "the queue to work on")
    assert daemon.stop() == 0


def test_threads_run_side_by_side_within_the_prefetch(daemon: Msgd, rabbit: Any) -> None:
    daemon.daemon["workers"] = 1
    on_amqp(daemon, rabbit, handler="handlers:together", threads=3)
    daemon.start()
    sent = daemon.send_many([b"3"] * 3, "jobs")
    wait_for(lambda: set(daemon.succeeded()) == set(sent), 15, "three runs at once")
    assert daemon.stop() == 0


def test_a_reload_gives_back_the_prefetched_messages_uncharged(daemon: Msgd, rabbit: Any) -> None:
    """Retiring workers publish what they had prefetched and not begun back with the same
    attempts: nothing runs twice, and nothing is charged but (at most) the one delivery per
    worker that its last acknowledgement made room for before its window shrank (usually none:
    without the shrinking, every run under load charged some, up to 4)."""
    on_amqp(daemon, rabbit, handler="handlers:by_body", prefetch=20)
    daemon.start()
    sent = daemon.send_many([b"sleep:0.01"] * 300, "jobs")
    wait_for(lambda: len(daemon.succeeded()) >= 30, 10, "work under way")
    reloaded = daemon.msgctl("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    wait_for(lambda: set(daemon.succeeded()) >= set(sent), 30, "every message")
    assert sorted(daemon.succeeded()) == sorted(sent)  # none twice
    charged = [e for e in daemon.events("message retried") if "Redelivered" in e["error"]]
    assert len(charged) <= 2, charged  # the daemon has two workers, of one runner each
    assert daemon.stop() == 0


def test_spool_queues_work_while_the_broker_is_down(daemon: Msgd, rabbit: Any) -> None:
    """The daemon even starts without its broker; the AMQP queue works once the broker is back."""
    on_amqp(daemon, rabbit)
    rabbit.stop_app()
    try:
        daemon.start()
        wait_for(lambda: daemon.events("amqp unavailable"), 10, "the outage to be logged")
        spool_id = daemon.send(b"spool", "default")
        wait_for(lambda: spool_id in daemon.succeeded(), 10, "the spool queue to work")
        refused = daemon.msgctl("send", "-q", "jobs", input=b"x")
        assert refused.returncode == 1 and "guest:guest" not in refused.stderr, refused
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        stats = daemon.msgctl("stats")
        assert stats.returncode == 0, stats.stderr
        queues = daemon.msgctl("queues")
        assert queues.returncode == 0 and "jobs" in queues.stdout and "unavailable" in queues.stdout
    finally:
        rabbit.start_app()
    after = daemon.send(b"x", "jobs")
    wait_for(lambda: after in daemon.succeeded(), 30, "the AMQP queue to work")
    assert daemon.events("amqp back")
    workers = len(daemon.workers())
    assert len(daemon.events("amqp unavailable")) <= workers  # once per worker, not per retry
    assert daemon.stop() == 0


def test_two_daemons_share_a_queue_through_a_kill_and_a_broker_restart(
    daemon: Msgd, other: Msgd, rabbit: Any
) -> None:
    """3,000 messages on one queue worked by two daemons; one is killed with -9 mid-stream, and
    the broker's application is stopped and started mid-stream. Every message is handled;
    duplicates (handled, acknowledgement lost) are counted and reported."""
    a, b = daemon, other
    name = on_amqp(a, rabbit, handler="handlers:by_body", threads=2)
    on_amqp(b, rabbit, handler="handlers:by_body", threads=2, amqp_queue=name)
    a.start()
    b.start()
    n = 3000
    sent: list[str] = []
    sender = threading.Thread(target=lambda: sent.extend(a.send_many([b"sleep:0.01"] * n, "jobs")))
    sender.start()  # the producer is this process: a's death does not stop it
    wait_for(lambda: len(a.succeeded()) >= 200, 30, "daemon a to be busy")
    victim = a.pid
    a.kill(signal.SIGKILL)  # its workers follow (parent-death signal)
    wait_for(lambda: not alive(victim) and not a.workers(), 10, "a and its workers to die")
    sender.join()
    progress = len(b.succeeded())
    wait_for(lambda: len(b.succeeded()) >= progress + 300, 30, "b to carry on")
    rabbit.stop_app()
    try:
        wait_for(lambda: b.events("amqp unavailable"), 10, "b to see the outage")
    finally:
        rabbit.start_app()
    wait_for(lambda: set(a.succeeded()) | set(b.succeeded()) >= set(sent), 40, "every message")
    # Then the re-runs of those whose acknowledgement the restart lost (charged, delayed).
    delays = [f"{name}.delay.200", name]
    wait_for(lambda: not any(ready(rabbit, q) for q in delays), 10, "the queues empty")
    assert b.stop() == 0  # what b has in hand is finished
    runs = collections.Counter([*a.succeeded(), *b.succeeded()])
    duplicates = sum(runs.values()) - len(runs)
    lost = len(set(sent) - set(runs))
    report("amqp: 2 daemons, one kill -9 + broker stop_app/start_app", 2, n, lost, duplicates, 1)
    assert set(runs) == set(sent)
    assert duplicates <= 12, f"{duplicates} duplicates"  # in hand at the kill or the restart
    assert not any(ready(rabbit, q) for q in [*delays, f"{name}.failed"])
    assert b.events("amqp back")
