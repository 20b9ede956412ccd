"""msgd: work messages from durable queues with a pool of worker processes, steered by signals.

For programs that produce messages:

    import msgd
    mid = msgd.send(b"payload", queue="default", config="/etc/msgd/msgd.toml")
    ids = msgd.send_many([b"a", b"b"], queue="default")   # one flush for the whole batch

and for handlers: `msgd.Message` (what a handler receives) and `msgd.Reject` (fail for good).
"""

from __future__ import annotations

from collections.abc import Iterable

__version__ = "0.1.0"

from msgd.handlers import Message, Reject

__all__ = ["Message", "Reject", "send", "send_many"]


def send(body: bytes, queue: str = "default", config: str | None = None) -> str:
    """Enqueue one message durably; returns its id. The daemon need not be running."""
    return send_many([body], queue, config)[0]


def send_many(
    bodies: Iterable[bytes], queue: str = "default", config: str | None = None
) -> list[str]:
    """Enqueue a batch durably with one flush; returns the ids in order."""
    from msgd.producer import store_for

    return store_for(config, queue).send_many(list(bodies))
