"""Live counters shared by workers and master, and what is made of them.

Layout: `multiprocessing.Array('Q', lock=False)` segments of fixed-size slots, one slot per worker.
A worker writes only its own slot, so no update is lost and no lock is taken (~0.1 µs a write,
against ~0.5-1 µs for a locked Value). A replacement worker inherits its predecessor's slot and the
master sums all slots, so totals never go backwards. More segments are added when the pool outgrows
the slots allocated.

    slot = [pid] [runner 0..MAX_RUNNERS-1: queue+1, start (monotonic ns), crc32(name)]
           [queue 0..MAX_QUEUES-1: 5 outcomes, busy ns, latency histogram]
"""

from __future__ import annotations

import math
import multiprocessing
import threading
import time
import zlib
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from msgd import schedule
from msgd.config import MAX_QUEUES, MAX_RUNNERS

OUTCOMES = ("succeeded", "retried", "failed", "rejected", "timed_out")
SUCCEEDED, RETRIED, FAILED, REJECTED, TIMED_OUT = range(5)
BUSY_NS = 5
HIST = 6
HIST_BASE_NS = 50_000  # bucket k holds durations up to 50 µs * 2**k
BUCKETS = 22  # 50 µs ... 52 s, and a last bucket for anything longer
BUCKET_BOUNDS = [HIST_BASE_NS * 2**k / 1e9 for k in range(BUCKETS - 1)]  # seconds
QUEUE_BLOCK = HIST + BUCKETS
RUNNER_BLOCK = 3
RUNNERS = 1
QUEUES = RUNNERS + MAX_RUNNERS * RUNNER_BLOCK
SLOT = QUEUES + MAX_QUEUES * QUEUE_BLOCK
SLOTS_PER_SEGMENT = 16


