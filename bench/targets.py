"""The targets `make bench` checks, and for each the reason of a miss, computed from the run.

A target measures a list of figures (one per run, or one per round for a ratio between two
systems); the verdict is on their median. `why` is only asked when the target missed: it reads the
figures that explain where the time (or the memory) went in this run, never a remembered number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from figures import fmt, get, known, median, per_round, pick, process_name, ratios, runs, values

Figures = Callable[[dict], list[float]]
MIB_TO_MB = 1.048576


@dataclass(frozen=True)
class Target:
    what: str
    unit: str  # "x", "%", "ms", "MB", "ns", "lost"
    measure: Figures
    ok: Callable[[float], bool]
    why: Callable[[dict], str]


def at_least(limit: float) -> Callable[[float], bool]:
    return lambda v: v >= limit


def at_most(limit: float) -> Callable[[float], bool]:
    return lambda v: v <= limit


def figure(scenario: str, system: str, *keys: str, scale: float = 1.0) -> Figures:
    return lambda r: [v * scale for v in values(r, scenario, system, *keys)]


def versus(scenario: str, left: str, right: str, *keys: str) -> Figures:
    keys = keys or ("msgs_per_s",)
    return lambda r: ratios(r, (scenario, left, *keys), (scenario, right, *keys))


def n(r: dict, scenario: str, system: str, *keys: str, digits: int = 0) -> str:
    """A median figure, formatted, for a sentence."""
    return fmt(get(r, scenario, system, *keys), digits)


# --- sending ------------------------------------------------------------------------------------


FLOORS = ("file_two_flushes", "file_one_flush", "append_fdatasync", "overwrite_fdatasync")


def floors(r: dict) -> list[float | None]:
    """This disk's durable writes per second, each way (bench/disk.py), medians of the run."""
    return [get(r, "send", "disk", key, "msgs_per_s") for key in FLOORS]


def why_send(r: dict) -> str:
    mine = get(r, "send", "msgd", "send", "msgs_per_s")
    huey = get(r, "send", "huey-sqlite", "send", "msgs_per_s")
    two, one, append, in_place = floors(r)
    text = (
        f"msgd.send made {fmt(mine)} durable sends/s, Huey {fmt(huey)} task calls/s (one WAL "
        f"commit each). This disk in the same rounds: a new file flushed with its directory "
        f"{fmt(two)}/s, a new file flushed alone {fmt(one)}/s, an append + fdatasync "
        f"{fmt(append)}/s, an overwrite in place + fdatasync {fmt(in_place)}/s."
    )
    measured = known(mine, huey, in_place)
    if measured is None:
        return text
    mine, huey, in_place = measured
    return text + (
        f" Each pays one flush of a file written in place (msgd's intake log, Huey's WAL): "
        f"Huey's commit reaches {huey / in_place:.0%} of the overwrite floor, msgd.send "
        f"{mine / in_place:.0%}; what separates them is the rest of each call."
    )


def why_send_many(r: dict) -> str:
    return (
        f"msgd.send_many made {n(r, 'send', 'msgd', 'send_many', 'msgs_per_s')} msgs/s in a "
        f"batch of {n(r, 'send', 'msgd', 'send_many', 'n')}, Huey's task.map "
        f"{n(r, 'send', 'huey-sqlite', 'send_many', 'msgs_per_s')} msgs/s."
    )


def why_producers(r: dict) -> str:
    m4, h4 = (get(r, "send-4", s, "msgs_per_s") for s in ("msgd", "huey-sqlite"))
    m1, h1 = (get(r, "send", s, "send", "msgs_per_s") for s in ("msgd", "huey-sqlite"))
    text = (
        f"With 4 producers msgd made {fmt(m4)} msgs/s and Huey {fmt(h4)}; one producer alone made "
        f"{fmt(m1)} (msgd) and {fmt(h1)} (Huey)."
    )
    measured = known(m4, m1, h4, h1)
    if measured is None:
        return text
    m4, m1, h4, h1 = measured
    shared = "shared flushes" if m4 / m1 >= 1.5 else "each send still paid its own flushes"
    return text + (
        f" msgd gained {m4 / m1:.2f}x from the 3 extra producers ({shared}), Huey {h4 / h1:.2f}x."
    )


