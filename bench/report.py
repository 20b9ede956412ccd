"""BENCHMARKS.md from a results dictionary: machine, command, method, tables, targets."""

from __future__ import annotations

from collections.abc import Callable

WORKERS = 2  # as in every scenario

LABELS = {
    "msgd": "msgd",
    "bare": "bare loop (1 process; CPU: 2 forked processes)",
    "mp-queue": "multiprocessing.Queue",
    "mp-pool": "multiprocessing.Pool",
    "huey-sqlite": "Huey (SQLite)",
    "huey-redis": "Huey (Redis)",
    "celery": "Celery (Redis)",
}


def get(results: dict, scenario: str, system: str, *keys: str) -> float | None:
    value = results.get(scenario, {}).get(system)
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, int | float) else None


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def status(runs: dict, system: str) -> str:
    """Why a system has no figure (failed or skipped), for a table cell."""
    entry = runs.get(system) or {}
    if "skipped" in entry:
        return f"skipped: {entry['skipped']}"
    if "error" in entry:
        return "FAILED (see bench/out/)"
    return "—"


def throughput_table(results: dict, scenario: str, extra: list[tuple[str, str, int]]) -> list[str]:
    """Systems as rows: msgs/s, extra columns, and msgd's ratio to each."""
    runs = results.get(scenario, {})
    base = get(results, scenario, "msgd", "msgs_per_s")
    head = ["system", "msgs/s", *(title for title, _, _ in extra), "msgd ÷ system"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for system in LABELS:
        if system not in runs:
            continue
        rate = get(results, scenario, system, "msgs_per_s")
        if rate is None:
            lines.append(f"| {LABELS[system]} | {status(runs, system)} |" + " |" * (len(head) - 2))
            continue
        cells = [LABELS[system], fmt(rate)]
        cells += [fmt(get(results, scenario, system, key), d) for _, key, d in extra]
        r = ratio(base, rate)
        cells.append("—" if system == "msgd" else fmt(r, 2, "x"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


Target = tuple[str, float | None, str, Callable[[float], bool]]


def at_least(limit: float) -> Callable[[float], bool]:
    return lambda v: v >= limit


def at_most(limit: float) -> Callable[[float], bool]:
    return lambda v: v <= limit


def targets(results: dict) -> list[Target]:
    """(what, measured value, how it is shown, whether it meets the target)."""

    def msgd(*keys: str) -> float | None:
        return get(results, keys[0], "msgd", *keys[1:])

    def drain_vs(system: str) -> float | None:
        return ratio(msgd("drain", "msgs_per_s"), get(results, "drain", system, "msgs_per_s"))

    pss = msgd("memory", "pss_mib")
    send_many = ratio(
        msgd("send", "send_many", "msgs_per_s"), get(results, "send", "huey-sqlite", "msgs_per_s")
    )

    def stream_vs(system: str) -> float | None:
        return ratio(msgd("stream", "msgs_per_s"), get(results, "stream", system, "msgs_per_s"))

    return [
        ("drain ≥ 1.5x the bare loop", drain_vs("bare"), "x", at_least(1.5)),
        ("drain ≥ 3x Huey (SQLite)", drain_vs("huey-sqlite"), "x", at_least(3)),
        ("drain ≥ 10x Celery", drain_vs("celery"), "x", at_least(10)),
        ("stream ≥ 3x Huey (SQLite)", stream_vs("huey-sqlite"), "x", at_least(3)),
        ("stream ≥ 10x Celery", stream_vs("celery"), "x", at_least(10)),
        (
            "send → handler start p99 ≤ 1 ms (idle daemon)",
            msgd("idle-latency", "p99_ms"),
            "ms",
            at_most(1),
        ),
        ("send_many ≥ Huey (SQLite) enqueue", send_many, "x", at_least(1)),
        ("CPU-bound parallel efficiency ≥ 95%", msgd("cpu", "efficiency"), "%", at_least(0.95)),
        (
            "kill → action task running p99 ≤ 1 ms (idle)",
            msgd("usr1", "task_idle", "p99_ms"),
            "ms",
            at_most(1),
        ),
        (
            "kill → action task running p99 ≤ 5 ms (pool saturated)",
            msgd("usr1", "task_saturated", "p99_ms"),
            "ms",
            at_most(5),
        ),
        ("USR1 → stats file p99 ≤ 5 ms (idle)", msgd("usr1", "idle", "p99_ms"), "ms", at_most(5)),
        (
            "USR1 → stats file p99 ≤ 5 ms (pool saturated)",
            msgd("usr1", "saturated", "p99_ms"),
            "ms",
            at_most(5),
        ),
        (
            "HUP → reload applied p99 ≤ 100 ms (stream running)",
            msgd("hup", "p99_ms"),
            "ms",
            at_most(100),
        ),
        ("0 messages lost across the HUPs", msgd("hup", "lost"), "lost", at_most(0)),
        (
            "HUP → new handler code running p99 ≤ 1 s (workers replaced)",
            msgd("hup-code", "p99_ms"),
            "ms",
            at_most(1000),
        ),
        (
            "master + 2 workers PSS ≤ 30 MB (10^6 bytes)",
            pss * 1.048576 if pss is not None else None,
            "MB",
            at_most(30),
        ),
        ("start → READY p50 ≤ 300 ms", msgd("start", "ready", "p50_ms"), "ms", at_most(300)),
        ("counter update ≤ 100 ns", msgd("counters", "lockfree_ns"), "ns", at_most(100)),
        (
            "counter update ≤ 1/10 of a locked Value update",
            ratio(msgd("counters", "lockfree_ns"), msgd("counters", "locked_ns")),
            "x",
            at_most(0.1),
        ),
        (
            "drain with counters ≥ 97% of counters off (bound from their cost, see below)",
            counters_share(results),
            "%",
            at_least(0.97),
        ),
    ]


def why_missed(results: dict) -> dict[str, str]:
    """Where the time (or the memory) goes, for each target that can miss on this machine."""
    num = lambda *keys: fmt(get(results, *keys), 1)  # noqa: E731
    procs = results.get("memory", {}).get("msgd", {}).get("per_process", [])
    master_rss = next((p["rss_kib"] / 1024 for p in procs if "master" in p["cmd"]), None)
    return {
        "stream ≥": (
            "A stream's rate is its producer's: one `msgd.send` is durable on return, which "
            "costs two flushes (the file, then new/ after the rename); a Huey (SQLite) task call "
            "is one WAL commit, a Celery call a Redis write that is not flushed at all. msgd's "
            "workers keep up (latency p50 "
            f"{num('stream', 'msgd', 'p50_ms')} ms) where the peers' fall behind by seconds; "
            "batches (`send_many`, one flush for all) are in the send table. A single send with "
            "one flush would need the filesystem's word that an fsync'd file's rename is "
            "durable with it, which POSIX does not give."
        ),
        "send → handler start": (
            "The time runs from the call of `msgd.send`, which flushes the message file to disk "
            "before it renames it into new/ (a message is never visible before it is durable): "
            "that flush is ~0.5-1 ms on this disk, most of the figure. The queue's own part, "
            "inotify waking an idle worker, the claim and the read, is ~0.1-0.2 ms."
        ),
        "CPU-bound": (
            "msgd's own work per message (rename into cur/, open and read, the unlink on a "
            "background thread, the counters) is ~75 µs of user and ~100 µs of kernel time in the "
            "worker, ~3.5% of a 5 ms message. The rest is mostly the handler itself running "
            "slower than in the bare processes (handler time "
            f"{num('cpu', 'msgd', 'handler_busy_seconds')} s against "
            f"{num('cpu', 'bare', 'handler_busy_seconds')} s for the same work), likely the "
            "caches cooled by the system calls and thread wake-ups between messages; and this "
            "machine's speed drifts (the bare ceiling read 93-110% in today's full runs, msgd "
            "83-101%; runs of this scenario alone reached 94-96%)."
        ),
        "USR1 → stats file p99 ≤ 5 ms (pool saturated)": (
            "The dump counts each queue's waiting messages by listing its directory (~0.2 µs a "
            f"name; {fmt(get(results, 'usr1', 'msgd', 'queued'))} were waiting), on a master "
            "that shares the 2 cores with 2 workers running CPU-bound messages: the signal alone "
            f"reaches the task in {num('usr1', 'msgd', 'task_saturated', 'p99_ms')} ms at p99 "
            "(above), and the dump's ~0.6 ms of CPU is stretched several times by preemption. "
            "Counting without listing would need every producer to count what it sends, which "
            "plain maildir producers do not."
        ),
        "master + 2 workers PSS": (
            "asyncio imports ssl and with it OpenSSL, ~5 MB of the master's "
            f"{fmt(master_rss, 1)} MiB RSS (structlog imports asyncio "
            "too, so no msgd process goes without it); each forked worker then copies the pages "
            "it touches, ~5 MB: CPython 3.11 writes a reference count into every object a worker "
            "uses, and into the static types in libpython's data (~0.8 MB of it). The workers "
            "share the rest with the master. Huey (SQLite), measured the same way: "
            f"{num('memory', 'huey-sqlite', 'pss_mib')} MiB."
        ),
        "counter update ≤ 1/10": (
            "An update is a read-modify-write of one shared 64-bit slot from Python (`a[i] += 1` "
            "on a memoryview, ~45 ns: the read makes an int object; a bare store is ~15 ns, "
            "ctypes' element access ~55 ns). The ratio sits at 1/10 (0.096-0.106 across runs) "
            "because a locked Value costs ~440 ns here, not the ~1,000 ns the target assumed."
        ),
    }


def counters_share(results: dict) -> float | None:
    """The drain's throughput with counters as a share of it without: at least 1 - c / t, where
    c is the updates' cost per message and t a worker's time per message in the drain (each
    worker works one message at a time, so c adds to t at most once). Timing the drain with and
    without them cannot tell: runs of the same kind differ by more than c / t (the control)."""
    cost = get(results, "counters", "msgd", "per_message_ns")
    rate = get(results, "drain", "msgd", "msgs_per_s")
    if cost is None or not rate:
        return None
    return 1 - cost * 1e-9 / (WORKERS / rate)


def show(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3f}x" if value < 1 else f"{value:.2f}x"
    if unit == "%":
        return f"{value * 100:.1f}%"
    if unit == "lost":
        return f"{value:.0f} lost"
    return f"{value:.1f} {unit}"


def markdown(results: dict, meta: dict) -> str:
    out: list[str] = []
    add = out.append
    add("# Benchmarks\n")
    add(
        "Generated by `bench/run.py` (do not edit by hand: run `make bench` to refresh). "
        "Every system ran in the same run, on the same machine, one after the other.\n"
    )
    add("## Machine and command\n")
    add("| | |\n| --- | --- |")
    for key in ("date", "cores", "cpu", "python", "kernel", "spool_fs", "peers", "redis", "mode"):
        add(f"| {key.replace('_', ' ')} | {meta.get(key, '—')} |")
    add(f"\nCommand: `{meta['command']}` (total {meta.get('total_seconds', 0):.0f} s)\n")
    if meta.get("partial"):
        add(f"**Partial run** (`--only {meta['partial']}`): other scenarios were not run.\n")

    add("## Targets\n")
    add("| target | measured | verdict |\n| --- | --- | --- |")
    met, missed = 0, []
    for what, value, unit, ok in targets(results):
        if value is None:
            add(f"| {what} | not measured | NOT RUN |")
            continue
        good = ok(value)
        met += good
        missed += [] if good else [what]
        add(f"| {what} | {show(value, unit)} | {'met' if good else '**MISSED**'} |")
    add(f"\n{met} targets met, {len(missed)} MISSED.\n")
    reasons, told = why_missed(results), set()
    for what in missed:
        reason = next((r for start, r in reasons.items() if what.startswith(start)), None)
        add(f"- **{what}**: {'as above.' if reason in told else reason or 'not explained yet'}")
        told.add(reason)
    if missed:
        add("")
    add("![throughput and latency per system](bench/chart.png)\n")

    add("## Method\n")
    add(METHOD.format(**meta))

    add("## Drain (pre-enqueued no-op messages)\n")
    add(f"{meta.get('drain_n', '?'):,} messages, median of {meta.get('repeats', 1)} run(s).\n")
    out += throughput_table(results, "drain", [("seconds", "seconds", 3)])
    add("")
    add("## Stream (a producer sending one message at a time, at full speed)\n")
    out += throughput_table(
        results,
        "stream",
        [
            ("latency p50 ms", "p50_ms", 2),
            ("latency p99 ms", "p99_ms", 2),
            ("send s", "send_seconds", 2),
        ],
    )
    add("")
    add("## CPU-bound (~5 ms of pure-Python work per message)\n")
    add(
        "Unit of work: the same `burn()` timed alone in the driver just before each run "
        f"(~{meta.get('unit_ms', 0):.1f} ms; this machine's speed drifts by several % over "
        "minutes). Efficiency = (messages x unit / 2) / measured time. The bare row is the "
        "machine's ceiling: 2 forked processes running n/2 units each, no queue at all. "
        f"Median of {meta.get('repeats', 1)} run(s).\n"
    )
    out += throughput_table(
        results,
        "cpu",
        [("efficiency", "efficiency", 3), ("seconds", "seconds", 2), ("unit ms", "unit_ms", 2)],
    )
    add("")
    add("## Send rate (durable)\n")
    add("| producer | messages | msgs/s |\n| --- | --- | --- |")
    for label, keys, system in (
        ("msgd.send_many (one batch)", ("send_many",), "msgd"),
        ("msgd.send (one by one)", ("send",), "msgd"),
        ("Huey (SQLite) task call (one by one)", (), "huey-sqlite"),
    ):
        rate = get(results, "send", system, *keys, "msgs_per_s")
        n = get(results, "send", system, *keys, "n")
        add(f"| {label} | {fmt(n)} | {fmt(rate)} |")
    add("")
    add("## Signals (msgd)\n")
    add("| signal → effect | p50 ms | p99 ms | max ms | samples |\n| --- | --- | --- | --- | --- |")
    for label, keys in (
        ("kill USR1 → action task running, idle", ("usr1", "msgd", "task_idle")),
        ("kill USR1 → action task running, pool saturated", ("usr1", "msgd", "task_saturated")),
        ("USR1 → stats file rewritten, idle", ("usr1", "msgd", "idle")),
        ("USR1 → stats file rewritten, pool saturated", ("usr1", "msgd", "saturated")),
        ("HUP → reload applied, stream running", ("hup", "msgd")),
        ("HUP → first message run by the changed handler code", ("hup-code", "msgd")),
    ):
        cells = [fmt(get(results, *keys, k), 2) for k in ("p50_ms", "p99_ms", "max_ms")]
        add(f"| {label} | " + " | ".join(cells) + f" | {fmt(get(results, *keys, 'samples'))} |")
    hup = results.get("hup", {}).get("msgd", {})
    if "sent" in hup:
        add(
            f"\nDuring the HUPs the producer sent {hup['sent']:,} messages; "
            f"{hup['handled']:,} were handled, {hup['lost']} lost, "
            f"{hup['duplicates']} handled twice, "
            f"{hup['failed']} in failed/. Pool saturated throughout the USR1 samples: "
            f"{results.get('usr1', {}).get('msgd', {}).get('saturated_throughout', '—')}.\n"
        )
    add("## Counter update cost\n")
    c = results.get("counters", {}).get("msgd", {})
    add("| update | ns |\n| --- | --- |")
    lockfree = fmt(c.get("lockfree_ns"), 1)
    add(f"| lock-free `Array('Q', lock=False)` slot `+= 1` (msgd) | {lockfree} |")
    add(f"| locked `Value`: `with v.get_lock(): v.value += 1` | {fmt(c.get('locked_ns'), 1)} |")
    add(
        f"| msgd's per-message `SlotWriter.start` + `intend` + `finish` | "
        f"{fmt(c.get('per_message_ns'), 1)} |"
    )
    add(f"\nEmpty-loop overhead ({fmt(c.get('loop_overhead_ns'), 1)} ns) subtracted; best of 5.\n")
    add("### Drain with counters on vs off\n")
    on = get(results, "nocounters", "msgd", "on_msgs_per_s")
    off = get(results, "nocounters", "msgd", "msgs_per_s")
    entry = results.get("nocounters", {}).get("msgd", {})
    if off is None:
        add(f"Not measured: {entry.get('skipped') or entry.get('error') or 'not run'}.\n")
    else:
        control = get(results, "nocounters", "msgd", "control_msgs_per_s")
        add(
            f"Median of {entry.get('rounds')} rounds; each round drains once per way, the order "
            "rotating. The control starts msgd through the same launcher with nothing patched.\n"
        )
        add("| msgd drain | msgs/s | every run |\n| --- | --- | --- |")
        for label, rate, key in (
            ("counters on", on, "on_runs"),
            ("counters off (SlotWriter updates no-ops)", off, "off_runs"),
            ("control (launcher, counters on)", control, "control_runs"),
        ):
            add(f"| {label} | {fmt(rate)} | {', '.join(fmt(v) for v in entry.get(key, []))} |")
        share = counters_share(results)
        add(
            f"\nOn ÷ off: {fmt(ratio(on, off), 2, 'x')}; control ÷ on: "
            f"{fmt(ratio(control, on), 2, 'x')}, with the same code running: the spread between "
            "runs is larger than the effect, so the verdict above uses the bound "
            f"1 - c / t = {show(share, '%') if share is not None else '—'}, with c = "
            f"{fmt(c.get('per_message_ns'))} ns (table above) and t = 2 workers ÷ the drain's "
            "msgs/s.\n"
        )
    add("## Memory (idle, after a few messages)\n")
    add("| system | processes | PSS MiB | RSS MiB |\n| --- | --- | --- | --- |")
    for system in ("msgd", "huey-sqlite", "celery"):
        m = results.get("memory", {}).get(system)
        if m and "pss_mib" in m:
            figures = f"{m['processes']} | {m['pss_mib']:.1f} | {m['rss_mib']:.1f}"
            add(f"| {LABELS[system]} | {figures} |")
        elif m:
            add(f"| {LABELS[system]} | {status(results['memory'], system)} | | |")
    add("\nWhole process tree of the master/consumer; Huey's includes its scheduler process.\n")
    add("## Start → READY (msgd)\n")
    s = results.get("start", {}).get("msgd", {})
    add(
        f"`sd_notify` READY=1 received on a bound NOTIFY_SOCKET: p50 "
        f"{fmt(get(results, 'start', 'msgd', 'ready', 'p50_ms'), 1)} ms, max "
        f"{fmt(get(results, 'start', 'msgd', 'ready', 'max_ms'), 1)} ms over "
        f"{fmt(get(results, 'start', 'msgd', 'ready', 'samples'))} starts; state file present "
        f"at p50 {fmt(s.get('state_file_p50_ms'), 1)} ms.\n"
    )
    errors = [
        f"- {scenario} / {system}: {entry.get('error')}"
        for scenario, runs in results.items()
        for system, entry in runs.items()
        if isinstance(entry, dict) and "error" in entry
    ]
    if errors:
        add("## Failures in this run\n")
        out += errors
        add("")
    return "\n".join(out).rstrip() + "\n"


METHOD = """\
- 2 workers everywhere (2 cores). msgd: `workers = 2`, `fsync = true`, one continuous queue,
  JSON log to a file. Huey: consumer `-k process -w 2`; SQLite in WAL mode with `fsync=True`
  (synchronous=FULL). Celery: `worker -P prefork -c 2`, Redis broker, no result backend,
  default prefetch. Textbook: `multiprocessing.Queue` + 2 `Process` consumers, and
  `multiprocessing.Pool(2).imap` with its default chunksize (1). Redis: our own
  `redis-server` on a free loopback port, `--save '' --appendonly no`.
- Every system runs the same handler body (`bench/tasks.py`). Each handler process records,
  lock-free in its own shared-memory file (`bench/probe.py`), its first handler start, last
  handler end, count and one value per message (latency or sequence number). The driver reads
  these files; no system is timed by its own statistics.
- Drain and CPU-bound: the messages are enqueued first (msgd and the bare loop with the durable
  `msgd.send_many`), then the consumers start; time runs from the first handler start to the
  last handler end, so start-up is not counted for anyone. msgd unlinks finished files on
  background threads, so its drain time runs on until no message file is left in `new/` or
  `cur/` (the handler-only span is in `bench/out/results.json`). The bare loop is one process:
  `listdir(new/)`, then per file `rename` to `cur/`, `open`+`read`, handler, `unlink`.
- Stream: consumers started and warmed up first; one producer sends one message per call
  (`msgd.send`, Huey task call, Celery `delay`, `Queue.put`, a generator fed to `imap`) with
  `time.time()` in the body; latency = handler start - that time. msgs/s = messages / (last
  handler end - first send). A producer faster than the consumers builds a backlog, and the
  latency then shows the backlog.
- CPU-bound: `burn()` iterations calibrated to ~5 ms once; before each run the driver times
  them alone again (the unit); parallel efficiency = (messages x unit / 2) / measured time.
- Signals: the driver watches the file's directory with inotify and reads the file after each
  rename; USR1 until the stats file's `generation` moves, HUP until the state file's
  `generations.reload` moves; after the handler's module was rewritten, HUP until a message
  sent every 2 ms is run by the new code (the handler notes `time.monotonic()`). Kill → action
  task running: the driver's `time.monotonic()` before `kill` against the state file's
  `began_monotonic` for that USR1 (the same clock in every process). Samples are spaced
  10-30 ms apart at random. Saturated = both workers busy with ~5 ms messages throughout
  (checked). Runtime files (pidfile, state, stats) on a tmpfs, as msgd's defaults put them in
  /run/msgd; the spool on the disk.
- Memory: summed `Pss`/`Rss` from `/proc/PID/smaps_rollup` over the process tree, 1 s idle
  after warm-up messages.
- Start: `msgd -c CONFIG` started with `NOTIFY_SOCKET` set to a datagram socket bound by the
  driver; time until `READY=1` arrives.
- Counters off: msgd started through `bench/launch_nocounters.py`, which turns
  `msgd.stats.SlotWriter.start`/`intend`/`finish` into no-ops before the workers are forked; a
  control run goes through the same launcher with nothing patched.
- The disk is a virtual disk: durable-write and unlink times vary between runs by up to ~2x,
  so compare figures within one run, not across runs.
"""
