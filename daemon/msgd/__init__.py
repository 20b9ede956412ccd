"""msgd: work messages from durable queues with a pool of worker processes, steered by signals.

For programs that produce messages:

    import msgd
    mid = msgd.send(b"payload", queue="default", config="/etc/msgd/msgd.toml")
    ids = msgd.send_many([b"a", b"b"], queue="default")   # one flush for the whole batch
    msgd.send(b"later", delay=60, ttl=3600, priority=9)   # or at=datetime / ISO 8601 text

and for handlers: `msgd.Message` (what a handler receives) and `msgd.Reject` (fail for good).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

__version__ = "0.1.0"

from msgd.handlers import Message, Reject

__all__ = ["Message", "Reject", "send", "send_many"]


def send(body: bytes, queue: str = "default", config: str | None = None, **when: Any) -> str:
    """Enqueue one message durably; returns its id. The daemon need not be running. `when`:
    send_many's delay, at, ttl and priority."""
    return send_many([body], queue, config, **when)[0]


def send_many(
    bodies: Iterable[bytes],
    queue: str = "default",
    config: str | None = None,
    *,
    delay: float | None = None,
    at: datetime | str | float | None = None,
    ttl: float | None = None,
    priority: int = 0,
) -> list[str]:
    """Enqueue a batch durably with one flush; returns the ids in order.

    `delay` (seconds) or `at` (a datetime, ISO 8601 text, local time without a zone, or epoch
    seconds): not started before then. `ttl` (seconds, from when it is due): never started
    after that, a dead letter instead. `priority` 0-9: higher first. ValueError for bad values.
    """
    from msgd.producer import store_for
    from msgd.when import send_options

    options = send_options(delay=delay, at=at, ttl=ttl, priority=priority)
    return store_for(config, queue).send_many(list(bodies), options)
