"""Live counters shared by workers and master: the shared-memory layout and its two sides.

Layout: `multiprocessing.Array('Q', lock=False)` segments of fixed-size slots, one slot per worker.
A worker writes only its own slot, so no update is lost and no lock is taken (~45 ns a write,
against ~440 ns for a locked Value). A replacement worker inherits its predecessor's slot and the
master sums all slots, so totals never go backwards. More segments are added when the pool outgrows
the slots allocated.

    slot = [pid] [runner 0..MAX_RUNNERS-1: queue+1 | intent, start (monotonic ns), crc32(name),
                  the message id's first 32 bytes]
           [queue 0..MAX_QUEUES-1: 5 outcomes, busy ns, latency histogram]

A runner's words say what it is working on, so the master can time it out, name it in the stats
and settle it if the worker dies, on every backend, without listing a directory.
"""

from __future__ import annotations

import multiprocessing
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec

from msgd.backend import Outcome
from msgd.config import MAX_QUEUES, MAX_RUNNERS

BUSY_NS = len(Outcome)
HIST = BUSY_NS + 1
HIST_BASE_NS = 50_000  # bucket k holds durations up to 50 µs * 2**k
BUCKETS = 22  # 50 µs ... 52 s, and a last bucket for anything longer
BUCKET_BOUNDS = [HIST_BASE_NS * 2**k / 1e9 for k in range(BUCKETS - 1)]  # seconds
QUEUE_BLOCK = HIST + BUCKETS
LABEL_BYTES = 32
RUNNER_BLOCK = 3 + LABEL_BYTES // 8
RUNNERS = 1
QUEUES = RUNNERS + MAX_RUNNERS * RUNNER_BLOCK
SLOT = QUEUES + MAX_QUEUES * QUEUE_BLOCK
SLOTS_PER_SEGMENT = 16
_RUN = struct.Struct(f"=QQ{LABEL_BYTES}s")  # a run's start, crc32(name), id (cut or 0-padded)


