"""The master's reporting: queue depths gathered off its loop, snapshots, the stats file.

Depths come from directory listings or a broker, once a second and before a USR1 dump
(`refresh`). A broker may not answer and a large directory takes milliseconds to list, so those
are gathered in a thread; small listings run on the loop (supervise.Placement). Snapshots read
the last depths gathered and a copy of the counters, which costs a few microseconds on the loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import msgspec
import setproctitle
import structlog

from msgd import stats
from msgd.backend import BackendError, Depths, Store
from msgd.config import Config
from msgd.counters import Counters, QueueIndex, running
from msgd.notify import Notifier
from msgd.stats import DaemonInfo, Rates, Snapshot, Totals
from msgd.supervise import Placement

STATUS_EVERY = 5.0  # seconds between STATUS= lines to systemd


class Reporter:
    def __init__(self, counters: Counters, index: QueueIndex) -> None:
        self.counters = counters
        self.index = index
        self.rates = Rates()
        self.depths: dict[str, Depths] = {}
        self.placement = Placement()
        self.unreachable: dict[str, str] = {}  # queue -> the error, logged once while it lasts
        self.log = structlog.get_logger()
        self.next_log = self.next_status = time.monotonic()

    async def refresh(self, stores: Mapping[str, Store]) -> None:
        """Fresh depths: listed on the loop while that is cheap, else in a thread."""
        local = all(store.local for store in stores.values())
        await self.placement.run(local, self.gather, stores)

    def gather(self, stores: Mapping[str, Store]) -> None:
        """Each store's depths; a store that cannot be asked keeps its last ones."""
        fresh = {}
        for name, store in stores.items():
            try:
                fresh[name] = store.depths()
            except BackendError as e:
                fresh[name] = self.depths.get(name, Depths())
                if self.unreachable.get(name) != str(e):
                    self.log.warning("queue depths unavailable", queue=name, error=str(e))
                self.unreachable[name] = str(e)
            else:
                self.unreachable.pop(name, None)
        self.depths = fresh

    def snapshot(self, info: DaemonInfo, workers: Iterable[tuple[int, int]]) -> Snapshot:
        return stats.build(
            slots=self.counters.read(),
            index=self.index,
            workers=workers,
            depths=self.depths,
            rates=self.rates,
            info=info,
        )

    def tick(self, snap: Snapshot, config: Config, notify: Notifier) -> None:
        """Once a second, after publishing `snap`: fold its runs into the moving averages, show
        it in the process title, log it every `stats_log_interval`, STATUS every 5 s."""
        now = time.monotonic()
        self.rates.step(snap.processed, now)
        line = stats.summary(snap)
        setproctitle.setproctitle(f"msgd: master -c {config.path} {line}")
        interval = config.daemon.stats_log_interval
        if interval and now >= self.next_log:
            self.next_log = now + interval
            self.log_event(snap)
        if now >= self.next_status:
            self.next_status = now + STATUS_EVERY
            notify.status(line)

    def log_event(self, snap: Snapshot) -> None:
        """The `stats` event: the snapshot's fields, less the histogram's fixed bounds."""
        fields = msgspec.to_builtins(snap)
        del fields["histogram_bounds_s"]
        self.log.info("stats", **fields)

    @staticmethod
    def queue_totals(snap: Snapshot) -> dict[str, Totals]:
        return {
            name: Totals.of(getattr(q, label) for label in stats.LABELS)
            for name, q in snap.queues.items()
        }

    def in_flight(self, slots: Iterable[int]) -> int:
        return sum(len(running(self.counters.read_slot(s))) for s in slots)
