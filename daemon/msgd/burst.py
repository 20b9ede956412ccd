"""The burst (USR2): mark what is pending on every queue, tell the workers, see it worked, report.

One `Burst` covers one signal, or several that overlap (reported together). Its parts:
- begin: on each queue's store, deferred retries become due now, and the store marks everything
  claimable (backend.BurstMark); done off the master's loop, since a store may be remote;
- tell the workers: `BurstFlags.started` moves (shared memory) and each worker gets the word
  "burst" on its pipe, which wakes its burst-mode queues' runners;
- finished: every store answers "worked up to the mark?", polled off the loop; then the runs
  that were settling a message at that moment are waited for, so that they are counted;
- report: this host's outcomes on the marked queues while the burst ran (the shared counters).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import structlog

from msgd.backend import BackendError, BurstMark, Store
from msgd.config import MAX_QUEUES
from msgd.counters import Running
from msgd.stats import Totals
from msgd.supervise import off_loop

POLL = 0.01  # seconds between looks at whether a burst's messages are all worked


class BurstFlags(msgspec.Struct):
    """Burst generations per queue index, shared by master and workers: a burst of a queue (USR2
    bursts them all, a schedule its own queue) bumps its `started`; `finished` catches up once
    everything pending at the start is worked. A burst-mode queue runs while they differ, so a
    worker (re)started in the middle of a burst joins it."""

    started: Any = msgspec.field(default_factory=lambda: _shared_generations())
    finished: Any = msgspec.field(default_factory=lambda: _shared_generations())


def _shared_generations() -> Any:
    return multiprocessing.Array("Q", MAX_QUEUES, lock=False)


class Burst:
    """The burst under way: the marks per queue and the counts when it began."""

    def __init__(self) -> None:
        self.marks: dict[str, list[BurstMark]] = {}
        self.before: dict[str, Totals] = {}
        self.triggers: set[str] = set()  # "signal" (USR2), "schedule": what started it

    def begin(self, stores: Mapping[str, Store]) -> int:
        """Off the loop: due retries now, a mark per queue; returns how many messages wait.

        A store that cannot be asked (its server down) is logged and not waited for: the burst
        reports what it could see."""
        pending = 0
        for name, store in stores.items():
            try:
                store.release_due(force=True)
                mark = store.burst_mark()
            except BackendError as e:
                structlog.get_logger().warning(
                    "burst", queue=name, outcome="not waited for", error=str(e)
                )
                continue
            self.marks.setdefault(name, []).append(mark)
            pending += mark.pending
        return pending

    async def until_worked(self, stores: Mapping[str, Store]) -> None:
        """Return once every mark's messages are settled, asking the stores off the loop."""
        while not await off_loop(self.worked, stores):
            await asyncio.sleep(POLL)

    @staticmethod
    async def until_counted(runs: Callable[[], list[Running]]) -> None:
        """Return once the runs that were settling a message (an outcome intended, not counted
        yet) are over: a worker tells the store first and counts after, so the stores can say
        "worked" while the burst's last outcomes are still uncounted."""
        settling = {(r.started_ns, r.crc) for r in runs() if r.intended is not None}
        while settling & {(r.started_ns, r.crc) for r in runs()}:
            await asyncio.sleep(POLL)

    def worked(self, stores: Mapping[str, Store]) -> bool:
        """Off the loop: whether every mark's messages are settled (a queue dropped by a reload
        since is not waited for)."""
        return all(
            stores[name].burst_worked(mark)
            for name, marks in self.marks.items()
            if name in stores
            for mark in marks
        )

    def report(self, now: Mapping[str, Totals]) -> dict[str, int]:
        """Outcomes on the marked queues since the burst began."""
        outcome = {"succeeded": 0, "retried": 0, "failed": 0}
        for name in self.marks:
            before, after = self.before.get(name, Totals()), now.get(name, Totals())
            for key in outcome:
                outcome[key] += getattr(after, key) - getattr(before, key)
        return outcome
