"""Peer 2: Huey, SqliteHuey or RedisHuey storage, consumer `-k process -w 2`.

Run (with the bench venv): python bench/peers/huey_peer.py {drain,stream,cpu,memory,enqueue}
    --backend {sqlite,redis} [--redis-url URL] --n N --workdir D --out F
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import launch
import scenario
from common import write_result

WORKERS = 2


def setup(args) -> dict[str, str]:
    extra = {"BENCH_HUEY_BACKEND": args.backend}
    if args.backend == "redis":
        extra["BENCH_REDIS_URL"] = args.redis_url
    else:
        db = os.path.join(args.workdir, "huey.db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.unlink(db + suffix)
        extra["BENCH_HUEY_DB"] = db
    os.environ.update(extra)
    return extra


def consumer(args, extra):
    argv = [launch.tool("huey_consumer"), "huey_app.huey", "-k", "process", "-w", str(WORKERS)]
    return launch.start(argv, extra, os.path.join(args.workdir, "huey-consumer.log"))


def main() -> None:
    args = scenario.parse(["drain", "stream", "cpu", "memory", "enqueue"])
    extra = setup(args)
    args.probe = scenario.fresh_probe(args.workdir, args.n)
    from huey_app import huey, job

    huey.flush()
    if args.scenario == "enqueue":  # producer side only, no consumer running
        t = time.perf_counter()
        for i in range(args.n):
            job(i, 0.0, 0)
        seconds = time.perf_counter() - t
        write_result(args.out, {"n": args.n, "seconds": seconds, "msgs_per_s": args.n / seconds})
        return
    if args.scenario in ("drain", "cpu"):
        for i in range(args.n):
            job(i, 0.0, args.iterations)
    proc = consumer(args, extra)
    try:
        result = scenario.measure(args, proc, lambda i, ts: job(i, ts, 0))
    finally:
        launch.stop(proc)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
