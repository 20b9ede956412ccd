"""The WebSocket feed and sending on a Redis queue: the same frames as on the spool."""

from __future__ import annotations

import pytest

pytest.importorskip("websockets")
from conftest import Msgd
from httpkit import check_send_and_events, configure
from test_redis import RedisServer, on_redis, redis_server, stream  # noqa: F401 - fixtures

pytestmark = pytest.mark.xdist_group("redis")  # the session's server: one worker (pyproject)


def test_send_and_events_on_a_redis_queue(
    daemon: Msgd,
    redis_server: RedisServer,  # noqa: F811
    stream: str,  # noqa: F811
) -> None:
    on_redis(daemon, redis_server, stream, handler="handlers:by_body", max_attempts=2,
             backoff=[0.05])  # fmt: skip
    configure(daemon)
    daemon.start()
    check_send_and_events(daemon, "rq")
