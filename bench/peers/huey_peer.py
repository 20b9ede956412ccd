"""Peer 2: Huey, SqliteHuey or RedisHuey storage, consumer `-k process -w 2`.

Run (with the bench venv): python bench/peers/huey_peer.py {drain,stream,cpu,memory,send}
    --backend {sqlite,redis} [--no-fsync] [--redis-url URL] --n N --workdir D --out F
send: the producer side only (no consumer): `--samples` task calls one by one and a batch of
`--n` with `task.map` (Huey's batch call), or with `--producers P`, P processes calling one by one.
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


def setup(args) -> dict[str, str]:
    extra = {"BENCH_HUEY_BACKEND": args.backend, "BENCH_HUEY_FSYNC": "0" if args.no_fsync else "1"}
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


def send(args) -> dict:
    """Producer side only, no consumer running: single task calls, then one `map` batch."""
    from huey_app import job

    job(-1, 0.0, 0)  # database created and connection open before timing
    single = scenario.timed(lambda: [job(i, 0.0, 0) for i in range(args.samples)], args.samples)
    batch = scenario.timed(lambda: job.map([(i, 0.0, 0) for i in range(args.n)]), args.n)
    return {"send": single, "send_many": batch}


def make_sender():
    """Run in each producer process after the fork: its own SQLite connection."""
    from huey_app import job

    return lambda i: job(i, 0.0, 0)


def main() -> None:
    args = scenario.parse(["drain", "stream", "cpu", "memory", "send"])
    extra = setup(args)
    args.probe = scenario.fresh_probe(args.workdir, args.n)
    if args.scenario == "send":
        if args.producers > 1:  # forked before this process opens the database
            result = scenario.producers(make_sender, args.producers, args.n)
        else:
            result = send(args)
        write_result(args.out, result)
        return
    from huey_app import huey, job

    huey.flush()
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
