"""What every scenario script shares: its command line, probe directories and result figures.

Each system's script (bench/peers/*.py, bench/msgd_bench.py) is run by the driver as
`python SCRIPT SCENARIO --n N --workdir DIR --out FILE [...]` and writes one JSON object to FILE.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator

import probe
from common import latency_figures, tree_memory, wait_for

WARMUP = 4  # warm-up messages sent before a stream, so that no worker is still starting


def parse(scenarios: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=scenarios)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--iterations", type=int, default=0, help="burn() iterations per message")
    p.add_argument(
        "--unit", type=float, default=0.0, help="about how long one message's work takes"
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--redis-url", default="")
    p.add_argument("--backend", default="")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1, help="rounds of interleaved arms")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--no-fsync", action="store_true", help="the system's non-flushing setting")
    p.add_argument("--rate", type=float, default=0.0, help="offered messages/s (stream)")
    p.add_argument("--producers", type=int, default=1, help="producer processes (send)")
    args = p.parse_args()
    args.workdir = os.path.abspath(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    return args


def fresh_probe(workdir: str, capacity: int, name: str = "probe") -> str:
    """An empty probe directory, exported to child processes through the environment."""
    directory = os.path.join(workdir, name)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    os.environ.update(probe.env(directory, capacity))
    return directory


def _check(proc) -> None:
    if proc is not None and proc.poll() is not None:
        raise RuntimeError(f"the system under test exited early (status {proc.returncode})")


def wait_count(
    directory: str, n: int, timeout: float, with_values: bool = False, proc=None
) -> probe.Summary:
    """Wait until handlers have recorded `n` messages; return the final summary.

    `proc`, if given, is the system's process: its early exit ends the wait with an error.
    """

    def done() -> bool:
        _check(proc)
        return probe.summary(directory).count >= n

    wait_for(done, timeout, f"{n} messages handled", 0.01)
    return probe.summary(directory, with_values)


def wait_ready(directory: str, timeout: float = 60.0, proc=None) -> None:
    def ready() -> bool:
        _check(proc)
        return probe.summary(directory).ready >= 1

    wait_for(ready, timeout, "a ready worker", 0.01)


def drain_result(s: probe.Summary, n: int, workers: int = 2, end: float = 0.0) -> dict:
    """Throughput from the first handler start to the last handler end (or to `end`).

    For CPU-bound messages (`s.values` holds each message's `burn()` time, measured in the worker
    that ran it) also the parallel efficiency: n x the median unit / (workers x the span), the
    share of the workers' wall time that went into the unit of work.
    """
    seconds = (end or s.last_done) - s.first_start
    result = {"n": n, "handled": s.count, "seconds": seconds, "msgs_per_s": n / seconds}
    if s.values:
        unit = statistics.median(s.values)
        result.update(
            efficiency=n * unit / (workers * seconds),
            handler_busy_seconds=s.busy,
            unit_ms=unit * 1e3,
        )
    return result


def stream_result(s: probe.Summary, n: int, first_send: float, last_send: float) -> dict:
    """Throughput from the first send to the last handler end; latency per message."""
    seconds = s.last_done - first_send
    return {
        "n": n,
        "handled": s.count,
        "seconds": seconds,
        "msgs_per_s": n / seconds,
        "send_seconds": last_send - first_send,
        **latency_figures(s.values),
    }


def paced(n: int, rate: float) -> Iterator[tuple[int, float]]:
    """(i, timestamp) for `n` messages offered at `rate` per second on a fixed schedule.

    Message i is due at start + i / rate; a producer that falls behind sends at once (no catching
    up by bursts beyond that), so its achieved rate shows whether it sustained the offer.
    """
    start = time.time()
    for i in range(n):
        pause = start + i / rate - time.time()
        if pause > 0:
            time.sleep(pause)  # pacing an offered load, not waiting for a condition
        yield i, time.time()


def produce(send: Callable[[int, float], object], n: int, rate: float) -> tuple[float, float]:
    """Send `n` latency-probe messages at `rate` per second with `send(seq, timestamp)`."""
    first = time.time()
    for i, ts in paced(n, rate):
        send(i, ts)
    return first, time.time()


def timed(call: Callable[[], object], n: int) -> dict:
    """`call()` sends `n` messages: how long it took, and the rate."""
    t = time.perf_counter()
    call()
    seconds = time.perf_counter() - t
    return {"n": n, "seconds": seconds, "msgs_per_s": n / seconds}


def producers(make_send: Callable[[], Callable[[int], object]], processes: int, n: int) -> dict:
    """`processes` forked producers send `n` messages between them, each one at a time.

    `make_send()` runs in each child after the fork (a connection opened before a fork must not be
    shared). The children start together on a pipe's close and report their first and last send
    times; msgs/s = n / (last end - first start).
    """
    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    pids = []
    for w in range(processes):
        pid = os.fork()
        if pid == 0:
            os.close(go_w)  # else no child's read would end: each would hold the pipe open
            os.close(report_r)
            os._exit(_producer_child(make_send, range(w, n, processes), go_r, report_w))
        pids.append(pid)
    os.close(go_r)
    os.close(report_w)
    os.close(go_w)  # the start signal: every child's read returns
    with os.fdopen(report_r) as reports:
        spans = [tuple(map(float, line.split())) for line in reports]
    failures = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    if failures or len(spans) != processes:
        raise RuntimeError(f"{len(failures)} of {processes} producers failed")
    seconds = max(end for _, end in spans) - min(begin for begin, _ in spans)
    return {"n": n, "producers": processes, "seconds": seconds, "msgs_per_s": n / seconds}


def _producer_child(make_send, seqs: range, go_r: int, report_w: int) -> int:
    try:
        send = make_send()
        os.read(go_r, 1)  # returns b"" once the parent closes its end
        begin = time.time()
        for i in seqs:
            send(i)
        os.write(report_w, f"{begin} {time.time()}\n".encode())
        return 0
    except BaseException as e:  # a child must never return into the parent's code
        print(f"producer {os.getpid()}: {e!r}", flush=True)
        return 1


def measure(args, proc, send) -> dict:
    """What every peer does once its consumers run: time the scenario through the probe.

    `send(i, ts)` enqueues message `i` stamped `ts` (drain and CPU-bound messages were enqueued
    before the consumers started)."""
    if args.scenario in ("drain", "cpu"):
        s = wait_count(args.probe, args.n, args.timeout, args.scenario == "cpu", proc)
        return drain_result(s, args.n)
    for _ in range(WARMUP):
        send(-1, 0.0)
    wait_ready(args.probe, proc=proc)
    if args.scenario == "memory":
        time.sleep(1.0)  # measured idle: 1 s after the last warm-up message, not a sync
        return tree_memory(proc.pid)
    first, last = produce(send, args.n, args.rate)
    s = wait_count(args.probe, args.n, args.timeout, with_values=True, proc=proc)
    return stream_result(s, args.n, first, last)
