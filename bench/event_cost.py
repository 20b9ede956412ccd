"""What the outcome event feed costs a worker per message: events.EventWriter begin + end.

    python bench/event_cost.py [--n N]

Prints one JSON object: the best of 5 rounds of N messages, in nanoseconds of this thread's CPU
time (a busy machine stretches wall-clock time, not the work done).
"""

from __future__ import annotations

import argparse
import json
import time

from msgd.events import Rings

MESSAGE_ID = "18ecfa641bb01db994ee7309"  # a spool id: 24 characters


def event_cost(n: int) -> dict[str, float]:
    writer = Rings().writer(0)
    best = float("inf")
    for _ in range(5):
        t0 = time.thread_time_ns()
        for i in range(n):
            writer.begin(0, 0, MESSAGE_ID, 1, i)
            writer.end(0, 0)
        best = min(best, (time.thread_time_ns() - t0) / n)
    return {"n": n, "ns_per_message": round(best, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200_000)
    print(json.dumps(event_cost(p.parse_args().n)))


if __name__ == "__main__":
    main()
