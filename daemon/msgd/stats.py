"""What msgd tells about itself: the typed stats snapshot, how it is made, and its formats.

A `Snapshot` is built from a copy of the shared counters (counters.py), the queues' depths and the
daemon's facts; the stats file, the `stats` log event, `msgctl stats` (table, JSON, Prometheus) and
the process title all read the same structure. Building one changes nothing: the moving-average
rates are stepped once a second by the master's clock (`Rates.step`), not by being read.
"""

from __future__ import annotations

import math
import os
import time
from array import array
from collections.abc import Iterable, Mapping

import msgspec

from msgd.backend import Depths, Outcome
from msgd.counters import (
    BUCKET_BOUNDS,
    BUCKETS,
    BUSY_NS,
    HIST,
    QUEUE_BLOCK,
    QueueIndex,
    queue_block,
    running,
)
from msgd.schedule import NextRun, describe
from msgd.sysutil import atomic_write

COUNTED = len(Outcome)
LABELS = tuple(o.label for o in Outcome)  # once: the enum's iteration costs ~2 µs a snapshot


class Totals(msgspec.Struct, kw_only=True):
    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    rejected: int = 0  # among failed
    timed_out: int = 0  # among retried and failed
    expired: int = 0  # among failed: not started within their TTL

    @classmethod
    def of(cls, counts: Iterable[int]) -> Totals:
        return cls(**dict(zip(LABELS, counts, strict=False)))


class Latency(msgspec.Struct):
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


class StateCounts(msgspec.Struct, kw_only=True):
    """A queue's messages per state (backend.Depths without the store's own words)."""

    new: int = 0
    cur: int = 0
    defer: int = 0
    scheduled: int = 0
    failed: int = 0


class QueueStats(Totals, kw_only=True):
    busy_seconds: float
    histogram: list[int]
    latency_ms: Latency
    depth: StateCounts


class Current(msgspec.Struct):
    queue: str
    id: str
    seconds: float


class WorkerStats(Totals, kw_only=True):
    slot: int
    pid: int
    state: str  # "busy" or "idle"
    current: list[Current]


class DaemonInfo(msgspec.Struct, kw_only=True):
    """The daemon-wide facts a snapshot starts with."""

    generation: int = 0  # USR1 dumps so far
    time: float = 0.0
    pid: int = 0
    uptime: float = 0.0
    config: str = ""
    reloads: int = 0
    workers_target: int = 0
    draining: bool = False
    schedules: dict[str, NextRun] = {}  # burst-mode queues with a schedule, and their next run


class Snapshot(DaemonInfo, kw_only=True):
    totals: Totals
    processed: int
    pending: int
    in_flight: int
    rates: dict[str, float]
    latency_ms: Latency
    histogram_bounds_s: list[float]
    queues: dict[str, QueueStats]
    workers: list[WorkerStats]


def read(path: str) -> Snapshot | None:
    """The stats file, or None if it is missing or not (yet) a snapshot. (No decoder made at
    import: resolving the types costs the daemon's start ~0.5 ms, and only msgctl reads.)"""
    try:
        with open(path, "rb") as f:
            return msgspec.json.decode(f.read(), type=Snapshot)
    except (OSError, msgspec.DecodeError):
        return None


def write(path: str, snap: Snapshot) -> None:
    """Replace the stats file atomically: a reader never sees half a snapshot."""
    atomic_write(path, msgspec.json.encode(snap))


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
        self.last = (time.monotonic(), 0)  # nothing run yet when the daemon starts

    def step(self, total: int, now: float) -> None:
        """Fold in the runs since the last step; called on the master's clock, once a second."""
        if now > self.last[0]:
            dt = now - self.last[0]
            instant = (total - self.last[1]) / dt
            for key, window in self.WINDOWS.items():
                decay = math.exp(-dt / window)
                self.rates[key] = self.rates[key] * decay + instant * (1 - decay)
        self.last = (now, total)

    def current(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.rates.items()}


