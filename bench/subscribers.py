"""msgd with 50 WebSocket subscribers on its `[http]` listener: the drain and USR1 still on target?

    python bench/subscribers.py drain --n N --samples S --rounds R --workdir D --out F

Three arms, the same shape: a burst-mode queue holding N durably sent no-op messages, msgd
started and ready, then 50 subscribers connected to /ws, subscribed to stats and events, then
USR2: the drain is timed from the first handler start until the spool is empty; then S USR1 →
stats file samples while they stay connected. Arm "none": no subscriber. Arm "fifty": the
clients' process at the lowest priority, standing for browsers on other machines (it takes
only the CPU msgd leaves). Arm "fifty-here": the clients as an ordinary process on the same
cores, competing with msgd (their CPU is then taken from the drain). Arm "none-again": arm "none"
once more, so that a round also tells how far two runs of the same thing differ (the noise of
every ÷ none). The arms run in R rounds,
interleaved (every other round in reverse order); each arm's figures are medians over the
rounds, and each round gives the drain's ratio to arm "none" in that round. The CPU time each
part used during the drain (workers, master, listener, clients) is reported with each arm.

Skipped (exit 3, with the reason) while msgd has no `[http]` listener (`msgd --check` rejects
the table) or the websockets library is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import scenario  # noqa: E402
import tasks  # noqa: E402
from common import children, free_port, latency_figures, wait_for, write_result  # noqa: E402
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
    each counting the event frames it receives until stopped. `elsewhere`: the process runs at
    the lowest priority there is (see client_priority), standing for clients on other machines;
    else as an ordinary process, competing with msgd's for these cores."""

    def __init__(self, url: str, count: int, expected: int, elsewhere: bool) -> None:
        code = f"import sys; sys.path.insert(0, {BENCH!r}); import subscribers as s; s.client()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, url, str(count), str(expected), str(int(elsewhere))],
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
    """The subscribers' process: argv = URL COUNT EXPECTED ELSEWHERE; prints "ready", then at
    SIGTERM, once each has seen or been told it missed EXPECTED events, the counts."""
    if sys.argv[4] == "1":
        client_priority()
    asyncio.run(subscribe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))


def client_priority() -> None:
    """Clients on other machines take no CPU from msgd; here they take only what it leaves:
    SCHED_IDLE, in msgd's session (burst_drain starts msgd in the driver's). The kernel shares
    the CPUs between sessions' autogroups before it looks at a process's policy: clients in a
    session of their own would get as much CPU as all of msgd whatever their policy, while in
    msgd's a waking worker or master preempts them at once."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


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
            elif f.get("op") == "subscribed":
                subscribed[k].set()

    subscribed = [asyncio.Event() for _ in range(count)]
    readers = [asyncio.create_task(read(k)) for k in range(count)]
    for c in conns:
        await c.send(json.dumps(SUBSCRIBE))
    for k in range(count):  # ready once the listener has every subscription: none misses the
        await asyncio.wait_for(subscribed[k].wait(), 30)  # drain's start (and is never told)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    with contextlib.suppress(PermissionError):  # the count is not measured: no more starving
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
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


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, all its threads (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def role(pid: int) -> str:
    """What a child of msgd's master is: its listener (by the process title) or a worker."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    return "listener" if title.startswith("msgd: http") else "workers"


def cpu_by_role(master: int, clients: int | None) -> dict[str, float]:
    """CPU seconds so far of msgd's master, its workers, its listener, and the clients."""
    out = {"master": cpu_seconds(master), "workers": 0.0, "listener": 0.0, "clients": 0.0}
    for pid in children(master):
        out[role(pid)] = out.get(role(pid), 0.0) + cpu_seconds(pid)
    if clients is not None:
        out["clients"] = cpu_seconds(clients)
    out.pop("gone", None)
    return out


def burst_drain(args, subscribers: int, elsewhere: bool) -> dict:
    """One arm: N messages in a burst queue, `subscribers` connected, USR2, USR1 samples."""
    port = free_port()
    d = Daemon(os.path.join(args.workdir, "msgd"), mode="burst", extra=HTTP.format(port=port))
    probe_dir = scenario.fresh_probe(args.workdir, args.n)
    d.send_many([tasks.encode(i) for i in range(args.n)])
    d.start(own_session=False)  # the clients' idle priority then counts against msgd's
    feed = None
    try:
        d.wait_ready()
        if subscribers:
            feed = Subscribers(f"ws://127.0.0.1:{port}/ws", subscribers, args.n, elsewhere)
        clients = feed.proc.pid if feed else None
        before = cpu_by_role(d.proc.pid, clients)
        d.signal(signal.SIGUSR2)
        s = scenario.wait_count(probe_dir, args.n, args.timeout, proc=d.proc)
        wait_for(d.spool_clean, 60, "new/ and cur/ to be empty", 0.002)
        clean = time.time()
        after = cpu_by_role(d.proc.pid, clients)
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
        "cpu_s": {k: round(after[k] - before.get(k, 0.0), 3) for k in after},
    }


ARMS = {
    "none": (0, True),
    "fifty": (SUBSCRIBERS, True),
    "fifty-here": (SUBSCRIBERS, False),
    "none-again": (0, True),
}


def summary(rounds: list[dict[str, dict]]) -> dict:
    """Per arm, the median over the rounds of each figure (the fewest events seen, the most
    missed); per round, each arm's drain ÷ arm "none"'s."""
    out: dict = {arm: medians([r[arm] for r in rounds]) for arm in ARMS}
    for arm in ARMS:
        out[arm]["events_min"] = min(r[arm]["events_min"] for r in rounds)
        out[arm]["missed_max"] = max(r[arm]["missed_max"] for r in rounds)
        out[arm]["accounted_min"] = min(r[arm]["accounted_min"] for r in rounds)
    out["ratios"] = {
        arm: [r[arm]["msgs_per_s"] / r["none"]["msgs_per_s"] for r in rounds] for arm in ARMS
    }
    return out


def medians(found: list[dict]) -> dict:
    """The median of each number in dicts of the same shape (nested dicts too)."""
    out: dict = {}
    for key, value in found[0].items():
        if isinstance(value, dict):
            out[key] = medians([f[key] for f in found])
        elif isinstance(value, int | float):
            out[key] = statistics.median(f[key] for f in found)
    return out


def main() -> None:
    args = scenario.parse(["drain"])
    skip_unless_supported(args.workdir)
    rounds = []
    for k in range(args.rounds):
        order = list(ARMS) if k % 2 == 0 else list(reversed(ARMS))
        rounds.append({arm: burst_drain(args, *ARMS[arm]) for arm in order})
    write_result(args.out, summary(rounds))


if __name__ == "__main__":
    main()
