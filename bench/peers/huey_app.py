"""The Huey application the consumer imports: storage chosen by the environment.

BENCH_HUEY_BACKEND=sqlite (BENCH_HUEY_DB = database file) or redis (BENCH_REDIS_URL).
SQLite runs in Huey's default WAL mode with fsync=True (synchronous=FULL: a flush per commit,
enqueue and dequeue alike), the durable setting to set against msgd's `fsync = true`; with
BENCH_HUEY_FSYNC=0, fsync=False (synchronous=OFF: nothing flushed). No result store: like msgd,
a handler's return value is dropped.
"""

from __future__ import annotations

import os

import tasks
from huey import RedisHuey, SqliteHuey

if os.environ.get("BENCH_HUEY_BACKEND", "sqlite") == "redis":
    huey = RedisHuey("bench", url=os.environ["BENCH_REDIS_URL"], results=False)
else:
    fsync = os.environ.get("BENCH_HUEY_FSYNC", "1") == "1"
    huey = SqliteHuey("bench", filename=os.environ["BENCH_HUEY_DB"], fsync=fsync, results=False)


@huey.task()
def job(seq: int, enqueued: float, iterations: int) -> None:
    tasks.run(seq, enqueued, iterations)