def build(
    *,
    slots: list[array],
    index: QueueIndex,
    workers: Iterable[tuple[int, int]],
    depths: Mapping[str, Depths],
    rates: Rates,
    info: DaemonInfo,
) -> Snapshot:
    """The whole picture: every queue ever configured, each live worker (slot, pid)."""
    counts = {name: _summed(slots, index[name]) for name in sorted(index)}
    queues = {name: _queue(c, depths.get(name)) for name, c in counts.items()}
    total = [sum(column) for column in zip(*counts.values(), strict=True)] or [0] * QUEUE_BLOCK
    totals = Totals.of(total)
    return Snapshot(
        **msgspec.structs.asdict(info),
        totals=totals,
        processed=totals.succeeded + totals.retried + totals.failed,
        pending=sum(q.depth.new + q.depth.defer for q in queues.values()),
        in_flight=sum(q.depth.cur for q in queues.values()),
        rates=rates.current(),
        latency_ms=_latency(total[HIST:]),
        histogram_bounds_s=BUCKET_BOUNDS,
        queues=queues,
        workers=[_worker(slots[s], s, pid, index) for s, pid in workers],
    )


def _summed(slots: list[array], index: int) -> list[int]:
    """One queue's block added up over every worker slot."""
    return [sum(column) for column in zip(*(queue_block(s, index) for s in slots), strict=True)]


def _queue(counts: list[int], depth: Depths | None) -> QueueStats:
    hist = counts[HIST:]
    d = depth or Depths()
    return QueueStats(
        **msgspec.structs.asdict(Totals.of(counts[:COUNTED])),
        busy_seconds=round(counts[BUSY_NS] / 1e9, 3),
        histogram=hist,
        latency_ms=_latency(hist),
        depth=StateCounts(
            new=d.new, cur=d.cur, defer=d.defer, scheduled=d.scheduled, failed=d.failed
        ),
    )


def _worker(slot: array, slot_no: int, pid: int, index: QueueIndex) -> WorkerStats:
    done = [0] * COUNTED
    for name in index:
        done = [a + b for a, b in zip(done, queue_block(slot, index[name])[:COUNTED], strict=True)]
    runs = running(slot)
    now_ns = time.monotonic_ns()
    return WorkerStats(
        **msgspec.structs.asdict(Totals.of(done)),
        slot=slot_no,
        pid=pid,
        state="busy" if runs else "idle",
        current=[
            Current(
                queue=index.name(r.queue) or "?",
                id=r.label,
                seconds=round((now_ns - r.started_ns) / 1e9, 3),
            )
            for r in runs
        ],
    )


def _latency(hist: list[int]) -> Latency:
    ms = [percentile(hist, q) for q in (0.5, 0.9, 0.99)]
    return Latency(*(None if p is None else round(p * 1000, 3) for p in ms))


def daemon_info(
    *,
    generation: int,
    started: float,
    config: str,
    reloads: int,
    target: int,
    draining: bool,
    schedules: dict[str, NextRun],
) -> DaemonInfo:
    now = time.time()
    return DaemonInfo(
        generation=generation,
        time=now,
        pid=os.getpid(),
        uptime=round(now - started, 3),
        config=config,
        reloads=reloads,
        workers_target=target,
        draining=draining,
        schedules=schedules,
    )


# -- formats: one line, a table, Prometheus -------------------------------------------------------


def summary(snap: Snapshot) -> str:
    """The one line for the process title and systemd's STATUS."""
    t = snap.totals
    return (
        f"{len(snap.workers)} workers, {t.succeeded} done, {t.failed} failed, "
        f"{snap.pending} pending"
    )