# --- latency, memory, start -----------------------------------------------------------------------


def over_flush(r: dict) -> list[float]:
    """Per run: send → handler start p99 minus one flush's p99, both from that run."""
    p99 = values(r, "idle-latency", "msgd", "p99_ms")
    flush = values(r, "idle-latency", "msgd", "flush", "p99_ms")
    return per_round(p99, flush, lambda a, b: a - b) if flush and all(flush) else []


def why_latency(system: str) -> Callable[[dict], str]:
    def why(r: dict) -> str:
        p99 = get(r, "idle-latency", system, "p99_ms")
        call = get(r, "idle-latency", system, "send_call", "p99_ms")
        f50, f99 = (get(r, "idle-latency", system, "flush", k) for k in ("p50_ms", "p99_ms"))
        text = (
            f"p99 {fmt(p99, 2)} ms (p50 {n(r, 'idle-latency', system, 'p50_ms', digits=2)}); the "
            f"msgd.send call alone took {fmt(call, 2)} ms at p99; one flush of this disk in the "
            f"same minutes: p50 {fmt(f50, 2)}, p99 {fmt(f99, 2)} ms."
        )
        measured = known(p99, call, f50)
        if measured is None or not f50:
            return text
        p99, call, f50 = measured
        text += f" The latency's p99 is {p99 / f50:.1f} flushes' worth (at the flush's p50)"
        if call >= 0.8 * p99:  # a worker may start before the call returns (the last flush)
            return text + "; its tail follows the send call's: the time goes in the producer."
        return text + (
            f"; the send call's p99 is {call:.2f} ms of it, the rest of the tail is the daemon's "
            "own path (the wake-up of an idle worker, the claim, the read)."
        )

    return why


def why_memory(r: dict) -> str:
    procs = pick(r, "memory", "msgd", "pss_mib").get("per_process", [])
    if not procs:
        return "no per-process figures in this run."
    parts = ", ".join(f"{process_name(p)} {p['pss_kib'] / 1024:.1f}" for p in procs)
    ssl = sum(p.get("ssl_pss_kib", 0) for p in procs) / 1024
    total = sum(p["pss_kib"] for p in procs) / 1024 * MIB_TO_MB
    return (
        f"PSS by process (MiB): {parts}; summed {total:.1f} MB. OpenSSL's libraries (libssl, "
        f"libcrypto, _ssl) account for {ssl:.1f} MiB of it "
        + ("though msgd makes no TLS connection. " if ssl > 0.1 else "(not loaded). ")
        + why_memory_kinds(procs)
    )


def why_memory_kinds(procs: list[dict]) -> str:
    """The sum by kind of memory, and each process's private pages: in a forked process, the
    pages of the master's that it (or the master) wrote after the fork."""
    if "private_dirty_kib" not in procs[0]:
        return ""
    mib = {k: sum(p[f"pss_{k}_kib"] for p in procs) / 1024 for k in ("anon", "file", "shmem")}
    private = ", ".join(f"{process_name(p)} {p['private_dirty_kib'] / 1024:.1f}" for p in procs)
    return (
        f"By kind (MiB): anonymous {mib['anon']:.1f}, files (libpython's and the extensions' "
        f"code, shared with every process that maps them) {mib['file']:.1f}, shared memory "
        f"{mib['shmem']:.1f}. Pages private to each process (MiB): {private}: CPython writes into "
        "every object it touches (reference counts, the bytecode's warm-up counters), so each "
        "page of code or data a process runs after the fork becomes its own copy."
    )


