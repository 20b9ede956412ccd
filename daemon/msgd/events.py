"""The outcome event feed: one ring buffer per worker slot in shared memory, read by the listener.

A worker appends one event each time it counts an outcome; the HTTP listener process (http.py)
polls the rings and fans the events out to WebSocket subscribers. Nothing waits on anybody: a
ring has one writer (the worker in its slot, or the master settling for that slot's dead
worker, when no worker is in it), old entries are overwritten when it is full, and a reader
that fell more than a ring behind learns how many events it missed. The shared counters stay
the source of truth for totals; the feed is what a dashboard can afford to lose.

Layout: one anonymous shared mmap made by the master before it forks anything.

    [head seq per slot: SLOTS x u64]  then per slot:
    [runner records: MAX_RUNNERS x RECORD]  the message each runner is on (its id, attempt)
    [ring: RING x ENTRY]                   entry seq % RING holds event `seq`

An entry is written seqlock-style: its seq word is zeroed, the body written, then its seq set and
the slot's head moved; a reader keeps an entry only if its seq reads the same before and after
the copy. A runner record has an entry's layout: it is what the master reads to make the events
of a worker that died in the middle of its messages. A message costs a worker two struct packs
and a few word stores (bench/subscribers.py event-cost measures it).
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from msgd.config import MAX_RUNNERS

SLOTS = 272  # worker slots with a ring: the config's 256 workers and room to scale up
RING = 2048  # events per slot kept for a reader that polls every 50 ms: 40k msgs/s a worker
RECORD = 128  # header and id: what a runner record holds
ENTRY = 256  # a record and an error text
ID_BYTES = RECORD - 32
ERROR_BYTES = ENTRY - RECORD
OUTCOMES = ("succeeded", "retried", "failed")  # the values of stats.SUCCEEDED, RETRIED, FAILED

# seq, time (monotonic ns), attempt, ms, queue index, outcome, id length, error length
HEADER = struct.Struct("<QQIfHBBB3x")
BEGIN = struct.Struct(f"<QQIfHBBB3x{ID_BYTES}s")
BODY = struct.Struct(f"<QIfHBBB3x{ID_BYTES}s{ERROR_BYTES}s")  # an entry but its seq
QUEUE_AT = 24  # the offset of the queue (+ 1; 0: none) in HEADER, a single byte
HEADS = SLOTS * 8
SLOT_BYTES = MAX_RUNNERS * RECORD + RING * ENTRY


def _slot_base(slot: int) -> int:
    return HEADS + slot * SLOT_BYTES


class Rings:
    """The shared memory itself; made in the master, inherited by workers and the listener."""

    def __init__(self) -> None:
        self.mm = mmap.mmap(-1, HEADS + SLOTS * SLOT_BYTES)  # pages are touched only when used
        self.heads = memoryview(self.mm)[:HEADS].cast("Q")

    def writer(self, slot: int) -> EventWriter | NullWriter:
        if slot >= SLOTS:
            return NullWriter()
        return EventWriter(self, slot)


class NullWriter:
    """What a worker holds when no listener is configured (or its slot has no ring)."""

    def begin(self, runner: int, queue: int, mid: str, attempt: int, started_ns: int) -> None:
        pass

    def end(self, runner: int, outcome: int, error: str = "") -> None:
        pass

    def settled(self, outcomes: Mapping[int, list[int]], error: str) -> None:
        pass


def no_events(slot: int) -> NullWriter:
    """The pool's writer factory while no listener is configured."""
    return NullWriter()


