"""msgd with 50 WebSocket subscribers on its `[http]` listener: the drain and USR1 still on target?

    python bench/subscribers.py drain --n N --samples S --workdir D --out F

Two arms in one run, the same shape: a burst-mode queue holding N durably sent no-op messages,
msgd started and ready, then (arm "fifty") 50 subscribers connected to /ws, subscribed to stats
and events, then USR2: the drain is timed from the first handler start until the spool is empty;
then S USR1 → stats file samples while they stay connected. Arm "none": the same, no subscriber.

Skipped (exit 3, with the reason) while msgd has no `[http]` listener (`msgd --check` rejects
the table) or the websockets library is missing.
"""

from __future__ import annotations

import asyncio
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
from common import free_port, latency_figures, wait_for, write_result  # noqa: E402
from msgd_bench import EXIT_SKIPPED, Daemon, usr1_samples  # noqa: E402

SUBSCRIBERS = 50
HTTP = '\n[http]\nlisten = "127.0.0.1:{port}"\n'
SUBSCRIBE = {"op": "subscribe", "topics": ["stats", "events"]}


def skip_unless_supported(workdir: str) -> None:
    """Exit 3 with one line saying why, unless msgd accepts an [http] table and websockets loads."""
    try:
        import websockets  # noqa: F401
    except ImportError:
        print("the websockets library is not installed (msgd[http])", file=sys.stderr)
        sys.exit(EXIT_SKIPPED)
    d = Daemon(os.path.join(workdir, "check"), extra=HTTP.format(port=free_port()))
    done = subprocess.run([*d.command(), "--check"], capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"msgd has no [http] listener yet: msgd --check says: {why}", file=sys.stderr)
        sys.exit(EXIT_SKIPPED)


class Subscribers:
    """`count` WebSocket subscribers in a process of their own (not the driver's, not msgd's),
    each counting the event frames it receives until stopped."""

    def __init__(self, url: str, count: int, expected: int) -> None:
        code = f"import sys; sys.path.insert(0, {BENCH!r}); import subscribers as s; s.client()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, url, str(count), str(expected)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the subscribers did not connect (status {self.proc.wait()})")

    def stop(self) -> dict[str, list[int]]:
        """Events each subscriber saw and those it was told it missed, once every subscriber
        has accounted for the expected outcomes (or 10 s have passed)."""
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGTERM)
        counts = json.loads(self.proc.stdout.readline() or '{"events": [], "missed": []}')
        self.proc.wait(20)
        return counts

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def client() -> None:
    """The subscribers' process: argv = URL COUNT EXPECTED; prints "ready", then at SIGTERM,
    once each has seen or been told it missed EXPECTED events, the counts."""
    asyncio.run(subscribe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))


async def subscribe(url: str, count: int, expected: int) -> None:
    from websockets.asyncio.client import connect

    conns = [await connected(connect, url) for _ in range(count)]
    events, missed = [0] * count, [0] * count

    async def read(k: int) -> None:
        async for frame in conns[k]:
            f = json.loads(frame)
            if f.get("topic") == "event":
                events[k] += 1
            elif f.get("topic") == "missed":
                missed[k] += f["count"]

    for c in conns:
        await c.send(json.dumps(SUBSCRIBE))
    readers = [asyncio.create_task(read(k)) for k in range(count)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    deadline = time.monotonic() + 10
    while min(e + m for e, m in zip(events, missed, strict=True)) < expected:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)  # polling the counts, bounded by the deadline
    for task in readers:
        task.cancel()
    print(json.dumps({"events": events, "missed": missed}), flush=True)


async def connected(connect, url: str, timeout: float = 10.0):
    """A connection, retried until the listener answers (it starts with the daemon)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await connect(url)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)  # the next attempt; the deadline bounds the wait


def burst_drain(args, subscribers: int) -> dict:
    """One arm: N messages in a burst queue, `subscribers` connected, USR2, USR1 samples."""
    port = free_port()
    d = Daemon(os.path.join(args.workdir, "msgd"), mode="burst", extra=HTTP.format(port=port))
    probe_dir = scenario.fresh_probe(args.workdir, args.n)
    d.send_many([tasks.encode(i) for i in range(args.n)])
    d.start()
    feed = None
    try:
        d.wait_ready()
        if subscribers:
            feed = Subscribers(f"ws://127.0.0.1:{port}/ws", subscribers, args.n)
        d.signal(signal.SIGUSR2)
        s = scenario.wait_count(probe_dir, args.n, args.timeout, proc=d.proc)
        wait_for(d.spool_clean, 60, "new/ and cur/ to be empty", 0.002)
        clean = time.time()
        rewritten, _ = usr1_samples(d, args.samples)
        seen = feed.stop() if feed else {"events": [], "missed": []}
    finally:
        if feed:
            feed.close()
        d.stop()
    result = scenario.drain_result(s, args.n, end=clean)
    accounted = [e + m for e, m in zip(seen["events"], seen["missed"], strict=True)]
    return {
        **result,
        "usr1": latency_figures(rewritten),
        "events_min": min(seen["events"], default=0),
        "missed_max": max(seen["missed"], default=0),
        "accounted_min": min(accounted, default=0),
    }


def main() -> None:
    args = scenario.parse(["drain"])
    skip_unless_supported(args.workdir)
    result = {"none": burst_drain(args, 0), "fifty": burst_drain(args, SUBSCRIBERS)}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
