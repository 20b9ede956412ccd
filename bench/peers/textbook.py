"""Peer 1, the textbook: multiprocessing.Queue with 2 consumer Processes, and multiprocessing.Pool.

In memory, no durability: what two worker processes cost when nothing is written to disk.
Run: python bench/peers/textbook.py {queue,pool}-{drain,stream,cpu} --n N --workdir D --out F
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import scenario
import tasks
from common import write_result

WORKERS = 2


def consumer(q) -> None:
    tasks.run(-1, 0.0, 0)  # ready
    while True:
        item = q.get()
        if item is None:
            return
        tasks.run(*item)


def run_item(item) -> None:
    tasks.run(*item)


def queue_scenario(kind: str, args) -> dict:
    q = mp.Queue()
    procs = [mp.Process(target=consumer, args=(q,)) for _ in range(WORKERS)]
    if kind == "stream":
        for p in procs:
            p.start()
        scenario.wait_ready(args.probe)
        first, last = scenario.produce(lambda i, ts: q.put((i, ts, 0)), args.n, args.rate)
    else:  # pre-enqueued: everything is put before the consumers start
        for i in range(args.n):
            q.put((i, 0.0, args.iterations))
        for p in procs:
            p.start()
    for _ in procs:
        q.put(None)
    s = scenario.wait_count(args.probe, args.n, args.timeout, with_values=kind != "drain")
    for p in procs:
        p.join()
    if kind == "stream":
        return scenario.stream_result(s, args.n, first, last)
    return scenario.drain_result(s, args.n)


def pool_scenario(kind: str, args) -> dict:
    with mp.Pool(WORKERS) as pool:
        pool.map(run_item, [(-1, 0.0, 0)] * WORKERS)  # workers up and warm
        items: Iterable[tuple[int, float, int]]
        if kind == "stream":
            first = time.time()
            items = ((i, ts, 0) for i, ts in scenario.paced(args.n, args.rate))
        else:
            items = [(i, 0.0, args.iterations) for i in range(args.n)]
        for _ in pool.imap(run_item, items):  # default chunksize (1), as the docs show it
            pass
        last = time.time()
        s = scenario.wait_count(args.probe, args.n, args.timeout, with_values=kind != "drain")
    if kind == "stream":
        return scenario.stream_result(s, args.n, first, last)
    return scenario.drain_result(s, args.n)


def main() -> None:
    args = scenario.parse(
        [f"{w}-{k}" for w in ("queue", "pool") for k in ("drain", "stream", "cpu")]
    )
    mp.set_start_method("fork")
    args.probe = scenario.fresh_probe(args.workdir, args.n)
    which, kind = args.scenario.split("-")
    result = (queue_scenario if which == "queue" else pool_scenario)(kind, args)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