def bucket(duration_ns: int) -> int:
    """The first bucket whose bound is >= the duration (Prometheus' `le` includes the bound)."""
    k = ((duration_ns - 1) // HIST_BASE_NS).bit_length() if duration_ns > 0 else 0
    return k if k < BUCKETS else BUCKETS - 1  # no min()/max(): this runs once per message


def crc(name: str) -> int:
    return zlib.crc32(name.encode())


class QueueIndex:
    """Queue name <-> its block in every slot. Names only ever get added (a reload that drops a
    queue keeps its counts), so an index never changes meaning while the daemon runs."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.index: dict[str, int] = {}
        self.add(names)

    def add(self, names: Iterable[str]) -> None:
        for name in names:
            self.index.setdefault(name, len(self.index))

    def name(self, index: int) -> str | None:
        return next((n for n, i in self.index.items() if i == index), None)

    def __getitem__(self, name: str) -> int:
        return self.index[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


class SlotWriter:
    """A worker's handle on its own slot: the only code that writes it while the worker lives."""

    def __init__(self, segment: Any, slot: int) -> None:
        raw = memoryview(segment).cast("B")
        self.a = raw.cast("Q")  # ~45 ns an update; ctypes' ~55
        self.bytes = raw
        self.base = (slot % SLOTS_PER_SEGMENT) * SLOT
        self.lock: threading.Lock | None = None  # see shared_by_threads

    def shared_by_threads(self) -> None:
        """`a[i] += 1` is a read and a write: the runner threads of one worker (threads > 1)
        could interleave there, so their updates take a lock; a lone runner needs none."""
        self.lock = threading.Lock()

    def start(self, runner: int, queue: int, name: str, label: str) -> int:
        """Mark `runner` busy with `name` (message id `label`); returns the start time (ns)."""
        r = self.base + RUNNERS + runner * RUNNER_BLOCK
        now = time.monotonic_ns()
        _RUN.pack_into(self.bytes, (r + 1) * 8, now, zlib.crc32(name.encode()), label.encode())
        self.a[r] = queue + 1  # last: the run is readable whole once it is marked busy
        return now

    def intend(self, runner: int, queue: int, outcome: Outcome) -> None:
        """Say, in the same word that marks the run busy (one store), which outcome `runner` is
        about to make durable: a worker killed between that and finish() is counted by the
        master's settlement, which asks the store whether the effect happened (pool.settle)."""
        self.a[self.base + RUNNERS + runner * RUNNER_BLOCK] = queue + 1 + ((outcome + 1) << 16)

    def finish(
        self,
        runner: int,
        queue: int,
        outcome: Outcome,
        started: int,
        among: Outcome | None = None,
    ) -> None:
        """The run ended with `outcome`; `among`: also counted as REJECTED or EXPIRED."""
        elapsed = time.monotonic_ns() - started
        q = self.base + QUEUES + queue * QUEUE_BLOCK
        a, lock = self.a, self.lock
        if lock is not None:
            lock.acquire()
        a[q + outcome] += 1
        if among is not None:
            a[q + among] += 1
        a[q + BUSY_NS] += elapsed
        a[q + HIST + bucket(elapsed)] += 1
        if lock is not None:
            lock.release()
        a[self.base + RUNNERS + runner * RUNNER_BLOCK] = 0

    def count(self, queue: int, outcome: Outcome, n: int = 1) -> None:
        """An outcome settled by the master on behalf of a dead worker (timeouts, kills)."""
        self.a[self.base + QUEUES + queue * QUEUE_BLOCK + outcome] += n

    def set_pid(self, pid: int) -> None:
        self.a[self.base] = pid
        for r in range(MAX_RUNNERS):
            self.a[self.base + RUNNERS + r * RUNNER_BLOCK] = 0


class Counters(msgspec.Struct):
    """The master's side: allocates segments and reads every slot."""

    segments: list[Any] = msgspec.field(default_factory=list)
    own: bytearray = msgspec.field(default_factory=lambda: bytearray(SLOT * 8))  # see `master`
    used: int = 0  # slots handed out so far (the highest + 1): the others are all zeros

    def master(self) -> SlotWriter:
        """The master's own slot, read after the workers' (never one of theirs): what it settles
        itself, such as messages that expired with no worker claiming them. In its own memory:
        no other process writes it."""
        return SlotWriter(self.own, 0)

    def writer(self, slot: int) -> SlotWriter:
        self.used = max(self.used, slot + 1)
        while slot >= len(self.segments) * SLOTS_PER_SEGMENT:
            self.segments.append(multiprocessing.Array("Q", SLOTS_PER_SEGMENT * SLOT, lock=False))
        return SlotWriter(self.segments[slot // SLOTS_PER_SEGMENT], slot)

    def read(self) -> list[array]:
        """A copy of every slot handed out, then the master's own: a few µs for a few workers,
        where copying every slot of a segment took ~50 µs of a USR1's ~0.4 ms."""
        slots: list[array] = []
        for k, segment in enumerate(self.segments):
            n = min(SLOTS_PER_SEGMENT, self.used - k * SLOTS_PER_SEGMENT)
            data = array("Q")
            data.frombytes(memoryview(segment).cast("B")[: n * SLOT * 8])
            slots.extend(data[i * SLOT : (i + 1) * SLOT] for i in range(n))
        slots.append(array("Q", bytes(self.own)))
        return slots

    def read_slot(self, slot: int) -> array:
        """A copy of one worker's slot: what the clock's timeout check reads 20 times a second
        (~2 µs, where `read` copies every slot of every segment, ~50 µs)."""
        segment = memoryview(self.segments[slot // SLOTS_PER_SEGMENT]).cast("B").cast("Q")
        start = (slot % SLOTS_PER_SEGMENT) * SLOT
        return array("Q", segment[start : start + SLOT].tobytes())


class Running(msgspec.Struct):
    """One handler run in progress, as read from a slot."""

    queue: int
    started_ns: int
    crc: int
    label: str  # the message id (its first 32 bytes)
    intended: Outcome | None = None  # the outcome being made durable (SlotWriter.intend)


def running(slot: array) -> list[Running]:
    out = []
    for r in range(MAX_RUNNERS):
        base = RUNNERS + r * RUNNER_BLOCK
        if word := slot[base]:
            intended = Outcome((word >> 16) - 1) if word >> 16 else None
            label = slot[base + 3 : base + RUNNER_BLOCK].tobytes().rstrip(b"\0")
            out.append(
                Running(
                    (word & 0xFFFF) - 1,
                    slot[base + 1],
                    slot[base + 2],
                    label.decode(errors="replace"),
                    intended,
                )
            )
    return out


def queue_block(slot: array, queue: int) -> array:
    start = QUEUES + queue * QUEUE_BLOCK
    return slot[start : start + QUEUE_BLOCK]
