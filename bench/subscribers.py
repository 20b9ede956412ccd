"""The "with 50 subscribers" row: drain rate and signal latency while WebSocket clients watch.

    python bench/subscribers.py subscribers --n N --samples S --workdir D --out F [--clients C]
    python bench/subscribers.py event-cost --n N --workdir D --out F

`subscribers` starts msgd with an [http] listener and C clients (default 50, in a process of
their own) subscribed to stats and every outcome event, then measures what msgd_bench.py's
drain and usr1 scenarios measure: kill -USR1 -> stats file rewritten and -> the action's task
running, and N messages drained by 2 workers. `--clients 0` is the same run without anyone
connected (the figure to compare with). The clients report how many events they received and
how many they were told they missed. `event-cost` times what a worker pays per message for the
feed (events.EventWriter begin + end).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import scenario  # noqa: E402
import tasks  # noqa: E402
from common import latency_figures, wait_for, write_result  # noqa: E402
from msgd_bench import Daemon, read_json, usr1_samples  # noqa: E402

CLIENTS = """
import asyncio, json, sys, time
from websockets.asyncio.client import connect

async def client(url, counts):
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({{"op": "subscribe", "topics": ["stats", "events"]}}))
        counts["connected"] += 1
        async for frame in ws:
            f = json.loads(frame)
            if f.get("topic") == "event":
                counts["events"] += 1
            elif f.get("topic") == "missed":
                counts["missed"] += f["count"]

async def main():
    counts = {{"connected": 0, "events": 0, "missed": 0}}
    tasks = [asyncio.create_task(client({url!r}, counts)) for _ in range({clients})]
    while counts["connected"] < {clients}:
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    expected = int(sys.stdin.readline())  # outcome events each client should see or be told of
    while counts["events"] + counts["missed"] < expected * {clients}:
        await asyncio.sleep(0.005)
    counts["all_seen_at"] = time.time()
    print(json.dumps(counts), flush=True)

asyncio.run(main())
"""


def with_listener(d: Daemon) -> None:
    with open(d.config, "a") as f:
        f.write('\n[http]\nlisten = "127.0.0.1:0"\n')


def start_clients(address: str, clients: int) -> subprocess.Popen | None:
    if not clients:
        return None
    code = CLIENTS.format(url=f"ws://{address}/ws", clients=clients)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    if proc.stdout is None or proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the WebSocket clients did not connect")
    return proc


def feed_caught_up(proc: subprocess.Popen | None, n: int, last_done: float) -> dict:
    """Wait until every client has seen (or been told it missed) each of the n outcomes."""
    if proc is None:
        return {}
    out, _ = proc.communicate(f"{n}\n", timeout=300)
    counts = json.loads(out.strip().splitlines()[-1])
    counts["caught_up_after_drain_s"] = counts.pop("all_seen_at") - last_done
    return counts


def subscribers(args) -> dict:
    """USR1 latencies (idle, C clients connected), then N messages drained while they watch."""
    d = Daemon(os.path.join(args.workdir, "msgd"), mode="burst")
    with_listener(d)
    probe_dir = scenario.fresh_probe(args.workdir, args.n)
    d.start()
    clients = None
    try:
        state = d.wait_ready()
        wait_for(lambda: read_json(d.stats_file), 10, "the first stats file")
        clients = start_clients(state["http"], args.clients)
        rewritten, running = usr1_samples(d, args.samples)
        d.send_many([tasks.encode(i) for i in range(args.n)])
        d.signal(signal.SIGUSR2)  # a burst: both workers start on the full queue at once
        s = scenario.wait_count(probe_dir, args.n, args.timeout, proc=d.proc)
        seen = feed_caught_up(clients, args.n, s.last_done)
    finally:
        if clients is not None and clients.poll() is None:
            clients.kill()
        d.stop()
    return {
        "clients": args.clients,
        "usr1_rewritten": latency_figures(rewritten),
        "usr1_task_running": latency_figures(running),
        "drain": scenario.drain_result(s, args.n),
        "feed": seen,
    }


def event_cost(args) -> dict:
    """Nanoseconds a worker spends on the feed per message: EventWriter.begin + end."""
    from msgd.events import Rings

    writer = Rings().writer(0)
    mid = "18ecfa641bb01db994ee7309"
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for i in range(args.n):
            writer.begin(0, 0, mid, 1, i)
            writer.end(0, 0)
        best = min(best, (time.perf_counter_ns() - t0) / args.n)
    return {"n": args.n, "ns_per_message": round(best, 1)}


SCENARIOS = {"subscribers": subscribers, "event-cost": event_cost}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=list(SCENARIOS))
    p.add_argument("--clients", type=int, default=50)
    argv = sys.argv[1:]
    known, rest = p.parse_known_args(argv)
    sys.argv = [sys.argv[0], known.scenario, *rest]
    args = scenario.parse(list(SCENARIOS))
    args.clients = known.clients
    write_result(args.out, SCENARIOS[args.scenario](args))


if __name__ == "__main__":
    main()