class EventWriter(NullWriter):
    """One slot's writer. Runner threads of one worker share it, hence the lock (~0.1 us)."""

    def __init__(self, rings: Rings, slot: int) -> None:
        self.mm = rings.mm
        self.heads = rings.heads
        self.slot = slot
        self.records = _slot_base(slot)
        self.ring = self.records + MAX_RUNNERS * RECORD
        self.words = memoryview(rings.mm).cast("Q")
        self.current: list[tuple[int, bytes, int, int]] = [(0, b"", 0, 0)] * MAX_RUNNERS
        self.lock = threading.Lock()

    def begin(self, runner: int, queue: int, mid: str, attempt: int, started_ns: int) -> None:
        """`runner` starts on message `mid` (written where the master can find it, too)."""
        raw = mid.encode()[:ID_BYTES]
        BEGIN.pack_into(self.mm, self.records + runner * RECORD, 0, started_ns, attempt, 0.0,
                        queue + 1, 0, len(raw), 0, raw)  # fmt: skip
        self.current[runner] = (queue + 1, raw, attempt, started_ns)

    def end(self, runner: int, outcome: int, error: str = "") -> None:
        """`runner`'s message ended with `outcome` (a stats outcome index): publish the event."""
        now = time.monotonic_ns()
        queue, mid, attempt, started = self.current[runner]
        why = error.encode(errors="replace")[:ERROR_BYTES] if error else b""
        with self.lock:
            seq = self.heads[self.slot] + 1
            at = self.ring + (seq % RING) * ENTRY
            self.words[at >> 3] = 0  # readers now ignore this entry until its seq is set
            BODY.pack_into(self.mm, at + 8, now, attempt, (now - started) / 1e6, queue, outcome,
                           len(mid), len(why), mid, why)  # fmt: skip
            self.words[at >> 3] = seq
            self.heads[self.slot] = seq
        self.mm[self.records + runner * RECORD + QUEUE_AT] = 0  # the runner is on nothing

    def settled(self, outcomes: Mapping[int, list[int]], error: str) -> None:
        """The master settled a dead worker's messages (this slot has no live writer now):
        `outcomes` per queue index, as counted. They go to the runs that were in progress, the
        highest attempts first (which a death makes fail first); an outcome with no run
        recorded for it still makes an event, with an empty id."""
        runs = self._in_progress()
        for queue, counted in outcomes.items():
            mine = sorted((r for r in runs if r[1] == queue), key=lambda r: -r[2])
            for outcome in sorted(counted, reverse=True):  # failed before retried
                runner = mine.pop(0)[0] if mine else self._blank(queue)
                self.end(runner, outcome, error)
        for runner, *_ in runs:  # returned untouched: no outcome, no event
            self.mm[self.records + runner * RECORD + QUEUE_AT] = 0

    def _in_progress(self) -> list[tuple[int, int, int]]:
        """(runner, queue index, attempt) of each runner record still marked busy, as the dead
        worker wrote it (its message is taken up as the runner's current one)."""
        out = []
        for runner in range(MAX_RUNNERS):
            _, started_ns, attempt, _, queue, _, idlen, _, raw = BEGIN.unpack_from(
                self.mm, self.records + runner * RECORD
            )
            if queue:
                out.append((runner, queue - 1, attempt))
                self.current[runner] = (queue, raw[:idlen], attempt, started_ns)
        return out

    def _blank(self, queue: int) -> int:
        """A spare runner record for an outcome the master counted without a known message."""
        runner = MAX_RUNNERS - 1
        self.begin(runner, queue, "", 0, time.monotonic_ns())
        return runner


class Event(msgspec.Struct):
    slot: int
    seq: int
    t_ns: int
    queue: int
    outcome: str
    id: str
    attempt: int
    ms: float
    error: str


class Reader(msgspec.Struct):
    """The listener's side: where it is in each ring, and how many events it could not read."""

    rings: Rings
    seen: list[int] = msgspec.field(default_factory=list)
    missed: int = 0

    def __post_init__(self) -> None:
        self.seen = list(self.rings.heads)  # start from now: no replay of the past

    def poll(self) -> list[Event]:
        """Every event written since the last poll, in the order they happened (by time across
        slots). Events overwritten before they could be read are added to `missed`."""
        heads = list(self.rings.heads)
        events: list[Event] = []
        for slot, head in enumerate(heads):
            if head != self.seen[slot]:
                events.extend(self._read(slot, head))
        events.sort(key=lambda e: e.t_ns)
        return events

    def skip(self) -> None:
        """Move on to the newest events without reading any (nobody wants them)."""
        self.seen = list(self.rings.heads)

    def _read(self, slot: int, head: int) -> Iterable[Event]:
        first = max(self.seen[slot] + 1, head - RING + 1)
        self.missed += first - self.seen[slot] - 1
        self.seen[slot] = head
        mm, ring = self.rings.mm, _slot_base(slot) + MAX_RUNNERS * RECORD
        for seq in range(first, head + 1):
            at = ring + (seq % RING) * ENTRY
            raw = mm[at : at + ENTRY]
            if int.from_bytes(raw[:8], "little") != seq or _seq(mm, at) != seq:
                self.missed += 1  # overwritten while we read it
                continue
            yield _decode(slot, raw)


def _seq(mm: Any, at: int) -> int:
    return int.from_bytes(mm[at : at + 8], "little")


def _decode(slot: int, raw: bytes) -> Event:
    seq, t_ns, attempt, ms, queue, outcome, idlen, errlen = HEADER.unpack_from(raw)
    return Event(
        slot=slot,
        seq=seq,
        t_ns=t_ns,
        queue=queue - 1,
        outcome=OUTCOMES[outcome] if outcome < len(OUTCOMES) else "failed",
        id=raw[32 : 32 + idlen].decode(errors="replace"),
        attempt=attempt,
        ms=round(ms, 3),
        error=raw[RECORD : RECORD + errlen].decode(errors="replace"),
    )