def why_start(r: dict) -> str:
    ready = get(r, "start", "msgd", "ready", "p50_ms")
    python, imports = (get(r, "start", "msgd", k) for k in ("python_start_p50_ms", "import_p50_ms"))
    loaded = pick(r, "start", "msgd", "ready", "p50_ms").get("optional_imported") or []
    text = (
        f"READY at p50 {fmt(ready, 1)} ms; in fresh interpreters Python starts in {fmt(python, 1)} "
        f"ms and importing msgd's entry module takes {fmt(imports, 1)} ms"
        + (f", loading {', '.join(loaded)}" if loaded else "")
        + "."
    )
    measured = known(ready, python, imports)
    if measured is None:
        return text
    rest = measured[0] - measured[1] - measured[2]
    return text + f" The rest, {rest:.1f} ms, is config, pidfile, forking the workers and READY."


def why_usr1(state: str, task: str) -> Callable[[dict], str]:
    def why(r: dict) -> str:
        p99, reach = get(r, "usr1", "msgd", state, "p99_ms"), get(r, "usr1", "msgd", task, "p99_ms")
        text = (
            f"p99 {fmt(p99, 2)} ms; the signal reached the stats task in {fmt(reach, 2)} ms at p99"
        )
        if p99 is None or reach is None:
            return text + "."
        return text + (
            f", so the dump and its rename took about {p99 - reach:.2f} ms at the tail"
            + (
                f", on a master sharing 2 cores with 2 CPU-bound workers "
                f"({n(r, 'usr1', 'msgd', 'queued')} messages waiting)."
                if state == "saturated"
                else "."
            )
        )

    return why


# --- under load ---------------------------------------------------------------------------------


def outside_handler_us(r: dict, system: str) -> float | None:
    """µs per message the workers spent outside the handler: (2 x span - handler time) / n."""
    run = pick(r, "cpu", system, "efficiency")
    if not run or not run.get("handler_busy_seconds"):
        return None
    return (2 * run["seconds"] - run["handler_busy_seconds"]) / run["n"] * 1e6


def why_cpu(r: dict) -> str:
    mine, bare = get(r, "cpu", "msgd", "efficiency"), get(r, "cpu", "bare", "efficiency")
    unit_m, unit_b = get(r, "cpu", "msgd", "unit_ms"), get(r, "cpu", "bare", "unit_ms")
    out_m, out_b = outside_handler_us(r, "msgd"), outside_handler_us(r, "bare")
    return (
        f"msgd's efficiency {fmt(mine and mine * 100, 1)}% against the ceiling's "
        f"{fmt(bare and bare * 100, 1)}%. Per message the two workers spent {fmt(out_m)} µs "
        f"outside the handler in msgd, {fmt(out_b)} µs in the bare loop; the unit of work took "
        f"{fmt(unit_m, 2)} ms in msgd's workers and {fmt(unit_b, 2)} ms in the bare processes."
    )


def why_drain_bare(r: dict) -> str:
    rate = get(r, "drain", "msgd", "msgs_per_s")
    handlers = get(r, "drain", "msgd", "handlers_msgs_per_s")
    spans = values(r, "drain", "msgd", "seconds")
    tail = per_round(spans, values(r, "drain", "msgd", "handlers_seconds"), lambda a, b: a - b)
    return (
        f"msgd drained {fmt(rate)} msgs/s counted until the spool was empty; its handlers alone "
        f"finished at {fmt(handlers)} msgs/s, the background unlinks then needing "
        f"{fmt(median(tail), 3)} s more. The 1-process claim loop made "
        f"{n(r, 'drain', 'bare-1', 'msgs_per_s')} msgs/s, the 2-process one "
        f"{n(r, 'drain', 'bare', 'msgs_per_s')}."
    )


