"""Live stats (issue 5): exact shared counters, snapshots, USR1, msgctl stats/top, Prometheus.

The counters are a shared `Array('Q', lock=False)` with one slot per worker; each worker writes
only its own slot and the master sums them. These tests check that the sums equal the truth (what
the handlers saw, what the spool holds) under concurrency, across worker deaths, reloads and
resizes, and that every output made of them says the same thing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Msgd, wait_for
from msgd import counters, stats
from msgd.backend import Depths, Outcome
from prometheus_client.parser import text_string_to_metric_families

OUTCOMES = ["succeeded", "retried", "failed", "rejected", "timed_out", "expired"]


def settled(d: Msgd, *queues: str) -> bool:
    """Nothing left to work: new/, cur/ and defer/ are empty in every queue.

    Only a hint: the three listings are not one atomic look (a retry can move from defer/ to new/
    between them), and a run's file leaves cur/ a moment before its count lands; so tests also
    wait for what the handlers wrote and for the counters (`counted`).
    """
    for q in queues or ("default",):
        depth = d.store(q).depths()
        if depth.new or depth.cur or depth.defer:
            return False
    return True


def fresh_stats(d: Msgd) -> dict[str, Any]:
    """USR1 through msgctl, then the snapshot it printed: the counters as of now."""
    done = d.msgctl("stats", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def counted(d: Msgd, processed: int, *queues: str) -> dict[str, Any]:
    """Wait until the stats file has counted `processed` handler runs and nothing is pending,
    then return a fresh snapshot (tests assert it exactly: an overcount fails too)."""
    wait_for(
        lambda: d.stats().get("processed", 0) >= processed and settled(d, *queues),
        20,
        f"{processed} runs counted",
    )
    return fresh_stats(d)


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


class Monotonic:
    """Every snapshot seen must have totals at least as large as the one before, per outcome."""

    def __init__(self) -> None:
        self.last = dict.fromkeys(OUTCOMES, 0)
        self.seen = 0

    def check(self, snap: dict[str, Any]) -> dict[str, Any]:
        if snap:
            for o in OUTCOMES:
                assert snap["totals"][o] >= self.last[o], (o, snap["totals"], self.last)
            self.last = dict(snap["totals"])
            self.seen += 1
        return snap


# -- exactness ------------------------------------------------------------------------------------


def test_counters_equal_the_truth_under_concurrency(daemon: Msgd) -> None:
    """Thousands of messages, 2 workers x 2 runner threads, two queues, every outcome."""
    daemon.queues = {
        "default": {
            "handler": "handlers:by_body",
            "threads": 2,
            "max_attempts": 2,
            "backoff": [0.0],
        },
        "other": {"handler": "handlers:record", "threads": 2},
    }
    daemon.write_config()
    daemon.start()
    ok, fail, reject, other = 3000, 40, 25, 1500
    bodies = [b"ok"] * ok + [b"fail"] * fail + [b"reject"] * reject
    daemon.send_many(bodies)
    daemon.send_many([b"x"] * other, queue="other")
    started = lambda: lines(daemon.out / "started")  # noqa: E731 (by_body: a line per run)
    runs = ok + 2 * fail + reject
    wait_for(lambda: len(started()) >= runs, 30, "every handler run")
    snap = counted(daemon, runs + other, "default", "other")
    assert len(started()) == runs
    assert len(daemon.succeeded()) == ok + other
    expected = {
        "default": {
            "succeeded": ok,
            "retried": fail,  # each `fail` is retried once (max_attempts 2), then dead-lettered
            "failed": fail + reject,
            "rejected": reject,
            "timed_out": 0,
            "expired": 0,
        },
        "other": {
            "succeeded": other,
            "retried": 0,
            "failed": 0,
            "rejected": 0,
            "timed_out": 0,
            "expired": 0,
        },
    }
    for queue, counts in expected.items():
        q = snap["queues"][queue]
        assert {o: q[o] for o in OUTCOMES} == counts, queue
        assert sum(q["histogram"]) == q["succeeded"] + q["retried"] + q["failed"]
        assert q["depth"] == {
            "new": 0,
            "cur": 0,
            "defer": 0,
            "scheduled": 0,
            "failed": counts["failed"],
        }
    assert snap["totals"] == {o: sum(expected[q][o] for q in expected) for o in OUTCOMES}
    assert snap["processed"] == runs + other
    # The per-worker view adds up to the same totals: every run was counted in exactly one slot.
    for o in ("succeeded", "retried", "failed"):
        assert sum(w[o] for w in snap["workers"]) == snap["totals"][o]
    assert len(snap["workers"]) == 2 and all(w["state"] == "idle" for w in snap["workers"])
    assert snap["pending"] == 0 and snap["in_flight"] == 0


def _textbook(value: Any, start: Any, n: int) -> None:
    start.wait()
    for _ in range(n):
        value.value += 1


def _slotted(counters: counters.Counters, slot: int, start: Any, n: int) -> None:
    writer = counters.writer(slot)
    start.wait()
    for _ in range(n):
        writer.count(0, Outcome.SUCCEEDED)


def test_why_one_slot_per_process(record_property: Any) -> None:
    """The textbook `v.value += 1` on a shared Value is a read, then a write: processes that
    interleave overwrite each other's increments. One slot per writer cannot lose any.

    The Value's loss depends on scheduling, so it is reported, not asserted; the slots' exactness
    is asserted.
    """
    procs, n = 4, 20_000
    ctx = multiprocessing.get_context("fork")
    value = ctx.Value("Q", 0)  # with its lock: the lock guards each read and each write, not +=
    shared = counters.Counters()
    for slot in range(procs):
        shared.writer(slot)
    start = ctx.Event()
    workers = [ctx.Process(target=_textbook, args=(value, start, n)) for _ in range(procs)]
    workers += [
        ctx.Process(target=_slotted, args=(shared, slot, start, n)) for slot in range(procs)
    ]
    for p in workers:
        p.start()
    start.set()
    for p in workers:
        p.join(30)
        assert p.exitcode == 0
    slots = shared.read()
    total = sum(counters.queue_block(slots[s], 0)[Outcome.SUCCEEDED] for s in range(procs))
    lost = procs * n - value.value
    record_property("textbook_value_lost_updates", lost)
    print(f"\nshared Value: {value.value} of {procs * n} increments ({lost} lost); slots: {total}")
    assert total == procs * n
    assert 0 <= lost <= procs * n


# -- worker deaths, reloads, resizing -------------------------------------------------------------


def test_totals_survive_kill9_reload_and_scaling(daemon: Msgd) -> None:
    daemon.queues = {"default": {"handler": "handlers:by_body", "max_attempts": 1}}
    daemon.write_config()
    daemon.start()
    mono = Monotonic()
    sent = failed = 0

    def batch(n: int) -> None:
        nonlocal sent
        daemon.send_many([b"ok"] * n)
        sent += n
        wait_for(lambda: len(daemon.succeeded()) == sent, 20, f"{sent} done")
        snap = mono.check(counted(daemon, sent + failed))
        assert snap["totals"]["succeeded"] == sent

    batch(300)

    # kill -9 a worker in the middle of a message: its slot (and counts) pass to the replacement,
    # and the run it was in counts once, as failed (max_attempts 1: the death used it up).
    hang = daemon.send(b"hang")
    snap = wait_for(
        lambda: [w for w in mono.check(daemon.stats())["workers"] if w["current"]],
        10,
        "the hanging message in a worker's hands",
    )
    busy = snap[0]
    assert busy["current"][0]["id"] == hang
    os.kill(busy["pid"], signal.SIGKILL)
    wait_for(lambda: daemon.store().depths().failed == 1, 10, "the dead letter")
    failed = 1
    after = wait_for(
        lambda: [w for w in fresh_stats(daemon)["workers"] if w["slot"] == busy["slot"]],
        10,
        "a replacement in the dead worker's slot",
    )[0]
    assert after["pid"] != busy["pid"]
    assert after["succeeded"] >= busy["succeeded"]  # the slot kept its predecessor's counts
    snap = mono.check(fresh_stats(daemon))
    assert snap["totals"]["failed"] == 1 and snap["totals"]["succeeded"] == sent
    assert [e for e in daemon.events("worker exited") if e["pid"] == busy["pid"]]
    batch(200)

    # A reload replaces every worker; scaling up and down adds and retires some.
    assert daemon.msgctl("reload").returncode == 0
    wait_for(lambda: len(daemon.workers()) == 2, 10, "2 workers after the reload")
    mono.check(fresh_stats(daemon))
    batch(200)
    assert daemon.msgctl("scale", "up").returncode == 0
    wait_for(lambda: len(daemon.workers()) == 3, 10, "3 workers")
    batch(200)
    for _ in range(2):
        assert daemon.msgctl("scale", "down").returncode == 0
    wait_for(lambda: len(daemon.workers()) == 1, 10, "1 worker")
    snap = mono.check(fresh_stats(daemon))
    assert len(snap["workers"]) == 1 and snap["workers_target"] == 1
    batch(200)
    snap = mono.check(fresh_stats(daemon))
    assert snap["totals"] == {
        "succeeded": sent,
        "retried": 0,
        "failed": 1,
        "rejected": 0,
        "timed_out": 0,
        "expired": 0,
    }
    assert snap["reloads"] == 1
    # The same after a stop: the final `stopped` event carries the totals.
    assert daemon.stop() == 0
    assert daemon.events("stopped")[-1]["succeeded"] == sent


def test_kill9_during_a_stream_keeps_counts_exact(daemon: Msgd) -> None:
    """Workers killed while they work: every message still succeeds once, and the counters say
    exactly that; what the dead held counts as retried, as the master's settlement reports."""
    daemon.queues = {"default": {"handler": "handlers:record", "max_attempts": 100, "backoff": [0]}}
    daemon.write_config()
    daemon.start()
    n = 6000
    ids = daemon.send_many([b"x"] * n)
    mono = Monotonic()
    for k in range(2):
        wait_for(lambda k=k: len(daemon.succeeded()) >= (k + 1) * 1000, 20, "progress")
        victim = wait_for(lambda: len(w := daemon.workers()) == 2 and w, 10, "2 workers")[k]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda v=victim: v not in daemon.workers(), 10, "the victim gone")
        mono.check(daemon.stats())
    wait_for(lambda: set(daemon.succeeded()) == set(ids), 30, "every message worked")
    snap = mono.check(counted(daemon, n))
    deaths = [e for e in daemon.events("worker exited") if "SIGKILL" in e["how"]]
    assert len(deaths) == 2
    assert snap["totals"]["succeeded"] == n
    assert snap["totals"]["retried"] == sum(e.get("retried", 0) for e in deaths)
    assert snap["totals"]["failed"] == 0


