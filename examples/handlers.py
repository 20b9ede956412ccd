"""Example handlers for examples/msgd.toml."""

import structlog

import msgd

log = structlog.get_logger()


def echo(message: msgd.Message) -> None:
    """Log each message; a body starting with b"reject" is refused for good."""
    if message.body.startswith(b"reject"):
        raise msgd.Reject("asked to reject")
    log.info("message", queue=message.queue, id=message.id, attempt=message.attempt,
             size=len(message.body))