def why_drain_peer(system: str) -> Callable[[dict], str]:
    def why(r: dict) -> str:
        text = (
            f"msgd {n(r, 'drain', 'msgd', 'msgs_per_s')} msgs/s, "
            f"{system} {n(r, 'drain', system, 'msgs_per_s')} msgs/s"
        )
        if system == "huey-sqlite-nofsync":
            text += f"; with fsync=True Huey made {n(r, 'drain', 'huey-sqlite', 'msgs_per_s')}"
            text += unlinks(r)
        return text + "."

    return why


def unlinks(r: dict) -> str:
    """What a message's file costs to take away on this disk, where Huey deletes a row."""
    rate = get(r, "send", "disk", "unlink_flushed", "msgs_per_s")
    if not rate:
        return ""
    return (
        f". msgd's messages are files, and a drain unlinks each one: this disk unlinked a flushed "
        f"file {fmt(rate)} times a second in the same run ({1e6 / rate:.0f} µs each, one at a "
        f"time), where Huey deletes a row in pages SQLite already holds"
    )


def counters_rounds(r: dict) -> tuple[list[float], list[float]]:
    """Per round of the counters-off scenario: on ÷ off, and control ÷ on (the noise)."""
    entry = (runs(r, "nocounters", "msgd") or [{}])[0]
    on, off, control = (entry.get(f"{arm}_runs", []) for arm in ("on", "off", "control"))
    divide = lambda a, b: a / b  # noqa: E731
    return per_round(on, off, divide), per_round(control, on, divide)


def why_counters(r: dict) -> str:
    on_off, control = counters_rounds(r)
    middle = median(on_off)
    text = f"On ÷ off per round: {', '.join(fmt(v, 3) for v in on_off)}"
    if not control or not middle:
        return text + "."
    gap, noise = apart(middle), max(apart(c) for c in control)
    text += (
        f"; the control (the same code twice) differed by up to {noise:.1%} in a round, the "
        f"median on ÷ off by {gap:.1%}"
    )
    cost, rate = get(r, "counters", "msgd", "per_message_ns"), get(r, "drain", "msgd", "msgs_per_s")
    share = cost / (2 / rate * 1e9) if cost is not None and rate else 0.0  # of a worker's time
    text += f"; the updates' own instructions are {share:.1%} of a worker's time per message"
    if gap <= noise:
        return text + ": the gap is within the noise (more rounds would resolve it)."
    if gap > 2 * share:
        return text + (
            ": the gap is beyond the noise and beyond their instructions, so it comes from what "
            "the updates touch, not what they execute (shared cache lines are the suspect)."
        )
    return text + ": the gap is beyond the noise and of the order of the updates' own cost."


def apart(ratio: float) -> float:
    """How far a ratio of two rates is from 1, the same either way round (0.9 and 1/0.9 alike)."""
    return max(ratio, 1 / ratio) - 1


def why_figure(scenario: str, *keys: str, unit: str = "ms") -> Callable[[dict], str]:
    def why(r: dict) -> str:
        found = values(r, scenario, "msgd", *keys)
        return f"{fmt(median(found), 2)} {unit} (runs: {', '.join(fmt(v, 2) for v in found)})."

    return why


def why_hup_lost(r: dict) -> str:
    sent = sum(run.get("sent", 0) for run in runs(r, "hup", "msgd"))
    lost = sum(run.get("lost", 0) for run in runs(r, "hup", "msgd"))
    return f"{lost} of {sent:,} messages sent during the HUPs were never handled."


def why_counter_ratio(r: dict) -> str:
    return (
        f"a lock-free update {n(r, 'counters', 'msgd', 'lockfree_ns', digits=1)} ns, a locked "
        f"Value {n(r, 'counters', 'msgd', 'locked_ns', digits=1)} ns on this machine."
    )


def feed_ratios(r: dict, arm: str = "fifty") -> list[float]:
    """The drain with 50 subscribers (`arm`) ÷ with none, one per round (bench/subscribers.py
    interleaves the arms in rounds), over every run."""
    return [x for run in runs(r, "subscribers", "msgd") for x in run.get("ratios", {}).get(arm, [])]


