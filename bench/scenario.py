"""What every scenario script shares: its command line, probe directories and result figures.

Each system's script (bench/peers/*.py, bench/msgd_bench.py) is run by the driver as
`python SCRIPT SCENARIO --n N --workdir DIR --out FILE [...]` and writes one JSON object to FILE.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import probe
from common import latency_figures, tree_memory, unit_time, wait_for

WARMUP = 4  # warm-up messages sent before a stream, so that no worker is still starting


def parse(scenarios: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=scenarios)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--iterations", type=int, default=0, help="burn() iterations per message")
    p.add_argument("--unit", type=float, default=0.0, help="seconds one message's work takes")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--redis-url", default="")
    p.add_argument("--backend", default="")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    if args.iterations:  # timed again here, just before the run: this machine's speed drifts by
        args.unit = unit_time(args.iterations)  # several % over minutes, for every system alike
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


def drain_result(
    s: probe.Summary, n: int, unit: float = 0.0, workers: int = 2, end: float = 0.0
) -> dict:
    """Throughput from the first handler start to the last handler end (or to `end`)."""
    seconds = (end or s.last_done) - s.first_start
    result = {"n": n, "handled": s.count, "seconds": seconds, "msgs_per_s": n / seconds}
    if unit:
        ideal = n * unit / workers
        result.update(
            ideal_seconds=ideal,
            efficiency=ideal / seconds,
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


def produce(send, n: int) -> tuple[float, float]:
    """Send `n` latency-probe messages as fast as `send(seq, timestamp)` allows."""
    first = time.time()
    for i in range(n):
        send(i, time.time())
    return first, time.time()


def measure(args, proc, send) -> dict:
    """What every peer does once its consumers run: time the scenario through the probe.

    `send(i, ts)` enqueues message `i` stamped `ts` (drain and CPU-bound messages were enqueued
    before the consumers started)."""
    if args.scenario in ("drain", "cpu"):
        s = wait_count(args.probe, args.n, args.timeout, proc=proc)
        return drain_result(s, args.n, args.unit)
    for _ in range(WARMUP):
        send(-1, 0.0)
    wait_ready(args.probe, proc=proc)
    if args.scenario == "memory":
        time.sleep(1.0)  # measured idle: 1 s after the last warm-up message, not a sync
        return tree_memory(proc.pid)
    first, last = produce(send, args.n)
    s = wait_count(args.probe, args.n, args.timeout, with_values=True, proc=proc)
    return stream_result(s, args.n, first, last)
