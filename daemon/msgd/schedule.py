"""Scheduled bursts: when a burst-mode queue's `schedule` says it runs next, and which are due.

A schedule is a five-field cron expression, read in the daemon's local time zone by cronsim
(the `msgd[cron]` extra, imported only when a queue has a cron schedule), or `@every <n><unit>`
(units s, m, h, d) for a fixed interval.

Missed ticks coalesce: a queue whose run came while msgd was busy or stopped runs once, and its
next run is the first tick after that run, never a backlog of them. To know about ticks missed
while msgd was stopped, the time of each queue's last run is kept in `<spool>/.msgd/schedule.json`
(with the expression it was for: a changed expression starts afresh from now).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from datetime import datetime, tzinfo
from typing import Any

import msgspec

from msgd.config import Config
from msgd.sysutil import atomic_write

EVERY = re.compile(r"@every\s+(\d+(?:\.\d+)?)\s*([smhd])")
UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
STATE_FILE = "schedule.json"


class NextRun(msgspec.Struct, kw_only=True):
    """One schedule as the stats show it."""

    schedule: str
    next_run: float  # epoch seconds


class ScheduleError(ValueError):
    """An expression that is not a schedule; the text says why (the config names the key)."""


class Schedule:
    """One expression: the first run strictly after a given time (epoch seconds)."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        every = EVERY.fullmatch(expression.strip())
        self.interval = float(every[1]) * UNIT_SECONDS[every[2]] if every else 0.0
        if every and self.interval <= 0:
            raise ScheduleError("@every needs an interval above zero")
        if not every:
            if expression.strip().startswith("@"):
                raise ScheduleError("expected a cron expression or '@every <n>s|m|h|d'")
            self.next_after(time.time())  # parses the cron expression, or raises

    def next_after(self, t: float) -> float:
        if self.interval:
            return t + self.interval
        from cronsim import CronSim, CronSimError  # the msgd[cron] extra

        start = datetime.fromtimestamp(t, local_zone())
        try:
            return next(CronSim(self.expression, start)).timestamp()
        except CronSimError as e:
            raise ScheduleError(f"bad cron expression: {e}") from None
        except StopIteration:
            raise ScheduleError("this cron expression never matches") from None


def local_zone() -> tzinfo | None:
    """The daemon's zone as zoneinfo knows it (so cron follows daylight saving time): $TZ, else
    /etc/localtime; else the fixed offset the C library uses now."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = os.environ.get("TZ", "").lstrip(":")
    with contextlib.suppress(ZoneInfoNotFoundError, ValueError, OSError):
        if name:
            return ZoneInfo(name)
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f)
    return datetime.now().astimezone().tzinfo


class Scheduler:
    """The master's view of every schedule: which queues are due, and when each runs next."""

    def __init__(
        self, state_dir: str, schedules: dict[str, str], previous: Scheduler | None = None
    ) -> None:
        """`previous`: the scheduler before a reload, whose queues keep their next run if their
        expression did not change."""
        self.path = os.path.join(state_dir, STATE_FILE)
        self.plans = {queue: Schedule(expr) for queue, expr in schedules.items()}
        self.last_runs = self._load()
        now = time.time()
        self.next_runs = {queue: self._first_run(queue, now, previous) for queue in self.plans}

    @classmethod
    def of(cls, config: Config, previous: Scheduler | None = None) -> Scheduler:
        """The config's schedules; their last runs are kept beside the ack logs in the spool."""
        plans = {name: q.schedule for name, q in config.queues.items() if q.schedule}
        return cls(os.path.join(config.daemon.spool, ".msgd"), plans, previous)

    def _first_run(self, queue: str, now: float, previous: Scheduler | None) -> float:
        """After a start or reload: the tick after the last run we know of (already due if any
        tick was missed meanwhile), else the first tick from now."""
        plan = self.plans[queue]
        before = previous.plans.get(queue) if previous else None
        if previous and before and before.expression == plan.expression:
            return previous.next_runs[queue]
        last = self.last_runs.get(queue)
        if last and last["expression"] == plan.expression:
            return plan.next_after(min(last["at"], now))
        return plan.next_after(now)

    def due(self, now: float | None = None) -> list[str]:
        """The queues whose run has come; each is recorded as run now (once, however many ticks
        it missed) and given its next tick after now."""
        now = time.time() if now is None else now
        queues = [q for q in self.plans if self.next_runs[q] <= now]
        for queue in queues:
            plan = self.plans[queue]
            self.next_runs[queue] = plan.next_after(now)
            self.last_runs[queue] = {"expression": plan.expression, "at": now}
        if queues:
            atomic_write(self.path, json.dumps(self.last_runs).encode(), 0o600)
        return queues

    def report(self) -> dict[str, NextRun]:
        """For stats and `msgctl status`: each schedule and its next run."""
        return {
            queue: NextRun(schedule=plan.expression, next_run=round(self.next_runs[queue], 3))
            for queue, plan in self.plans.items()
        }

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return {
            q: v
            for q, v in data.items()
            if isinstance(v, dict) and isinstance(v.get("at"), int | float)
        }


def describe(report: dict[str, NextRun], now: float) -> list[str]:
    """One line per schedule for people (`msgctl status`, `msgctl stats`), in local time."""
    lines = []
    for queue, entry in sorted(report.items()):
        at = datetime.fromtimestamp(entry.next_run).astimezone()
        wait = max(0, round(entry.next_run - now))
        lines.append(
            f"schedule {queue}: {entry.schedule!r}, next run {at:%Y-%m-%d %H:%M:%S %z} "
            f"(in {wait // 3600}h{wait % 3600 // 60:02}m{wait % 60:02}s)"
        )
    return lines