def feed_cpu(r: dict, arm: str, part: str) -> float | None:
    """CPU seconds `part` (workers, master, listener, clients) used during the drain, median."""
    return get(r, "subscribers", "msgd", arm, "cpu_s", part)


def why_subscribers(r: dict) -> str:
    fifty, none = (get(r, "subscribers", "msgd", arm, "msgs_per_s") for arm in ("fifty", "none"))
    cpu = lambda arm, part: fmt(feed_cpu(r, arm, part), 2)  # noqa: E731
    return (
        f"with 50 subscribers the burst drain made {fmt(fifty)} msgs/s, with none {fmt(none)} "
        f"(same rounds: {fmt(median(feed_ratios(r)), 3, 'x')}); during the drain the listener "
        f"used {cpu('fifty', 'listener')} CPU s ({cpu('none', 'listener')} s with no "
        f"subscriber), the clients' process {cpu('fifty', 'clients')} s, the workers "
        f"{cpu('fifty', 'workers')} s; with the clients as ordinary processes on the same cores "
        f"the drain made {fmt(median(feed_ratios(r, 'fifty-here')), 3, 'x')} of none's (their "
        f"CPU {cpu('fifty-here', 'clients')} s). The fewest events a subscriber saw: "
        f"{n(r, 'subscribers', 'msgd', 'fifty', 'events_min')}, the most it was told it missed: "
        f"{n(r, 'subscribers', 'msgd', 'fifty', 'missed_max')} (a slow subscriber is skipped "
        f"ahead, never the workers slowed).{feed_noise(r)}"
    )


def feed_noise(r: dict) -> str:
    """How far the same arm, run twice in a round, was from itself: the noise of ÷ none."""
    again = feed_ratios(r, "none-again")
    if not again:
        return ""
    apart = max(abs(1 - x) for x in again)
    return (
        f" With no subscriber twice in the same rounds, the second run made "
        f"{fmt(min(again), 3, 'x')}-{fmt(max(again), 3, 'x')} of the first (up to {apart:.1%} "
        f"apart): the noise every ÷ none carries."
    )


def lost(r: dict) -> list[float]:
    return [max(values(r, "hup", "msgd", "lost"), default=0)] if runs(r, "hup", "msgd") else []


