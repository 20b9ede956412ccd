"""Time on Redis queues: the checks of test_time.py, on a real redis-server.

A Redis stream keeps arrival order, so priorities are refused there (one clear error) rather
than silently ignored; everything else behaves as on the spool.
"""

from __future__ import annotations

import time
from typing import Any

import msgd
import pytest
import test_redis
from conftest import Msgd, wait_for
from test_redis import RedisServer, new_stream
from test_time import (
    check_delayed_runs_on_time,
    check_every_2s,
    check_expired_never_runs,
    check_rate_limit,
    stamped,
    starts,
)

server = test_redis.redis_server  # test_redis.py's redis-server fixture, as `server`
pytestmark = test_redis.pytestmark  # skipped without redis-server; on the "redis" xdist worker


def redis_queue(server: RedisServer, **queue: Any) -> dict[str, Any]:
    return stamped(backend="redis", url=server.url, stream=new_stream(), timeout=5.0, **queue)


def dead_letters(server: RedisServer, stream: str) -> list[dict[str, str]]:
    entries = server.client.xrange(f"{stream}:failed")
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def test_redis_delayed_message_runs_on_time(daemon: Msgd, server: RedisServer) -> None:
    daemon.queues = {"rq": redis_queue(server)}
    daemon.write_config()
    daemon.start()
    check_delayed_runs_on_time(daemon, "rq")


def test_redis_expired_message_is_a_dead_letter_never_run(
    daemon: Msgd, server: RedisServer
) -> None:
    daemon.queues = {"rq": redis_queue(server, mode="burst")}
    daemon.write_config()
    daemon.start()
    stream = daemon.queues["rq"]["stream"]
    check_expired_never_runs(daemon, "rq", lambda: dead_letters(server, stream))


def test_redis_refuses_priorities(daemon: Msgd, server: RedisServer) -> None:
    daemon.queues = {"rq": redis_queue(server)}
    daemon.write_config()
    sent = daemon.msgctl("send", "-q", "rq", "--priority", "9", input=b"x")
    assert sent.returncode == 1
    assert (
        sent.stderr == "msgctl: rq: a Redis stream keeps arrival order: priority is not supported\n"
    )
    with pytest.raises(msgd.backend.BackendError, match="priority is not supported"):
        msgd.send(b"x", queue="rq", config=str(daemon.config_path), priority=1)
    assert server.client.xlen(daemon.queues["rq"]["stream"]) == 0  # nothing sent


def test_redis_every_2s_works_a_burst_mode_queue(daemon: Msgd, server: RedisServer) -> None:
    check_every_2s(daemon, redis_queue(server))


def test_redis_rate_limit(daemon: Msgd, server: RedisServer) -> None:
    check_rate_limit(daemon, redis_queue(server))


def test_redis_worker_never_runs_an_entry_it_reads_expired(
    daemon: Msgd, server: RedisServer
) -> None:
    """A worker blocked in XREADGROUP gets a new entry at once, before the master's
    once-a-second look: it must see `expires` itself."""
    daemon.queues = {"rq": redis_queue(server)}
    daemon.write_config()
    daemon.start()
    stream = daemon.queues["rq"]["stream"]
    wait_for(lambda: server.client.exists(stream), 5, "the consumer group")
    past = int((time.time() - 1) * 1000)
    server.client.xadd(stream, {"id": "stale", "body": b"x", "expires": past})
    records = wait_for(lambda: dead_letters(server, stream), 5, "the dead letter")
    assert [(r["id"], r["error_type"]) for r in records] == [("stale", "Expired")]
    assert starts(daemon) == []
