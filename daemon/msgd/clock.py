"""The master's clock: the duties that run on time rather than on a signal.

Every tick (TICK): handlers past their timeout (pool), each queue's due retries, delayed sends and
expiries (its store, off the loop unless local and cheap: supervise.Placement; one task per queue
so that a slow broker holds up neither the timeouts nor the other queues), and scheduled bursts.
Every second: depths, the stats file, the process title, systemd's STATUS. At half the watchdog
interval: WATCHDOG=1, while the loop turns and the pool has its workers. Each duty's errors are
logged once while they last (Duties).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from msgd.backend import Outcome, Store, close_all
from msgd.supervise import Placement, off_loop

if TYPE_CHECKING:
    from msgd.master import Master

TICK = 0.05  # seconds between checks of timeouts and due retries


class Clock:
    def __init__(self, master: Master) -> None:
        self.master = master
        self.releasing: dict[str, asyncio.Task[None]] = {}  # per queue: its release_due run
        self.placements: dict[str, Placement] = {}  # per queue: where its release_due runs
        self.scheduling = Placement()
        self.background: set[asyncio.Task[None]] = set()  # scheduled bursts being begun
        self.closing = asyncio.Lock()  # a reload's old stores being closed

    def duties(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [self.keep_time, self.report, self.watchdog]

    async def keep_time(self) -> None:
        """Every tick, the first as soon as the daemon is ready (it also starts each spool
        queue's intake converter, whose threads took 0.8 ms of the start before READY)."""
        while True:
            if not self.master.draining:
                await self.tick()
            await asyncio.sleep(TICK)

    async def tick(self) -> None:
        """Handlers past their timeout, retries and delayed sends whose time has come, scheduled
        bursts. What may wait on a store runs in tasks of its own, so a slow broker delays
        neither the timeouts nor the other queues."""
        with self.master.duties.duty("timeouts"):
            self.master.pool.check_timeouts()
        for name, store in self.master.stores.items():
            if name not in self.releasing or self.releasing[name].done():
                self.releasing[name] = asyncio.create_task(self.release_due(name, store))
        with self.master.duties.duty("schedules"):
            for name in await self.scheduling.run(True, self.master.scheduler.due):
                if name in self.master.stores:
                    self.in_background(self.scheduled_burst(name))

    async def release_due(self, name: str, store: Store) -> None:
        """One queue's due retries and delayed sends claimable; the messages it made dead
        letters because their TTL passed are counted (failed and expired) in the master's own
        counter slot."""
        with self.master.duties.duty(f"retries of {name}"):
            placement = self.placements.setdefault(name, Placement())
            expired = await placement.run(store.local, store.release_due, False)
            if expired:
                self.master.own_counts.count(self.master.index[name], Outcome.FAILED, expired)
                self.master.own_counts.count(self.master.index[name], Outcome.EXPIRED, expired)
                self.master.log.warning("messages expired", queue=name, count=expired)

    async def scheduled_burst(self, name: str) -> None:
        with self.master.duties.duty(f"schedule of {name}"):
            await self.master.begin_burst({name: self.master.stores[name]}, "schedule")

    def close_later(self, stores: dict[str, Store]) -> None:
        """A reload's old stores, closed off the loop while the new ones serve: the reload's
        answer does not wait for it (a spool's close flushes its filesystem). One close at a
        time: the closes of a row of reloads must not take every thread off the loop."""
        if not stores:
            return

        async def close() -> None:
            async with self.closing:
                with self.master.duties.duty("closing a reload's old stores"):
                    await off_loop(close_all, stores, self.master.log)

        self.in_background(close())

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task the loop keeps a reference to until it ends."""
        task = asyncio.create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def report(self) -> None:
        """Every second: depths, the stats file, the process title; STATUS to systemd."""
        while True:
            await asyncio.sleep(1.0)
            if self.master.draining:
                continue
            with self.master.duties.duty("stats file"):
                await self.master.reporter.refresh(self.master.stores)
                self.master.reporter.tick(
                    self.master.publish(), self.master.config, self.master.notify
                )

    async def watchdog(self) -> None:
        """WATCHDOG=1 while the loop turns and the pool has the workers it should have."""
        while self.master.notify.watchdog_interval:
            if not self.master.draining and (
                self.master.pool.workers or self.master.pool.size == 0
            ):
                self.master.notify.watchdog()
            await asyncio.sleep(self.master.notify.watchdog_interval)
