"""The WebSocket feed and sending on a Redis queue: the same frames as on the spool."""

from __future__ import annotations

import pytest

pytest.importorskip("websockets")
from conftest import Msgd
from httpkit import TOKEN, ask, client, configure, next_frame, subscribe
from test_redis import RedisServer, on_redis, redis_server, stream  # noqa: F401 - fixtures


def test_send_and_events_on_a_redis_queue(
    daemon: Msgd,
    redis_server: RedisServer,  # noqa: F811
    stream: str,  # noqa: F811
) -> None:
    on_redis(daemon, redis_server, stream, handler="handlers:by_body", max_attempts=2,
             backoff=[0.05])  # fmt: skip
    configure(daemon)
    daemon.start()
    with client(daemon, token=TOKEN) as ws:
        subscribe(ws, ["events"], queues=["rq"])
        ok = ask(ws, {"op": "send", "queue": "rq", "body": "ok", "ref": 1})
        fail = ask(ws, {"op": "send", "queue": "rq", "body": "fail", "ref": 2})
        assert ok["op"] == fail["op"] == "sent"
        got = [next_frame(ws, lambda f: f.get("topic") == "event", 30) for _ in range(3)]
    by_id: dict[str, list[tuple[str, int]]] = {}
    for e in got:
        assert e["queue"] == "rq"
        by_id.setdefault(e["id"], []).append((e["event"], e["attempt"]))
    assert by_id == {ok["id"]: [("succeeded", 1)], fail["id"]: [("retried", 1), ("failed", 2)]}
