"""The event rings (events.py): what a worker writes, the listener reads, in order, or counts as
missed; and what the master writes for a worker that died in the middle of its messages."""

from __future__ import annotations

import multiprocessing

from msgd.backend import Outcome
from msgd.config import MAX_RUNNERS
from msgd.events import ENTRY, RECORD, RING, Reader, Rings, _slot_base


def run(writer, runner: int, queue: int, mid: str, outcome: Outcome, error: str = "") -> None:
    writer.begin(runner, queue, mid, 1, 0)
    writer.end(runner, outcome, error)


def test_every_event_read_once_in_order_with_its_fields() -> None:
    rings = Rings()
    reader = Reader(rings)
    a, b = rings.writer(0), rings.writer(5)
    run(a, 0, 2, "m1", Outcome.SUCCEEDED)
    run(b, 1, 0, "m2", Outcome.RETRIED, "RuntimeError: no")
    run(a, 0, 2, "m3", Outcome.FAILED, "x" * 500)
    events = reader.poll()
    assert [(e.slot, e.queue, e.id, e.outcome) for e in events] == [
        (0, 2, "m1", "succeeded"), (5, 0, "m2", "retried"), (0, 2, "m3", "failed"),
    ]  # fmt: skip
    assert events[1].error == "RuntimeError: no" and events[2].error == "x" * 128
    assert reader.poll() == [] and reader.missed == 0


def test_a_reader_more_than_a_ring_behind_counts_what_it_missed() -> None:
    rings = Rings()
    reader = Reader(rings)
    w = rings.writer(3)
    for i in range(RING + 10):
        run(w, 0, 0, f"m{i}", Outcome.SUCCEEDED)
    events = reader.poll()
    assert reader.missed == 10 and len(events) == RING
    assert [e.id for e in events] == [f"m{i}" for i in range(10, RING + 10)]


def test_skipping_reads_nothing_and_misses_nothing() -> None:
    """While nobody subscribes to events the listener skips to the heads: what it skipped was
    not missed by anyone, and the events after the skip are read as ever."""
    rings = Rings()
    reader = Reader(rings)
    w = rings.writer(4)
    for i in range(RING + 10):
        run(w, 0, 0, f"old{i}", Outcome.SUCCEEDED)
    reader.skip()
    run(w, 0, 0, "new", Outcome.SUCCEEDED)
    assert [e.id for e in reader.poll()] == ["new"] and reader.missed == 0


def test_an_entry_being_rewritten_is_not_read() -> None:
    """The writer zeroes an entry's seq before it rewrites it: a reader skips it, and counts it."""
    rings = Rings()
    reader = Reader(rings)
    w = rings.writer(1)
    run(w, 0, 0, "m0", Outcome.SUCCEEDED)
    run(w, 0, 0, "m1", Outcome.SUCCEEDED)
    at = _slot_base(1) + MAX_RUNNERS * RECORD + (2 % RING) * ENTRY  # entry of seq 2 ("m1")
    rings.mm[at : at + 8] = bytes(8)
    assert [e.id for e in reader.poll()] == ["m0"] and reader.missed == 1


def test_a_worker_process_writes_what_the_listener_reads() -> None:
    rings = Rings()
    reader = Reader(rings)
    child = multiprocessing.get_context("fork").Process(
        target=lambda: [run(rings.writer(2), 0, 1, f"c{i}", Outcome.SUCCEEDED) for i in range(50)]
    )
    child.start()
    child.join()
    assert [e.id for e in reader.poll()] == [f"c{i}" for i in range(50)]


def test_the_master_writes_a_dead_workers_outcomes_for_the_runs_it_left() -> None:
    rings = Rings()
    reader = Reader(rings)
    w = rings.writer(4)
    w.begin(0, 1, "old", 3, 0)  # in progress when the worker died, two attempts done
    w.begin(1, 1, "young", 1, 0)
    w.begin(2, 0, "returned", 1, 0)  # its store returned it untouched: no outcome
    master = rings.writer(4)  # the master's own writer for the dead slot
    master.settled({1: [Outcome.RETRIED, Outcome.FAILED]}, "worker killed by signal SIGKILL")
    events = reader.poll()
    assert [(e.id, e.outcome, e.attempt) for e in events] == [("old", "failed", 3),
                                                               ("young", "retried", 1)]  # fmt: skip
    assert {e.error for e in events} == {"worker killed by signal SIGKILL"}
    master.settled({}, "")  # nothing is left marked as in progress
    assert reader.poll() == []
