"""Time on RabbitMQ queues: the checks of test_time.py, on a real broker (tests/rabbitkit.py).

What differs, as msgd.amqp documents it: the broker expires a message (the AMQP expiration) into
<amqp_queue>.expired, which the master makes dead letters (a delayed one gets its expiration from
the master when it comes due); the worker that receives a message past its TTL makes it one
itself; delayed sends are counted through the markers in <amqp_queue>.schedules; priority is the
broker's, strict with prefetch 1.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from functools import partial
from typing import Any

import msgd
import pytest
import rabbitkit
import test_amqp
from conftest import Msgd, wait_for
from msgd.backend import BackendError
from msgd.config import DaemonConfig
from msgd.when import SendOptions
from test_time import (
    DELAY,
    ON_TIME,
    check_delayed_runs_on_time,
    check_every_2s,
    check_expired_never_runs,
    check_priority_overtakes,
    check_rate_limit,
    sched_column,
    stamped,
    starts,
)

pika = pytest.importorskip("pika", reason="pika missing (pip install -e '.[amqp]')")
amqp = pytest.importorskip("msgd.amqp")
rabbit = rabbitkit.rabbit  # the session's broker fixture, as `rabbit`
pytestmark = pytest.mark.xdist_group("rabbit")  # one worker: see pyproject's addopts


def amqp_queue(broker: Any, **queue: Any) -> dict[str, Any]:
    name = f"t.{uuid.uuid4().hex[:12]}"
    return stamped(backend="amqp", url=broker.url, amqp_queue=name, timeout=5.0, **queue)


def dead_letters(broker: Any, name: str) -> list[dict[str, Any]]:
    """The error records of the dead letters in `<name>.failed`, looked at and given back."""
    connection = pika.BlockingConnection(pika.URLParameters(broker.url))
    channel = connection.channel()
    records = []
    while True:
        method, properties, _ = channel.basic_get(f"{name}.failed")
        if method is None:
            break
        records.append(json.loads(properties.headers["x-msgd-error"]))
    connection.close()  # unacknowledged: back in the queue
    return records


def consumers(broker: Any, name: str) -> int:
    """The consumers of a queue, 0 while it does not exist."""
    connection = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        return int(connection.channel().queue_declare(name, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        connection.close()


def test_amqp_delayed_message_runs_on_time(daemon: Msgd, rabbit: Any) -> None:
    daemon.queues = {"aq": amqp_queue(rabbit)}
    daemon.write_config()
    daemon.start()
    check_delayed_runs_on_time(daemon, "aq")


def test_amqp_scheduled_counts_the_delayed_sends_until_they_run(daemon: Msgd, rabbit: Any) -> None:
    """Six delayed sends in four queues of their delays (one with a TTL): SCHEDULED is 6 in
    `msgctl queues` and in the master's stats (two lookers taking turns), and 0 once all ran, their
    markers dropped. The delays
    are long enough that a loaded machine still looks before they are due."""
    daemon.queues = {"aq": amqp_queue(rabbit)}
    daemon.write_config()
    daemon.start()
    config = str(daemon.config_path)
    ids = msgd.send_many([b"a", b"b", b"c"], queue="aq", config=config, delay=6)
    ids += [msgd.send(b"d", queue="aq", config=config, delay=d) for d in (6.5, 7)]
    ids.append(msgd.send(b"e", queue="aq", config=config, delay=7, ttl=60))  # its own queue
    assert sched_column(daemon, "aq") == 6
    wait_for(lambda: daemon.stats()["queues"]["aq"]["depth"]["scheduled"] == 6, 5, "the stats")
    assert sched_column(daemon, "aq") == 6
    got = wait_for(lambda: len(starts(daemon)) == 6 and starts(daemon), 20, "six starts")
    assert sorted(s.id for s in got) == sorted(ids)
    assert sched_column(daemon, "aq") == 0
    wait_for(lambda: daemon.stats()["queues"]["aq"]["depth"]["scheduled"] == 0, 5, "0 in stats")
    name = daemon.queues["aq"]["amqp_queue"]
    assert test_amqp.ready(rabbit, f"{name}.schedules") == 0  # emptied queues are left to expire


@pytest.mark.parametrize("delay", [None, 0.5], ids=["sent", "delayed"])
def test_amqp_expired_message_is_a_dead_letter_never_run(
    daemon: Msgd, rabbit: Any, delay: float | None
) -> None:
    """On a burst-mode queue nobody bursts: the broker expires it, the master records it. A
    delayed one's delay queue hands it to .due, whence the master gives it its expiration."""
    daemon.queues = {"aq": amqp_queue(rabbit, mode="burst")}
    daemon.write_config()
    daemon.start()
    dead = partial(dead_letters, rabbit, daemon.queues["aq"]["amqp_queue"])
    check_expired_never_runs(daemon, "aq", dead, delay=delay)