def test_pool_grows_past_one_counter_segment(daemon: Msgd) -> None:
    """More workers than the first 16-slot segment holds: more segments, the same exact sums."""
    daemon.daemon["workers"] = 1
    daemon.write_config()
    daemon.start()
    daemon.send_many([b"x"] * 100)
    wait_for(lambda: len(daemon.succeeded()) == 100, 10, "100 done by one worker")
    daemon.daemon["workers"] = counters.SLOTS_PER_SEGMENT + 2
    daemon.write_config()
    assert daemon.msgctl("reload").returncode == 0  # 18 new workers in slots 1..18
    wait_for(lambda: len(daemon.workers()) == 18, 20, "18 workers")
    daemon.send_many([b"x"] * 2000)
    wait_for(lambda: len(daemon.succeeded()) == 2100, 30, "2100 done")
    snap = counted(daemon, 2100)
    slots = sorted(w["slot"] for w in snap["workers"])
    assert slots == list(range(1, 19))
    assert snap["totals"]["succeeded"] == 2100
    assert sum(w["succeeded"] for w in snap["workers"]) == 2000  # slot 0's worker retired
    # A worker in the second segment dies: its replacement takes the slot and the counts stay.
    last = next(w for w in snap["workers"] if w["slot"] == 18)
    os.kill(last["pid"], signal.SIGKILL)
    wait_for(
        lambda: [
            w for w in daemon.stats()["workers"] if w["slot"] == 18 and w["pid"] != last["pid"]
        ],
        10,
        "a replacement in slot 18",
    )
    daemon.send_many([b"x"] * 100)
    wait_for(lambda: len(daemon.succeeded()) == 2200, 20, "2200 done")
    assert counted(daemon, 2200)["totals"]["succeeded"] == 2200


