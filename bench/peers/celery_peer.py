"""Peer 3: Celery, prefork pool with concurrency 2, Redis broker, no result backend.

Run (with the bench venv): python bench/peers/celery_peer.py {drain,stream,cpu,memory}
    --redis-url URL --n N --workdir D --out F
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import launch
import scenario
from common import write_result

WORKERS = 2


def worker(args):
    argv = [
        launch.tool("celery"),
        "-A",
        "celery_app",
        "worker",
        "-P",
        "prefork",
        "-c",
        str(WORKERS),
        "-l",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    extra = {"BENCH_REDIS_URL": args.redis_url}
    return launch.start(argv, extra, os.path.join(args.workdir, "celery-worker.log"))


def main() -> None:
    args = scenario.parse(["drain", "stream", "cpu", "memory"])
    os.environ["BENCH_REDIS_URL"] = args.redis_url
    args.probe = scenario.fresh_probe(args.workdir, args.n)
    from celery_app import app, job

    with app.connection_for_write() as conn:
        conn.default_channel.client.flushdb()
    if args.scenario in ("drain", "cpu"):
        for i in range(args.n):
            job.delay(i, 0.0, args.iterations)
    proc = worker(args)
    try:
        result = scenario.measure(args, proc, lambda i, ts: job.delay(i, ts, 0))
    finally:
        launch.stop(proc)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
