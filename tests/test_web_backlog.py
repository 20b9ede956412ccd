"""The listener's per-subscriber backlog (web.Subscriber): bounded, and what it drops is told."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytest.importorskip("websockets")
from msgd.web import BACKLOG, BATCH, Out, Subscriber, encode_json, wire


class Stalled:
    """A connection whose peer reads nothing until `open`: every send waits for it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.batches: list[int] = []  # frames per write
        self.open = asyncio.Event()

    async def send(self, frames: list[bytes]) -> None:
        await self.open.wait()
        self.batches.append(len(frames))
        self.sent.extend(json.loads(frame[2:]) for frame in frames)  # 2: a short frame's header


def event(i: int) -> list[Out]:
    frame = wire(encode_json({"topic": "event", "event": "succeeded", "id": f"m{i}"}))
    return [Out(frame, event=True)]


def test_a_stalled_subscriber_keeps_the_newest_and_is_told_how_many_it_lost() -> None:
    async def scenario() -> list[dict[str, Any]]:
        ws = Stalled()
        sub = Subscriber(ws)  # type: ignore[arg-type]
        sub.topics = {"events"}
        for i in range(BACKLOG + 501):
            sub.push(event(i))
            await asyncio.sleep(0)  # the pump takes the first one and waits in send
        assert len(sub.backlog) == BACKLOG and sub.missed == 500
        stats = Out(wire(b'{"topic": "stats", "snapshot": {}}'), event=False)
        sub.push([stats])  # a stats frame is not an event
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


def test_one_push_past_the_backlog_keeps_the_newest_and_writes_go_in_bounded_batches() -> None:
    async def scenario() -> Stalled:
        ws = Stalled()
        sub = Subscriber(ws)  # type: ignore[arg-type]
        sub.push([Out(wire(b'{"topic": "stats", "snapshot": {}}'), event=False)])
        sub.push([frame for i in range(BACKLOG + 300) for frame in event(i)])
        assert len(sub.backlog) == BACKLOG and sub.missed == 300  # the stats frame went too
        ws.open.set()
        while sub.backlog or sub.missed:
            await asyncio.sleep(0)
        sub.task.cancel()
        return ws

    ws = asyncio.run(scenario())
    assert ws.sent[0] == {"topic": "missed", "count": 300}
    assert [f["id"] for f in ws.sent[1:]] == [f"m{i}" for i in range(300, BACKLOG + 300)]
    assert ws.batches == [1 + BATCH] + [BATCH] * (BACKLOG // BATCH - 1)  # the count, then frames