# -- USR1, the stats file, the log ----------------------------------------------------------------


def test_usr1_logs_one_stats_event_per_dump_and_a_new_file_generation(daemon: Msgd) -> None:
    daemon.start()
    ids = daemon.send_many([b"x"] * 10)
    daemon.wait_processed(10)
    for gen in (1, 2, 3):
        daemon.kill(signal.SIGUSR1)
        wait_for(lambda g=gen: daemon.generation("stats") == g, 10, f"stats ack {gen}")
        events = daemon.events("stats")
        assert [e["generation"] for e in events] == list(range(1, gen + 1))
        assert daemon.stats()["generation"] == gen
    event = daemon.events("stats")[-1]
    assert event["totals"]["succeeded"] == len(ids)
    assert event["queues"]["default"]["succeeded"] == len(ids)
    assert event["pid"] == daemon.pid and len(event["workers"]) == 2


def test_stats_file_is_refreshed_every_second_and_logged_at_the_interval(daemon: Msgd) -> None:
    daemon.daemon["stats_log_interval"] = 1.0
    daemon.write_config()
    daemon.start()
    first = daemon.stats()
    daemon.send(b"x")
    # No signal: the master rewrites the file by itself.
    later = wait_for(
        lambda: (s := daemon.stats()).get("time", 0) > first["time"] and s, 5, "a newer file"
    )
    wait_for(lambda: daemon.stats()["totals"]["succeeded"] == 1, 5, "the message in the file")
    assert later["generation"] == 0  # refreshed, not dumped: the dump count did not move
    wait_for(lambda: len(daemon.events("stats")) >= 2, 5, "periodic stats events")
    assert all(e["generation"] == 0 for e in daemon.events("stats"))