TARGETS = [
    # issue 16: producing
    Target("single durable sends ≥ 1.0x Huey (SQLite, fsync=True), one by one", "x",
           versus("send", "msgd", "huey-sqlite", "send", "msgs_per_s"), at_least(1.0), why_send),
    Target("4 producers sending one at a time, fsync on: ≥ 2x Huey with 4 producers", "x",
           versus("send-4", "msgd", "huey-sqlite"), at_least(2.0), why_producers),
    Target("send_many ≥ Huey (SQLite, fsync=True) batch (`task.map`)", "x",
           versus("send", "msgd", "huey-sqlite", "send_many", "msgs_per_s"), at_least(1.0),
           why_send_many),
    # issue 16: latency, footprint, start
    Target("send → handler start p99 ≤ 1 ms, idle daemon, fsync = false", "ms",
           figure("idle-latency", "msgd-nofsync", "p99_ms"), at_most(1.0),
           why_latency("msgd-nofsync")),
    Target("send → handler start p99 ≤ one flush + 0.3 ms, idle daemon, fsync = true "
           "(measured: p99 minus the flush's p99)", "ms", over_flush, at_most(0.3),
           why_latency("msgd")),
    Target("master + 2 idle workers, summed PSS ≤ 25 MB (10^6 bytes)", "MB",
           figure("memory", "msgd", "pss_mib", scale=MIB_TO_MB), at_most(25), why_memory),
    Target("start → READY p50 ≤ 150 ms", "ms", figure("start", "msgd", "ready", "p50_ms"),
           at_most(150), why_start),
    # issue 16: under load
    Target("USR1 → stats file p99 ≤ 5 ms, both workers saturated", "ms",
           figure("usr1", "msgd", "saturated", "p99_ms"), at_most(5),
           why_usr1("saturated", "task_saturated")),
    Target("CPU-bound parallel efficiency ≥ 95% of the 2-process bare ceiling (unit timed in the "
           "workers)", "%", versus("cpu", "msgd", "bare", "efficiency"), at_least(0.95), why_cpu),
    Target("drain ≥ 2.5x the bare 1-process claim loop on the same flushed files", "x",
           versus("drain", "msgd", "bare-1"), at_least(2.5), why_drain_bare),
    Target("drain with counters on ÷ off ≥ 0.98, measured (median of rounds)", "x",
           lambda r: counters_rounds(r)[0], at_least(0.98), why_counters),
    # peers, at equal durability
    Target("drain ≥ 3x Huey (SQLite) at equal durability (fsync=False: neither flushes a claim)",
           "x", versus("drain", "msgd", "huey-sqlite-nofsync"), at_least(3),
           why_drain_peer("huey-sqlite-nofsync")),
    Target("drain ≥ 10x Celery", "x", versus("drain", "msgd", "celery"), at_least(10),
           why_drain_peer("celery")),
    # signals
    Target("kill → action task running p99 ≤ 1 ms (idle)", "ms",
           figure("usr1", "msgd", "task_idle", "p99_ms"), at_most(1),
           why_figure("usr1", "task_idle", "p99_ms")),
    Target("kill → action task running p99 ≤ 5 ms (pool saturated)", "ms",
           figure("usr1", "msgd", "task_saturated", "p99_ms"), at_most(5),
           why_figure("usr1", "task_saturated", "p99_ms")),
    Target("USR1 → stats file p99 ≤ 5 ms (idle)", "ms", figure("usr1", "msgd", "idle", "p99_ms"),
           at_most(5), why_usr1("idle", "task_idle")),
    Target("HUP → reload applied p99 ≤ 100 ms (stream running)", "ms",
           figure("hup", "msgd", "p99_ms"), at_most(100), why_figure("hup", "p99_ms")),
    Target("0 messages lost across the HUPs (all runs)", "lost", lost, at_most(0), why_hup_lost),
    Target("HUP → new handler code running p99 ≤ 1 s (workers replaced)", "ms",
           figure("hup-code", "msgd", "p99_ms"), at_most(1000), why_figure("hup-code", "p99_ms")),
    # counters
    Target("counter update ≤ 100 ns", "ns", figure("counters", "msgd", "lockfree_ns"),
           at_most(100), why_figure("counters", "lockfree_ns", unit="ns")),
    Target("counter update ≤ 1/10 of a locked Value update", "x",
           lambda r: per_round(values(r, "counters", "msgd", "lockfree_ns"),
                               values(r, "counters", "msgd", "locked_ns"), lambda a, b: a / b),
           at_most(0.1), why_counter_ratio),
    # issue 13: the listener must not cost the targets above
    Target("drain with 50 WebSocket subscribers ≥ 2.5x the bare 1-process claim loop", "x",
           lambda r: ratios(r, ("subscribers", "msgd", "fifty", "msgs_per_s"),
                            ("drain", "bare-1", "msgs_per_s")), at_least(2.5), why_subscribers),
    Target("drain with 50 WebSocket subscribers ÷ with none ≥ 0.97 (interleaved rounds)", "x",
           feed_ratios, at_least(0.97), why_subscribers),
    Target("USR1 → stats file p99 ≤ 5 ms with 50 WebSocket subscribers", "ms",
           figure("subscribers", "msgd", "fifty", "usr1", "p99_ms"), at_most(5),
           why_figure("subscribers", "fifty", "usr1", "p99_ms")),
]  # fmt: skip
