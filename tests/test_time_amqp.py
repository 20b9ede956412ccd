"""Time on RabbitMQ queues: the checks of test_time.py, on a real broker (tests/rabbitkit.py).

What differs, as msgd.amqp documents it: delayed sends are not counted (their queues are not
listed without the management plugin); an expired message is found by the worker that receives
it, so the expiry test has a burst deliver it; priority is the broker's, strict with prefetch 1.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import msgd
import pytest
import rabbitkit
from conftest import Msgd, wait_for
from test_time import (
    check_delayed_runs_on_time,
    check_every_2s,
    check_priority_overtakes,
    check_rate_limit,
    stamped,
    starts,
)

pika = pytest.importorskip("pika", reason="pika missing (pip install -e '.[amqp]')")
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


def test_amqp_delayed_message_runs_on_time(daemon: Msgd, rabbit: Any) -> None:
    daemon.queues = {"aq": amqp_queue(rabbit)}
    daemon.write_config()
    daemon.start()
    check_delayed_runs_on_time(daemon, "aq", counted=False)


def test_amqp_expired_message_is_a_dead_letter_never_run(daemon: Msgd, rabbit: Any) -> None:
    daemon.queues = {"aq": amqp_queue(rabbit, mode="burst")}
    daemon.write_config()
    daemon.start()
    config = str(daemon.config_path)
    mid = msgd.send(b"stale", queue="aq", config=config, ttl=0.2)
    fresh = msgd.send(b"fresh", queue="aq", config=config)
    wait_for(lambda: time.time() > int(mid[:16], 16) / 1e9 + 0.2, 5, "the TTL to pass")
    assert daemon.msgctl("burst", "--wait").returncode == 0  # a worker receives both
    assert [s.id for s in starts(daemon)] == [fresh]
    name = daemon.queues["aq"]["amqp_queue"]
    records = wait_for(lambda: dead_letters(rabbit, name), 5, "the dead letter")
    assert [(r["id"], r["error_type"]) for r in records] == [(mid, "Expired")]
    assert "not started within its TTL" in records[0]["error"]
    wait_for(lambda: daemon.stats()["queues"]["aq"]["expired"] == 1, 5, "expired counted")
    prom = daemon.msgctl("stats", "--prometheus").stdout
    assert 'msgd_expired_total{queue="aq"} 1' in prom


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
