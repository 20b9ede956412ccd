"""The Celery application the worker imports: Redis broker, no result backend."""

from __future__ import annotations

import os

import tasks
from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="job")
def job(seq: int, enqueued: float, iterations: int) -> None:
    tasks.run(seq, enqueued, iterations)