def table(snap: Snapshot) -> str:
    """What `msgctl stats` prints: readable at a glance."""
    t, r, lat = snap.totals, snap.rates, snap.latency_ms
    lines = [
        f"msgd pid {snap.pid}  up {duration(snap.uptime)}  "
        f"workers {len(snap.workers)}  reloads {snap.reloads}  "
        f"stats generation {snap.generation}",
        f"totals   succeeded {t.succeeded}  retried {t.retried}  failed {t.failed}  "
        f"(rejected {t.rejected}, timed out {t.timed_out}, expired {t.expired})",
        f"rate/s   1m {r['1m']}  5m {r['5m']}  15m {r['15m']}",
        f"handler  p50 {_ms(lat.p50)}  p90 {_ms(lat.p90)}  p99 {_ms(lat.p99)}",
        "",
        # Waiting in the queue (DEAD: dead letters) | runs so far | handler time.
        f"{'QUEUE':<20} {'NEW':>7} {'CUR':>5} {'DEFER':>6} {'DEAD':>6} | {'SUCCEEDED':>9} "
        f"{'RETRIED':>8} {'FAILED':>7} | {'P50':>9} {'P99':>9}",
    ]
    for name, q in snap.queues.items():
        d = q.depth
        lines.append(
            f"{name:<20} {d.new:>7} {d.cur:>5} {d.defer:>6} {d.failed:>6} | "
            f"{q.succeeded:>9} {q.retried:>8} {q.failed:>7} | "
            f"{_ms(q.latency_ms.p50):>9} {_ms(q.latency_ms.p99):>9}"
        )
    if snap.schedules:
        lines += ["", *describe(snap.schedules, snap.time)]
    lines += ["", f"{'SLOT':>4} {'PID':>8} {'STATE':<5} {'SUCCEEDED':>9} {'FAILED':>7}  CURRENT"]
    for w in snap.workers:
        current = ", ".join(f"{c.queue} {c.id} {c.seconds:.1f}s" for c in w.current)
        lines.append(
            f"{w.slot:>4} {w.pid:>8} {w.state:<5} {w.succeeded:>9} {w.failed:>7}  {current}"
        )
    return "\n".join(lines)


def _family(name: str, kind: str, text: str) -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]


def prometheus(snap: Snapshot) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    queues = snap.queues.items()
    out = _family("msgd_up", "gauge", "Whether msgd was running when this was written.")
    out.append(f"msgd_up {1 if snap.pid else 0}")
    out += _family("msgd_workers", "gauge", "Worker processes running.")
    out.append(f"msgd_workers {len(snap.workers)}")
    out += _family("msgd_messages_total", "counter", "Handler runs by outcome.")
    for name, q in queues:
        for outcome in ("succeeded", "retried", "failed"):
            value = getattr(q, outcome)
            out.append(f'msgd_messages_total{{queue="{name}",outcome="{outcome}"}} {value}')
    out += _family("msgd_rejected_total", "counter", "Messages rejected by their handler.")
    out += [f'msgd_rejected_total{{queue="{n}"}} {q.rejected}' for n, q in queues]
    out += _family(
        "msgd_timed_out_total", "counter", "Handler runs killed for exceeding the timeout."
    )
    out += [f'msgd_timed_out_total{{queue="{n}"}} {q.timed_out}' for n, q in queues]
    out += _family("msgd_expired_total", "counter", "Messages not started within their TTL.")
    out += [f'msgd_expired_total{{queue="{n}"}} {q.expired}' for n, q in queues]
    out += _family("msgd_queue_depth", "gauge", "Messages in each queue state.")
    for name, q in queues:
        for state, n in msgspec.structs.asdict(q.depth).items():
            out.append(f'msgd_queue_depth{{queue="{name}",state="{state}"}} {n}')
    out += _family("msgd_handler_seconds", "histogram", "Handler run time.")
    for name, q in queues:
        cumulative = 0
        for bound, n in zip([*BUCKET_BOUNDS, math.inf], q.histogram, strict=True):
            cumulative += n
            le = "+Inf" if bound == math.inf else repr(bound)
            out.append(f'msgd_handler_seconds_bucket{{queue="{name}",le="{le}"}} {cumulative}')
        out.append(f'msgd_handler_seconds_sum{{queue="{name}"}} {q.busy_seconds}')
        out.append(f'msgd_handler_seconds_count{{queue="{name}"}} {cumulative}')
    return "\n".join(out) + "\n"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:g}ms"


def duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02}m"
    return f"{s // 60}m{s % 60:02}s"