# -- msgctl stats / top ---------------------------------------------------------------------------


def _setup_mixed(daemon: Msgd) -> None:
    """A worked queue with every outcome, and a burst-mode queue with messages waiting."""
    daemon.queues = {
        "default": {"handler": "handlers:by_body", "max_attempts": 1},
        "later": {"handler": "handlers:record", "mode": "burst"},
    }
    daemon.write_config()
    daemon.start()
    daemon.send_many([b"ok"] * 20 + [b"fail"] * 2 + [b"reject"])
    daemon.send_many([b"x"] * 5, queue="later")
    wait_for(lambda: daemon.stats().get("processed") == 23, 10, "the default queue worked")
    # The rates are stepped once a second by the master's clock, not by reading the stats.
    wait_for(lambda: daemon.stats()["rates"]["1m"] > 0, 10, "a rate over the last minute")


def test_msgctl_stats_json_schema(daemon: Msgd) -> None:
    _setup_mixed(daemon)
    snap = fresh_stats(daemon)
    assert snap["generation"] == 1 == daemon.stats()["generation"]
    for key, kind in {
        "generation": int,
        "time": float,
        "pid": int,
        "uptime": float,
        "config": str,
        "reloads": int,
        "workers_target": int,
        "draining": bool,
        "totals": dict,
        "processed": int,
        "pending": int,
        "in_flight": int,
        "rates": dict,
        "latency_ms": dict,
        "histogram_bounds_s": list,
        "queues": dict,
        "workers": list,
    }.items():
        assert isinstance(snap[key], kind), key
    assert snap["pid"] == daemon.pid and snap["config"] == str(daemon.config_path)
    assert set(snap["totals"]) == set(OUTCOMES)
    assert snap["totals"] == {
        "succeeded": 20,
        "retried": 0,
        "failed": 3,
        "rejected": 1,
        "timed_out": 0,
        "expired": 0,
    }
    assert snap["processed"] == 23 and snap["pending"] == 5
    assert set(snap["rates"]) == {"1m", "5m", "15m"} and snap["rates"]["1m"] > 0
    assert set(snap["latency_ms"]) == {"p50", "p90", "p99"}
    assert all(isinstance(v, float) for v in snap["latency_ms"].values())
    assert snap["latency_ms"]["p50"] <= snap["latency_ms"]["p90"] <= snap["latency_ms"]["p99"]
    bounds = snap["histogram_bounds_s"]
    assert bounds[0] == 50e-6 and all(b == 2 * a for a, b in itertools.pairwise(bounds))
    assert set(snap["queues"]) == {"default", "later"}
    for q in snap["queues"].values():
        assert set(q) == {*OUTCOMES, "busy_seconds", "histogram", "latency_ms", "depth"}
        assert len(q["histogram"]) == len(bounds) + 1
        assert set(q["depth"]) == {"new", "cur", "defer", "scheduled", "failed"}
    assert snap["queues"]["later"]["depth"]["new"] == 5
    assert snap["queues"]["later"]["latency_ms"] == {"p50": None, "p90": None, "p99": None}
    assert len(snap["workers"]) == 2
    for w in snap["workers"]:
        assert set(w) == {"slot", "pid", "state", *OUTCOMES, "current"}
        assert w["state"] in ("idle", "busy") and isinstance(w["current"], list)
    table = daemon.msgctl("stats")
    assert table.returncode == 0, table.stderr
    assert "succeeded 20  retried 0  failed 3  (rejected 1, timed out 0, expired 0)" in table.stdout
    row = r"^later\s+5\s+0\s+0\s+0\s+\|\s+0\s+0\s+0\s+\|\s+-\s+-$"  # waiting | runs | handler time
    assert re.search(row, table.stdout, re.M)


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_prometheus_output_parses(daemon: Msgd) -> None:
    _setup_mixed(daemon)
    done = daemon.msgctl("stats", "--prometheus")
    assert done.returncode == 0, done.stderr
    snap = daemon.stats()
    fams = _families(done.stdout)
    assert fams["msgd_up"].samples[0].value == 1
    assert fams["msgd_workers"].samples[0].value == 2
    messages = {
        (s.labels["queue"], s.labels["outcome"]): s.value
        for s in fams["msgd_messages"].samples
        if s.name == "msgd_messages_total"
    }
    assert fams["msgd_messages"].type == "counter"
    assert messages == {
        (q, o): snap["queues"][q][o]
        for q in ("default", "later")
        for o in ("succeeded", "retried", "failed")
    }
    assert messages["default", "succeeded"] == 20 and messages["default", "failed"] == 3
    depth = {
        (s.labels["queue"], s.labels["state"]): s.value for s in fams["msgd_queue_depth"].samples
    }
    assert depth["later", "new"] == 5 and depth["default", "failed"] == 3
    hist = fams["msgd_handler_seconds"]
    assert hist.type == "histogram"
    buckets = [
        s for s in hist.samples if s.name.endswith("_bucket") and s.labels["queue"] == "default"
    ]
    values = [s.value for s in buckets]
    assert values == sorted(values) and buckets[-1].labels["le"] == "+Inf"
    count = next(
        s.value
        for s in hist.samples
        if s.name == "msgd_handler_seconds_count" and s.labels["queue"] == "default"
    )
    assert values[-1] == count == 23

    out = daemon.root / "metrics" / "msgd.prom"
    out.parent.mkdir()
    written = daemon.msgctl("stats", "--prometheus", "--output", str(out))
    assert written.returncode == 0 and written.stdout == ""
    assert os.listdir(out.parent) == ["msgd.prom"]  # renamed into place: no temporary left
    assert _families(out.read_text())["msgd_messages"].samples


