"""Finding where a queue lives from the config, for programs and msgctl that send messages."""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import lru_cache
from typing import Protocol

from msgd.config import ConfigError, default_path
from msgd.config import load as load_config
from msgd.spool import Spool


class Producer(Protocol):
    def send_many(self, queue: str, bodies: Iterable[bytes]) -> list[str]: ...


def producer_for(config_path: str | None, queue: str) -> Producer:
    path = os.path.abspath(config_path or default_path())
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    return _cached(path, mtime, queue)


@lru_cache(maxsize=16)
def _cached(path: str, mtime_ns: int, queue: str) -> Producer:
    """Parse the config once per version of the file, not once per message.

    `mtime_ns` is not read: it is part of the cache key, so an edited file is parsed again.
    """
    config = load_config(path)
    if queue not in config.queues:
        raise ConfigError(f"queues.{queue}: no such queue in {path}")
    policy = config.queues[queue]
    if policy.backend == "redis":
        from msgd.redisq import RedisProducer  # redis-py only for programs that need it

        return RedisProducer(policy, queue)
    return Spool.from_config(config)
