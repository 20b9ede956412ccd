"""Finding a queue's store from the config, for programs and msgctl that send messages."""

from __future__ import annotations

import os
from functools import lru_cache

from msgd.backend import Store, open_store
from msgd.config import ConfigError, default_path
from msgd.config import load as load_config


def store_for(config_path: str | None, queue: str) -> Store:
    path = os.path.abspath(config_path or default_path())
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    return _cached(path, mtime, queue)


@lru_cache(maxsize=16)
def _cached(path: str, mtime_ns: int, queue: str) -> Store:
    """Parse the config once per version of the file, not once per message, and keep the store
    (a broker's connection) for the next send.

    `mtime_ns` is not read: it is part of the cache key, so an edited file is parsed again.
    """
    config = load_config(path)
    if queue not in config.queues:
        raise ConfigError(f"queues.{queue}: no such queue in {path}")
    return open_store(queue, config.queues[queue], config.daemon)
