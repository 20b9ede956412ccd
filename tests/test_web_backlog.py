"""The listener's per-subscriber backlog (web.Subscriber): bounded, and what it drops is told."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytest.importorskip("websockets")
from msgd.web import BACKLOG, BATCH, Chunk, Subscriber, encode_json, wire


class Stalled:
    """A connection whose peer reads nothing until `open`: every send waits for it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.batches: list[int] = []  # frames per write
        self.open = asyncio.Event()

    async def send(self, chunks: list[bytes]) -> None:
        await self.open.wait()
        frames = [frame for chunk in chunks for frame in split(chunk)]
        self.batches.append(len(frames))
        self.sent.extend(json.loads(frame) for frame in frames)


def split(data: bytes) -> list[bytes]:
    """The payloads of unmasked frames written one after the other (short and 16-bit lengths)."""
    payloads, at = [], 0
    while at < len(data):
        length, header = data[at + 1] & 0x7F, 2
        if length == 126:
            length, header = int.from_bytes(data[at + 2 : at + 4], "big"), 4
        payloads.append(data[at + header : at + header + length])
        at += header + length
    return payloads


async def unstalled(ws: Stalled, sub: Subscriber) -> Stalled:
    """Let the peer read, and wait until the subscriber has sent everything it holds."""
    ws.open.set()
    while sub.backlog or sub.missed:
        await asyncio.sleep(0)
    sub.task.cancel()
    return ws


def frame(i: int) -> bytes:
    return wire(encode_json({"topic": "event", "event": "succeeded", "id": f"m{i}"}))


def event(i: int) -> Chunk:
    return Chunk.of([frame(i)], events=True)


def test_a_stalled_subscriber_keeps_the_newest_and_is_told_how_many_it_lost() -> None:
    async def scenario() -> Stalled:
        ws = Stalled()
        sub = Subscriber(ws)  # type: ignore[arg-type]
        sub.topics = {"events"}
        for i in range(BACKLOG + 501):
            sub.push(event(i))
            await asyncio.sleep(0)  # the pump takes the first one and waits in send
        assert len(sub.backlog) == BACKLOG and sub.missed == 500
        stats = Chunk.of([wire(b'{"topic": "stats", "snapshot": {}}')], events=False)
        sub.push(stats)  # a stats frame is not an event
        assert sub.missed == 501  # the oldest event was dropped to make room for it
        return await unstalled(ws, sub)

    ws = asyncio.run(scenario())
    sent = ws.sent
    assert sent[0]["id"] == "m0"  # in the send when the backlog overflowed
    assert sent[1] == {"topic": "missed", "count": 501}  # before the first event after the gap
    ids = [f["id"] for f in sent[2:] if f["topic"] == "event"]
    assert ids == [f"m{i}" for i in range(502, BACKLOG + 501)] and sent[-1]["topic"] == "stats"
    # Small chunks go out together, up to BATCH frames a write (the count, then frames).
    assert ws.batches == [1, 1 + BATCH] + [BATCH] * (BACKLOG // BATCH - 1)


def test_one_push_past_the_backlog_keeps_the_newest_and_goes_in_one_write() -> None:
    async def scenario() -> Stalled:
        ws = Stalled()
        sub = Subscriber(ws)  # type: ignore[arg-type]
        sub.push(Chunk.of([wire(b'{"topic": "stats", "snapshot": {}}')], events=False))
        sub.push(Chunk.of([frame(i) for i in range(BACKLOG + 300)], events=True))
        assert sub.waiting == BACKLOG and sub.missed == 300  # the stats frame went too
        return await unstalled(ws, sub)

    ws = asyncio.run(scenario())
    assert ws.sent[0] == {"topic": "missed", "count": 300}
    assert [f["id"] for f in ws.sent[1:]] == [f"m{i}" for i in range(300, BACKLOG + 300)]
    assert ws.batches == [1 + BACKLOG]  # the count, then the one chunk left