def test_amqp_delayed_message_with_a_ttl_runs_on_time(daemon: Msgd, rabbit: Any) -> None:
    daemon.queues = {"aq": amqp_queue(rabbit)}
    daemon.write_config()
    daemon.start()
    before = time.time()
    mid = msgd.send(b"later", queue="aq", config=str(daemon.config_path), delay=DELAY, ttl=60)
    after = time.time()
    [start] = wait_for(lambda: starts(daemon), 10, "the start")
    assert start.id == mid
    assert before + DELAY <= start.wall <= after + DELAY + ON_TIME, (before, start.wall)


def test_amqp_worker_never_runs_a_message_it_receives_expired(daemon: Msgd, rabbit: Any) -> None:
    """A message past the TTL in its x-msgd-expires header that the broker does not time (as
    one that expires in a worker's prefetch, here a foreign producer's without an expiration):
    the worker that receives it makes it the dead letter, counted the same."""
    daemon.queues = {"aq": amqp_queue(rabbit)}
    daemon.write_config()
    daemon.start()
    name = daemon.queues["aq"]["amqp_queue"]
    wait_for(lambda: consumers(rabbit, name), 10, "a worker consuming")
    connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    past = int((time.time() - 1) * 1000)
    headers = {"x-msgd-attempts": 0, "x-msgd-expires": past}
    properties = pika.BasicProperties(message_id="stale", delivery_mode=2, headers=headers)
    connection.channel().basic_publish("", name, b"stale", properties)
    connection.close()
    records = wait_for(lambda: dead_letters(rabbit, name), 5, "the dead letter")
    assert [(r["id"], r["error_type"]) for r in records] == [("stale", "Expired")]
    assert records[0]["error"] == f"not started within its TTL (expired at {past} ms)"
    wait_for(lambda: daemon.stats()["queues"]["aq"]["expired"] == 1, 5, "expired counted")
    fresh = msgd.send(b"fresh", queue="aq", config=str(daemon.config_path))
    wait_for(lambda: [s.id for s in starts(daemon)] == [fresh], 5, "the queue going on")


def test_amqp_priority_9_overtakes_older_priority_0(daemon: Msgd, rabbit: Any) -> None:
    daemon.daemon["workers"] = 1
    daemon.queues = {"aq": amqp_queue(rabbit, prefetch=1)}
    daemon.write_config()
    daemon.start()
    check_priority_overtakes(daemon, "aq")


def test_amqp_every_2s_works_a_burst_mode_queue(daemon: Msgd, rabbit: Any) -> None:
    check_every_2s(daemon, amqp_queue(rabbit))


def test_amqp_rate_limit(daemon: Msgd, rabbit: Any) -> None:
    check_rate_limit(daemon, amqp_queue(rabbit))


# -- the store in this process ---------------------------------------------------------------------

op, opened = test_amqp.op, test_amqp.opened  # test_amqp.py's store fixtures


def test_amqp_delayed_sends_are_counted_through_concurrent_looks(
    rabbit: Any, op: test_amqp.Opener
) -> None:
    """Delayed sends in six queues of their delays, counted by four stores (four connections)
    looking at once, again and again: every look sees them all."""
    p = test_amqp.policy(rabbit)
    store = op.store(p)
    for i in range(12):
        store.send_many([b"later"], SendOptions(due=time.time() + 600 + i % 6))
    assert store.depths().scheduled == 12
    looks: list[int] = []

    def look() -> None:
        other = amqp.AmqpStore("jobs", p, DaemonConfig())
        try:
            looks.extend(other.depths().scheduled for _ in range(15))
        finally:
            other.close()

    threads = [threading.Thread(target=look) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert looks == [12] * 60
    assert test_amqp.ready(rabbit, f"{p.amqp_queue}.schedules") == 6  # one marker per queue


def test_amqp_a_queue_declared_before_expiry_is_a_clear_error(
    rabbit: Any, op: test_amqp.Opener
) -> None:
    """A queue declared without the dead-letter route of expired messages (by an earlier msgd)
    cannot be declared again with it: the error says what to do."""
    p = test_amqp.policy(rabbit)
    connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    arguments = {"x-queue-type": "classic", "x-max-priority": 9}
    connection.channel().queue_declare(p.amqp_queue, durable=True, arguments=arguments)
    connection.close()
    with pytest.raises(BackendError) as error:
        op.store(p).send_many([b"x"])
    assert "inequivalent arg 'x-dead-letter-exchange'" in str(error.value)
    assert "drain and delete it, or give the queue another amqp_queue" in str(error.value)