def test_top_prints_frames_without_a_terminal(daemon: Msgd) -> None:
    _setup_mixed(daemon)
    wait_for(lambda: daemon.stats()["totals"]["succeeded"] == 20, 5, "the stats file")
    one = daemon.msgctl("top")
    assert one.returncode == 0, one.stderr
    header = r"^\d\d:\d\d:\d\d 2 workers, 20 done, 3 failed, 5 pending$"
    assert len(re.findall(header, one.stdout, re.M)) == 1, one.stdout
    assert "QUEUE" in one.stdout and "\033" not in one.stdout
    two = daemon.msgctl("top", "-n", "2")
    assert len(re.findall(header, two.stdout, re.M)) == 2, two.stdout
    assert daemon.stop() == 0  # else the next periodic rewrite could bring the file back
    (daemon.root / "run/stats.json").unlink()
    gone = daemon.msgctl("top")
    assert gone.returncode == 0 and "msgd: no stats at" in gone.stdout


def test_process_title_carries_the_summary(daemon: Msgd) -> None:
    daemon.queues = {"default": {"handler": "handlers:by_body", "max_attempts": 1}}
    daemon.write_config()
    daemon.start()
    daemon.send_many([b"ok"] * 7 + [b"fail"])
    title = f"msgd: master -c {daemon.config_path} 2 workers, 7 done, 1 failed, 0 pending"

    def cmdline() -> str:
        return Path(f"/proc/{daemon.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()

    wait_for(lambda: cmdline().strip() == title, 5, f"title {title!r}, have {cmdline()!r}")


# -- the arithmetic, in process -------------------------------------------------------------------


def test_histogram_buckets_are_upper_bound_inclusive() -> None:
    base = counters.HIST_BASE_NS
    assert counters.bucket(0) == 0
    assert counters.bucket(base) == 0  # exactly 50 µs belongs to le="5e-05"
    assert counters.bucket(base + 1) == 1
    assert counters.bucket(2 * base) == 1
    assert counters.bucket(2 * base + 1) == 2
    assert counters.bucket(10**15) == counters.BUCKETS - 1
    for k, bound in enumerate(counters.BUCKET_BOUNDS):
        assert counters.bucket(round(bound * 1e9)) == k


def test_percentiles_and_summary() -> None:
    hist = [0] * counters.BUCKETS
    hist[0], hist[3], hist[10] = 50, 40, 10
    assert stats.percentile(hist, 0.5) == counters.BUCKET_BOUNDS[0]
    assert stats.percentile(hist, 0.9) == counters.BUCKET_BOUNDS[3]
    assert stats.percentile(hist, 0.99) == counters.BUCKET_BOUNDS[10]
    assert stats.percentile([0] * counters.BUCKETS, 0.5) is None
    snap = stats.Snapshot(
        totals=stats.Totals(succeeded=1234, failed=3),
        processed=1237,
        pending=17,
        in_flight=0,
        rates={},
        latency_ms=stats.Latency(),
        histogram_bounds_s=[],
        queues={},
        workers=[stats.WorkerStats(slot=i, pid=i, state="idle", current=[]) for i in (0, 1)],
    )
    assert stats.summary(snap) == "2 workers, 1234 done, 3 failed, 17 pending"


@pytest.mark.parametrize("total", [0, 600])
def test_rates_follow_a_steady_flow(total: int) -> None:
    rates = stats.Rates()
    rates.step(0, 0.0)
    for t in range(1, 601):
        rates.step(t * total // 600, float(t))
        r = rates.current()
    assert rates.current() == r, "reading the rates does not change them"
    assert r["1m"] == pytest.approx(total / 600, rel=0.01)
    assert r["1m"] >= r["5m"] >= r["15m"] >= 0


def test_a_run_in_progress_and_its_intended_outcome_are_read_back() -> None:
    """What the master reads from a slot: the run in progress, and the outcome a worker killed
    between making it durable and counting it had intended (pool.settle counts that one)."""
    shared = counters.Counters()
    writer = shared.writer(counters.SLOTS_PER_SEGMENT + 1)  # in a second segment
    started = writer.start(3, 5, "abc@0", "abc")
    [run] = counters.running(shared.read()[counters.SLOTS_PER_SEGMENT + 1])
    assert (run.queue, run.started_ns, run.label, run.intended) == (5, started, "abc", None)
    writer.intend(3, 5, Outcome.SUCCEEDED)
    assert (
        shared.read_slot(counters.SLOTS_PER_SEGMENT + 1)
        == shared.read()[counters.SLOTS_PER_SEGMENT + 1]
    )
    [run] = counters.running(shared.read_slot(counters.SLOTS_PER_SEGMENT + 1))
    assert (run.queue, run.intended) == (5, Outcome.SUCCEEDED)
    writer.finish(3, 5, Outcome.SUCCEEDED, started)
    slot = shared.read()[counters.SLOTS_PER_SEGMENT + 1]
    assert counters.running(slot) == []
    assert counters.queue_block(slot, 5)[Outcome.SUCCEEDED] == 1


class Listing:
    """A store whose depths, once `release` is set, use `cpu` seconds of CPU and then wait
    `wait` seconds (a costly listing, a slow disk: injected); it notes the thread that asked."""

    queue = "q"

    def __init__(self, local: bool, cpu: float = 0.0, wait: float = 0.0) -> None:
        self.local, self.cpu, self.wait = local, cpu, wait
        self.asked, self.release = threading.Event(), threading.Event()
        self.threads: list[int] = []

    def depths(self) -> Depths:
        self.threads.append(threading.get_ident())
        self.asked.set()
        assert self.release.wait(10)
        spent = time.thread_time() + self.cpu
        while time.thread_time() < spent:  # the listing's own work: the fault under test
            pass
        time.sleep(self.wait)  # the disk's
        return Depths(new=1)


def test_local_calls_run_on_the_loop_only_while_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call of unknown cost, or one that used much CPU or waited on its disk in the last
    RECENT seconds, runs in a thread while the loop turns; a local call that has been cheap runs
    on the loop, saving the thread's two wake-ups, even when it was merely preempted; a broker's
    call never does. The reporter's depths follow the rule."""
    from msgd import supervise
    from msgd.reporter import Reporter

    monkeypatch.setattr(supervise, "RECENT", 0.3)
    reporter = Reporter(counters.Counters(), counters.QueueIndex())

    async def refresh(store: Listing) -> int:
        await reporter.refresh({"q": store})  # type: ignore[dict-item]
        return store.threads[-1]

    async def recent_passes() -> None:
        while time.monotonic() < reporter.placement.slow_until + 0.01:
            await asyncio.sleep(0.01)

    async def main() -> None:
        loop = threading.get_ident()
        slow = Listing(local=True, cpu=2 * supervise.CHEAP)
        task = asyncio.create_task(refresh(slow))
        await asyncio.to_thread(slow.asked.wait, 5)
        assert not task.done(), "the loop turns while the first listing runs"
        slow.release.set()
        assert await task != loop
        slow.cpu = 0.0
        assert await refresh(slow) != loop, "a costly listing was recent"
        await recent_passes()
        assert await refresh(slow) == loop, "cheap since"
        slow.wait = supervise.CHEAP * 2  # taking long without using the CPU: preempted
        assert await refresh(slow) == loop and await refresh(slow) == loop
        slow.wait = 2 * supervise.BLOCKED  # a disk this slow
        assert await refresh(slow) == loop
        slow.wait = 0.0
        assert await refresh(slow) != loop, "a blocked listing was recent"
        await recent_passes()
        slow.cpu = 2 * supervise.CHEAP
        assert await refresh(slow) == loop
        slow.cpu = 0.0
        assert await refresh(slow) != loop, "a costly listing was recent"
        assert reporter.depths["q"].new == 1
        broker = Listing(local=False)
        broker.release.set()
        placement = supervise.Placement()
        threads = [await placement.run(False, lambda: threading.get_ident()) for _ in range(3)]
        assert loop not in threads and await refresh(broker) != loop

    asyncio.run(main())
