"""Time over the WebSocket: the send frame takes msgd.send's words (delay, at, ttl, priority)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("websockets")  # before httpkit, which needs it
from conftest import Msgd
from httpkit import TOKEN, ask, client, configure
from test_time import ON_TIME, stamped, wait_starts


def test_the_send_frame_takes_delay_ttl_and_priority(daemon: Msgd) -> None:
    daemon.queues = {"default": stamped()}
    configure(daemon)
    daemon.start()
    with client(daemon, token=TOKEN) as ws:
        bad = ask(ws, {"op": "send", "body": "x", "priority": 10, "ref": 1})
        before = time.time()
        sent = ask(ws, {"op": "send", "body": "later", "delay": 1.0, "ttl": 60, "ref": 2})
        after = time.time()
    assert bad == {"op": "error", "ref": 1, "error": "priority: expected 0-9, got 10"}
    assert sent["op"] == "sent"
    [start] = wait_starts(daemon, 1)  # the only message: the bad frame sent nothing
    assert start.id == sent["id"]
    assert before + 1.0 <= start.wall <= after + 1.0 + ON_TIME
