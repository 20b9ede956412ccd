"""When a message may start, until when it is worth starting, and which comes first.

Producers say it with `delay=` or `at=`, `ttl=` and `priority=` (msgd.send, msgctl send); this
module checks those words once and turns them into one `SendOptions`, in absolute epoch seconds,
which every store's `send_many` receives. A store never sees a relative time, so a batch sent
slowly is not due later message by message.
"""

from __future__ import annotations

import math
import time
from datetime import datetime

import msgspec

MAX_PRIORITY = 9


class SendOptions(msgspec.Struct, frozen=True, kw_only=True):
    """A batch's timing and priority; the default is "now, forever, priority 0"."""

    due: float = 0.0  # epoch seconds before which it must not start; 0: at once
    expires: float = 0.0  # epoch seconds after which it is never started (a dead letter); 0: never
    priority: int = 0  # 0-9, higher first


NOW = SendOptions()


def send_options(
    *,
    delay: float | None = None,
    at: datetime | str | float | None = None,
    ttl: float | None = None,
    priority: int = 0,
    now: float | None = None,
) -> SendOptions:
    """Check a producer's words and resolve them against `now`; raises ValueError naming the
    word at fault. A due time in the past means now; `ttl` counts from the due time."""
    now = time.time() if now is None else now
    if delay is not None and at is not None:
        raise ValueError("delay and at: give one or the other")
    due = now + _seconds("delay", delay) if delay is not None else _instant(at) if at else now
    due = 0.0 if due <= now else due
    expires = (due or now) + _seconds("ttl", ttl, positive=True) if ttl is not None else 0.0
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority: expected an integer 0-{MAX_PRIORITY}, got {priority!r}")
    if not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority: expected 0-{MAX_PRIORITY}, got {priority}")
    return SendOptions(due=due, expires=expires, priority=priority)


def _seconds(word: str, value: object, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{word}: expected a number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{word}: expected seconds {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def _instant(at: datetime | str | float) -> float:
    """Epoch seconds of `at`: a datetime or an ISO 8601 text (local time without a zone), or
    epoch seconds."""
    if isinstance(at, str):
        try:
            at = datetime.fromisoformat(at.strip())
        except ValueError:
            raise ValueError(f"at: not an ISO 8601 time: {at!r}") from None
    if isinstance(at, datetime):
        return at.timestamp()  # a naive datetime is local time
    return _seconds("at", at)