def bucket(duration_ns: int) -> int:
    """The first bucket whose bound is >= the duration (Prometheus' `le` includes the bound)."""
    k = ((duration_ns - 1) // HIST_BASE_NS).bit_length() if duration_ns > 0 else 0
    return k if k < BUCKETS else BUCKETS - 1  # no min()/max(): this runs once per message


class SlotWriter:
    """A worker's handle on its own slot: the only code that writes it while the worker lives."""

    def __init__(self, segment: Any, slot: int) -> None:
        self.a = memoryview(segment).cast("B").cast("Q")  # ~45 ns an update; ctypes' ~55
        self.base = (slot % SLOTS_PER_SEGMENT) * SLOT
        self.lock: threading.Lock | None = None  # see shared_by_threads

    def shared_by_threads(self) -> None:
        """`a[i] += 1` is a read and a write: the runner threads of one worker (threads > 1)
        could interleave there, so their updates take a lock; a lone runner needs none."""
        self.lock = threading.Lock()

    def start(self, runner: int, queue: int, name: str) -> int:
        """Mark `runner` busy with `name`; returns the start time (monotonic ns)."""
        r = self.base + RUNNERS + runner * RUNNER_BLOCK
        now = time.monotonic_ns()
        self.a[r + 1] = now
        self.a[r + 2] = zlib.crc32(name.encode())
        self.a[r] = queue + 1
        return now

    def intend(self, runner: int, queue: int, outcome: int) -> None:
        """Say, in the same word that marks the run busy (one store), which outcome `runner` is
        about to make durable: a worker killed between that and finish() is counted by the
        master's settlement, which sees the effect happened (pool.settle)."""
        self.a[self.base + RUNNERS + runner * RUNNER_BLOCK] = queue + 1 + ((outcome + 1) << 16)

    def finish(
        self, runner: int, queue: int, outcome: int, started: int, rejected: bool = False
    ) -> None:
        elapsed = time.monotonic_ns() - started
        q = self.base + QUEUES + queue * QUEUE_BLOCK
        a, lock = self.a, self.lock
        if lock is not None:
            lock.acquire()
        a[q + outcome] += 1
        if rejected:
            a[q + REJECTED] += 1
        a[q + BUSY_NS] += elapsed
        a[q + HIST + bucket(elapsed)] += 1
        if lock is not None:
            lock.release()
        a[self.base + RUNNERS + runner * RUNNER_BLOCK] = 0

    def count(self, queue: int, outcome: int, n: int = 1) -> None:
        """An outcome settled by the master on behalf of a dead worker (timeouts, kills)."""
        self.a[self.base + QUEUES + queue * QUEUE_BLOCK + outcome] += n

    def set_pid(self, pid: int) -> None:
        self.a[self.base] = pid
        for r in range(MAX_RUNNERS):
            self.a[self.base + RUNNERS + r * RUNNER_BLOCK] = 0


@dataclass
class Counters:
    """The master's side: allocates segments and reads every slot."""

    segments: list[Any] = field(default_factory=list)

    def writer(self, slot: int) -> SlotWriter:
        while slot >= len(self.segments) * SLOTS_PER_SEGMENT:
            self.segments.append(multiprocessing.Array("Q", SLOTS_PER_SEGMENT * SLOT, lock=False))
        return SlotWriter(self.segments[slot // SLOTS_PER_SEGMENT], slot)

    def read(self) -> list[array]:
        """A copy of every slot (one memcpy per segment: a few µs)."""
        slots = []
        for segment in self.segments:
            data = array("Q", bytes(memoryview(segment)))
            slots.extend(data[i * SLOT : (i + 1) * SLOT] for i in range(SLOTS_PER_SEGMENT))
        return slots


@dataclass
class Running:
    """One handler run in progress, as read from a slot."""

    queue: int
    started_ns: int
    crc: int
    intended: int | None = None  # the outcome being made durable (SlotWriter.intend), if any


def running(slot: array) -> list[Running]:
    out = []
    for r in range(MAX_RUNNERS):
        base = RUNNERS + r * RUNNER_BLOCK
        if word := slot[base]:
            intended = (word >> 16) - 1 if word >> 16 else None
            out.append(Running((word & 0xFFFF) - 1, slot[base + 1], slot[base + 2], intended))
    return out


def queue_block(slot: array, queue: int) -> array:
    start = QUEUES + queue * QUEUE_BLOCK
    return slot[start : start + QUEUE_BLOCK]


def percentile(hist: list[int], q: float) -> float | None:
    """Upper bound (seconds) of the bucket holding the q-th quantile; None without data."""
    total = sum(hist)
    if not total:
        return None
    rank, seen = q * total, 0
    for k, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return BUCKET_BOUNDS[min(k, BUCKETS - 2)] * (2 if k == BUCKETS - 1 else 1)
    return None


class Rates:
    """Messages per second over 1, 5 and 15 minutes, like the load average."""

    WINDOWS = {"1m": 60.0, "5m": 300.0, "15m": 900.0}

    def __init__(self) -> None:
        self.rates = dict.fromkeys(self.WINDOWS, 0.0)
        self.last: tuple[float, int] | None = None

    def update(self, total: int, now: float) -> dict[str, float]:
        if self.last is not None and now > self.last[0]:
            dt = now - self.last[0]
            instant = (total - self.last[1]) / dt
            for key, window in self.WINDOWS.items():
                decay = math.exp(-dt / window)
                self.rates[key] = self.rates[key] * decay + instant * (1 - decay)
        self.last = (now, total)
        return {k: round(v, 2) for k, v in self.rates.items()}


def snapshot(
    *,
    slots: list[array],
    queue_index: Mapping[str, int],
    workers: Iterable[tuple[int, int, list[str]]],
    depths: Mapping[str, dict[str, int]],
    rates: Rates,
    info: dict[str, Any],
) -> dict[str, Any]:
    """The whole picture as one JSON-able dict: what the stats file, the log and msgctl show.

    `workers` is (slot, pid, names in progress) for each live worker; `info` carries the
    daemon-wide facts (pid, uptime, generation, reloads...).
    """
    queues: dict[str, Any] = {}
    total_hist = [0] * BUCKETS
    totals = dict.fromkeys(OUTCOMES, 0)
    for name, index in sorted(queue_index.items()):
        counts = [0] * QUEUE_BLOCK
        for slot in slots:
            for i, v in enumerate(queue_block(slot, index)):
                counts[i] += v
        hist = counts[HIST:]
        entry = {o: counts[i] for i, o in enumerate(OUTCOMES)}
        entry["busy_seconds"] = round(counts[BUSY_NS] / 1e9, 3)
        entry["histogram"] = hist
        entry["latency_ms"] = _latency(hist)
        entry["depth"] = depths.get(name, dict.fromkeys(("new", "cur", "defer", "failed"), 0))
        queues[name] = entry
        for o in OUTCOMES:
            totals[o] += entry[o]
        total_hist = [a + b for a, b in zip(total_hist, hist, strict=True)]
    per_worker = []
    now_ns = time.monotonic_ns()
    by_index = {i: n for n, i in queue_index.items()}
    for slot_no, pid, current in workers:
        slot = slots[slot_no]
        done = [0] * len(OUTCOMES)
        for index in queue_index.values():
            block = queue_block(slot, index)
            done = [a + b for a, b in zip(done, block[: len(OUTCOMES)], strict=True)]
        runs = running(slot)
        per_worker.append(
            {
                "slot": slot_no,
                "pid": pid,
                "state": "busy" if runs else "idle",
                **dict(zip(OUTCOMES, done, strict=True)),
                "current": [
                    {
                        "queue": by_index.get(r.queue, "?"),
                        "id": _match(current, r.crc),
                        "seconds": round((now_ns - r.started_ns) / 1e9, 3),
                    }
                    for r in runs
                ],
            }
        )
    processed = totals["succeeded"] + totals["retried"] + totals["failed"]
    return {
        **info,
        "totals": totals,
        "processed": processed,
        "pending": sum(q["depth"]["new"] + q["depth"]["defer"] for q in queues.values()),
        "in_flight": sum(q["depth"]["cur"] for q in queues.values()),
        "rates": rates.update(processed, time.monotonic()),
        "latency_ms": _latency(total_hist),
        "histogram_bounds_s": BUCKET_BOUNDS,
        "queues": queues,
        "workers": per_worker,
    }


def _latency(hist: list[int]) -> dict[str, float | None]:
    out = {}
    for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        p = percentile(hist, q)
        out[key] = None if p is None else round(p * 1000, 3)
    return out


def _match(names: list[str], crc: int) -> str:
    for name in names:
        if zlib.crc32(name.encode()) == crc:
            return name.partition("@")[0]
    return ""


# -- formats: one line, a table, Prometheus -------------------------------------------------------


def summary(snap: Mapping[str, Any]) -> str:
    """The one line for the process title and systemd's STATUS."""
    t = snap["totals"]
    return (
        f"{len(snap['workers'])} workers, {t['succeeded']} done, {t['failed']} failed, "
        f"{snap['pending']} pending"
    )


def table(snap: Mapping[str, Any]) -> str:
    """What `msgctl stats` prints: readable at a glance."""
    t, r, lat = snap["totals"], snap["rates"], snap["latency_ms"]
    lines = [
        f"msgd pid {snap.get('pid')}  up {duration(snap.get('uptime', 0))}  "
        f"workers {len(snap['workers'])}  reloads {snap.get('reloads', 0)}  "
        f"stats generation {snap.get('generation', 0)}",
        f"totals   succeeded {t['succeeded']}  retried {t['retried']}  failed {t['failed']}  "
        f"(rejected {t['rejected']}, timed out {t['timed_out']})",
        f"rate/s   1m {r['1m']}  5m {r['5m']}  15m {r['15m']}",
        f"handler  p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  p99 {_ms(lat['p99'])}",
        "",
        # Waiting in the spool (DEAD: dead letters in failed/) | runs so far | handler time.
        f"{'QUEUE':<20} {'NEW':>7} {'CUR':>5} {'DEFER':>6} {'DEAD':>6} | {'SUCCEEDED':>9} "
        f"{'RETRIED':>8} {'FAILED':>7} | {'P50':>9} {'P99':>9}",
    ]
    for name, q in snap["queues"].items():
        d = q["depth"]
        lines.append(
            f"{name:<20} {d['new']:>7} {d['cur']:>5} {d['defer']:>6} {d['failed']:>6} | "
            f"{q['succeeded']:>9} {q['retried']:>8} {q['failed']:>7} | "
            f"{_ms(q['latency_ms']['p50']):>9} {_ms(q['latency_ms']['p99']):>9}"
        )
    if snap.get("schedules"):
        lines += ["", *schedule.describe(snap["schedules"], snap.get("time", time.time()))]
    lines += ["", f"{'SLOT':>4} {'PID':>8} {'STATE':<5} {'SUCCEEDED':>9} {'FAILED':>7}  CURRENT"]
    for w in snap["workers"]:
        current = ", ".join(f"{c['queue']} {c['id']} {c['seconds']:.1f}s" for c in w["current"])
        lines.append(
            f"{w['slot']:>4} {w['pid']:>8} {w['state']:<5} {w['succeeded']:>9} "
            f"{w['failed']:>7}  {current}"
        )
    return "\n".join(lines)


def prometheus(snap: Mapping[str, Any]) -> str:
    """The Prometheus text exposition format, for node_exporter's textfile collector."""
    out = [
        "# HELP msgd_up Whether msgd was running when this was written.",
        "# TYPE msgd_up gauge",
        f"msgd_up {1 if snap.get('pid') else 0}",
        "# HELP msgd_workers Worker processes running.",
        "# TYPE msgd_workers gauge",
        f"msgd_workers {len(snap['workers'])}",
        "# HELP msgd_messages_total Handler runs by outcome.",
        "# TYPE msgd_messages_total counter",
    ]
    queues = snap["queues"]
    for name, q in queues.items():
        for outcome in ("succeeded", "retried", "failed"):
            out.append(f'msgd_messages_total{{queue="{name}",outcome="{outcome}"}} {q[outcome]}')
    out += [
        "# HELP msgd_rejected_total Messages rejected by their handler.",
        "# TYPE msgd_rejected_total counter",
    ]
    out += [f'msgd_rejected_total{{queue="{n}"}} {q["rejected"]}' for n, q in queues.items()]
    out += [
        "# HELP msgd_timed_out_total Handler runs killed for exceeding the timeout.",
        "# TYPE msgd_timed_out_total counter",
    ]
    out += [f'msgd_timed_out_total{{queue="{n}"}} {q["timed_out"]}' for n, q in queues.items()]
    out += [
        "# HELP msgd_queue_depth Messages in each spool state.",
        "# TYPE msgd_queue_depth gauge",
    ]
    for name, q in queues.items():
        for state, n in q["depth"].items():
            out.append(f'msgd_queue_depth{{queue="{name}",state="{state}"}} {n}')
    out += [
        "# HELP msgd_handler_seconds Handler run time.",
        "# TYPE msgd_handler_seconds histogram",
    ]
    for name, q in queues.items():
        cumulative = 0
        for bound, n in zip([*BUCKET_BOUNDS, math.inf], q["histogram"], strict=True):
            cumulative += n
            le = "+Inf" if bound == math.inf else repr(bound)
            out.append(f'msgd_handler_seconds_bucket{{queue="{name}",le="{le}"}} {cumulative}')
        out.append(f'msgd_handler_seconds_sum{{queue="{name}"}} {q["busy_seconds"]}')
        out.append(f'msgd_handler_seconds_count{{queue="{name}"}} {cumulative}')
    return "\n".join(out) + "\n"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:g}ms"


def duration(seconds: float) -> str:
    s = int(seconds)
    return (
        f"{s // 86400}d{s % 86400 // 3600:02}h"
        if s >= 86400
        else (f"{s // 3600}h{s % 3600 // 60:02}m" if s >= 3600 else f"{s // 60}m{s % 60:02}s")
    )
