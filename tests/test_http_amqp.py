"""The WebSocket feed and sending on a RabbitMQ queue: the same frames as on the spool."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

pytest.importorskip("websockets")
pytest.importorskip("pika", reason="pika missing (pip install -e '.[amqp]')")
from conftest import Msgd
from httpkit import check_send_and_events, configure

pytestmark = pytest.mark.xdist_group("rabbit")  # the session's server: one worker (pyproject)


def test_send_and_events_on_an_amqp_queue(daemon: Msgd, rabbit: Any) -> None:
    daemon.queues["aq"] = {
        "handler": "handlers:by_body",
        "backend": "amqp",
        "url": rabbit.url,
        "amqp_queue": f"t.{uuid.uuid4().hex[:12]}",
        "max_attempts": 2,
        "backoff": [0.05],
    }
    configure(daemon)
    daemon.start()
    check_send_and_events(daemon, "aq")
