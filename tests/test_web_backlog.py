"""The listener's per-subscriber backlog (web.Subscriber): bounded, and what it drops is told."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytest.importorskip("websockets")
from msgd.web import BACKLOG, Subscriber


class Stalled:
    """A connection whose peer reads nothing until `release`: every send waits for it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.open = asyncio.Event()

    async def send(self, frame: str) -> None:
        await self.open.wait()
        self.sent.append(json.loads(frame))


def event(i: int) -> str:
    return json.dumps({"topic": "event", "event": "succeeded", "id": f"m{i}"})


def test_a_stalled_subscriber_keeps_the_newest_and_is_told_how_many_it_lost() -> None:
    async def scenario() -> list[dict[str, Any]]:
        ws = Stalled()
        sub = Subscriber(ws)  # type: ignore[arg-type]
        sub.topics = {"events"}
        for i in range(BACKLOG + 501):
            sub.push(event(i))
            await asyncio.sleep(0)  # the pump takes the first one and waits in send
        assert len(sub.backlog) == BACKLOG and sub.missed == 500
        sub.push(json.dumps({"topic": "stats", "snapshot": {}}))  # a stats frame is not an event
        assert sub.missed == 501  # the oldest event was dropped to make room for it
        ws.open.set()
        while sub.backlog or sub.missed:
            await asyncio.sleep(0)
        sub.task.cancel()
        return ws.sent

    sent = asyncio.run(scenario())
    assert sent[0]["id"] == "m0"  # in the send when the backlog overflowed
    assert sent[1] == {"topic": "missed", "count": 501}  # before the first event after the gap
    ids = [f["id"] for f in sent[2:] if f["topic"] == "event"]
    assert ids == [f"m{i}" for i in range(502, BACKLOG + 501)] and sent[-1]["topic"] == "stats"
