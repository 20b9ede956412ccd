"""The one handler body every system runs, so that only the machinery around it differs.

A message is three numbers: a sequence number, an enqueue timestamp (0 when latency is not measured)
and a number of `burn` iterations (0 for no-op messages). A negative sequence number is a warm-up
message: it only marks the worker as ready. What is recorded per message is the latency
(handler start minus enqueue time) when a timestamp was sent; else, for CPU-bound messages, the
time the `burn` took in this worker (the unit of work, timed where it runs); else the sequence
number (so that lost or duplicated messages can be counted).
"""

from __future__ import annotations

import time

import probe  # the handler's only import: each module a worker imports costs it memory


def burn(iterations: int) -> int:
    """Pure-Python work: about `iterations` loop turns, no I/O, holds the GIL throughout."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def run(seq: int, enqueued: float, iterations: int) -> None:
    started = time.time()
    if seq < 0:
        probe.touch()
        return
    value = float(seq)
    if iterations:
        t = time.perf_counter()
        burn(iterations)
        value = time.perf_counter() - t
    probe.record(started, started - enqueued if enqueued else value)


def encode(seq: int, enqueued: float = 0.0, iterations: int = 0) -> bytes:
    """A message body for systems that carry bytes (msgd, the bare loop)."""
    return b"%d %r %d" % (seq, enqueued, iterations)


def run_body(body: bytes) -> None:
    seq, enqueued, iterations = body.split()
    run(int(seq), float(enqueued), int(iterations))
