"""BENCHMARKS.md (and the README's performance paragraph) from one run's results.

A result is `results[scenario][system]`: `{"runs": [one dict per repeat]}`, or `{"error": ...}` /
`{"skipped": ...}`. Every figure shown is the median over the repeats with its range beside it;
a ratio between two systems is taken round by round (their runs alternate) and its median shown.
Targets and the reasons for a miss are computed here from those figures, never written by hand.
"""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import targets as goals
from figures import (
    LABELS,
    fmt,
    get,
    median,
    pick,
    process_name,
    ratios,
    runs,
    values,
    with_range,
)

WORKERS = 2  # as in every scenario

README_BEGIN = "<!-- bench/report.py: performance -->"
README_END = "<!-- /bench/report.py -->"


def cell(results: dict, scenario: str, system: str, keys: tuple[str, ...], digits: int = 0) -> str:
    return with_range(values(results, scenario, system, *keys), digits)


def cells(
    results: dict, scenario: str, system: str, *columns: tuple[tuple[str, ...], int]
) -> list[str]:
    """One cell per (keys, digits) column."""
    return [cell(results, scenario, system, keys, digits) for keys, digits in columns]


def status(results: dict, scenario: str, system: str) -> str:
    """Why a system has no figure (failed or skipped), for a table cell."""
    entry = results.get(scenario, {}).get(system) or {}
    if "skipped" in entry:
        return f"skipped: {entry['skipped']}"
    if "error" in entry:
        return "FAILED (see bench/out/)"
    return "—"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def system_rows(
    results: dict,
    scenario: str,
    columns: Sequence[tuple[tuple[str, ...], int]],
    versus: bool = True,
) -> list[list[str]]:
    """One row per system in the scenario: its figures (median and range), then msgd ÷ it."""
    rows = []
    for system in LABELS:
        if system not in results.get(scenario, {}):
            continue
        if not runs(results, scenario, system):
            reason = [status(results, scenario, system)]
            rows.append([LABELS[system], *reason, *[""] * (len(columns) - 1 + versus)])
            continue
        row = [LABELS[system], *(cell(results, scenario, system, k, d) for k, d in columns)]
        if versus:
            rate = ("msgs_per_s",)
            found = ratios(results, (scenario, "msgd", *rate), (scenario, system, *rate))
            row.append("—" if system == "msgd" else with_range(found, 2, "x"))
        rows.append(row)
    return rows


# --- targets --------------------------------------------------------------------------------------


@dataclass
class Verdict:
    what: str
    found: list[float]  # per run or per round; the verdict is on their median
    unit: str
    met: bool | None  # None: not measured
    reason: str  # why it missed, computed from the run ("" when met)


def verdicts(results: dict) -> list[Verdict]:
    out = []
    for target in goals.TARGETS:
        found = target.measure(results)
        value = median(found)
        met = None if value is None else target.ok(value)
        reason = target.why(results) if met is False else ""
        out.append(Verdict(target.what, found, target.unit, met, reason))
    return out


def show(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3f}x" if value < 1 else f"{value:.2f}x"
    if unit == "%":
        return f"{value * 100:.1f}%"
    if unit == "lost":
        return f"{value:.0f} lost"
    return f"{value:.1f} {unit}"


def shown(v: Verdict) -> str:
    middle = show(statistics.median(v.found), v.unit)
    if len(v.found) < 2:
        return middle
    return f"{middle} ({show(min(v.found), v.unit)} - {show(max(v.found), v.unit)})"


def target_section(results: dict) -> tuple[list[str], list[Verdict]]:
    rows, done = [], verdicts(results)
    for v in done:
        if v.met is None:
            rows.append([v.what, "not measured", "NOT RUN"])
        else:
            rows.append([v.what, shown(v), "met" if v.met else "**MISSED**"])
    missed = [v for v in done if v.met is False]
    met = sum(1 for v in done if v.met)
    lines = table(["target", "measured: median (range over runs or rounds)", "verdict"], rows)
    lines.append(f"\n{met} targets met, {len(missed)} MISSED, {len(done) - met - len(missed)} "
                 "not run.\n")  # fmt: skip
    if missed:
        lines.append("### Missed, and why (computed from this run's figures)\n")
        lines += [f"- **{v.what}**: {v.reason}" for v in missed]
        lines.append("")
    return lines, missed


# --- the document ---------------------------------------------------------------------------------


def markdown(results: dict, meta: dict) -> str:
    out: list[str] = ["# Benchmarks\n"]
    out.append(
        "Generated by `bench/run.py` (do not edit by hand: run `make bench` to refresh). "
        "Every system ran in the same run, on the same machine, in alternating rounds.\n"
    )
    out += machine(meta)
    out.append("## Targets\n")
    lines, _ = target_section(results)
    out += lines
    out.append("![throughput and latency per system](bench/chart.png)\n")
    out.append("## Method\n")
    out.append(METHOD.format(**{**DEFAULT_META, **meta}))
    for section in SECTIONS:
        out += section(results, meta)
    out += failures(results)
    return "\n".join(out).rstrip() + "\n"


DEFAULT_META = {"rate": "?", "repeats": 1, "drain_n": "?", "unit_ms": 0.0}


def machine(meta: dict) -> list[str]:
    out = ["## Machine and command\n", "| | |\n| --- | --- |"]
    for key in ("date", "cores", "cpu", "python", "kernel", "spool_fs", "peers", "redis", "mode"):
        out.append(f"| {key.replace('_', ' ')} | {meta.get(key, '—')} |")
    out.append(f"\nCommand: `{meta.get('command')}` (total {meta.get('total_seconds', 0):.0f} s)\n")
    out.append(
        "One scenario alone, every system: `.venv/bin/python bench/run.py --only SCENARIO[,...]` "
        "(`--quick`: smaller sizes, one run each); scenarios: "
        f"{', '.join(meta.get('scenarios', []))}.\n"
    )
    if meta.get("partial"):
        out.append(f"**Partial run** (`--only {meta['partial']}`): other scenarios were not run.\n")
    return out


def intro(title: str, text: str) -> list[str]:
    """A section's heading and its opening paragraph."""
    return [title + "\n", text]


def drain_section(results: dict, meta: dict) -> list[str]:
    out = intro(
        "## Drain (pre-enqueued no-op messages)",
        f"{fmt(meta.get('drain_n'))} messages sent durably before the consumers start; "
        f"{meta.get('repeats', 1)} run(s) per system.\n",
    )
    cols = [(("msgs_per_s",), 0), (("seconds",), 3)]
    out += table(
        ["system", "msgs/s", "seconds", "msgd ÷ system"], system_rows(results, "drain", cols)
    )
    return [*out, ""]


def stream_section(results: dict, meta: dict) -> list[str]:
    out = intro(
        f"## Stream at {fmt(meta.get('rate'))} msgs/s offered (latency at equal load)",
        "One producer offers one message at a time on a fixed schedule, the same rate for every "
        f"system. Sustained = the producer kept ≥ 95% of the offered rate and the last message "
        f"was handled within {LAG_LIMIT:g} s of the last send (no backlog left growing).\n",
    )
    head = ["system", "sent msgs/s", "latency p50 ms", "latency p99 ms",
            "last handled after the last send, s", "sustained"]  # fmt: skip
    rows = []
    for system in LABELS:
        if system not in results.get("stream", {}):
            continue
        if not runs(results, "stream", system):
            rows.append([LABELS[system], status(results, "stream", system), "", "", "", ""])
            continue
        found = runs(results, "stream", system)
        sent = with_range([r["n"] / r["send_seconds"] for r in found])
        lag = with_range([r["seconds"] - r["send_seconds"] for r in found], 3)
        latency = cells(results, "stream", system, (("p50_ms",), 2), (("p99_ms",), 2))
        rows.append([LABELS[system], sent, *latency, lag, sustained(found, meta)])
    return out + table(head, rows) + [""]


LAG_LIMIT = 1.0  # seconds


def sustained(found: list[dict], meta: dict) -> str:
    rate = meta.get("rate")
    if not isinstance(rate, int | float):
        return "—"
    kept = [
        r["n"] / r["send_seconds"] >= 0.95 * rate and r["seconds"] - r["send_seconds"] <= LAG_LIMIT
        for r in found
    ]
    return f"{sum(kept)} of {len(kept)} runs"


def latency_section(results: dict, meta: dict) -> list[str]:
    out = intro(
        "## send → handler start, idle daemon",
        "One `msgd.send` at a time, 10-30 ms apart. Beside each: the `msgd.send` call alone, and "
        "one flush of this disk measured in the same minutes (100 bytes appended to an open file "
        "+ fdatasync).\n",
    )
    head = ["msgd", "p50 ms", "p99 ms", "max ms", "send call p99 ms", "flush p50 ms",
            "flush p99 ms"]  # fmt: skip
    rows = []
    for system in ("msgd-nofsync", "msgd"):
        if not runs(results, "idle-latency", system):
            rows.append([LABELS[system], status(results, "idle-latency", system), *[""] * 5])
            continue
        keys = [("p50_ms",), ("p99_ms",), ("max_ms",), ("send_call", "p99_ms"),
                ("flush", "p50_ms"), ("flush", "p99_ms")]  # fmt: skip
        rows.append(
            [LABELS[system], *cells(results, "idle-latency", system, *((k, 2) for k in keys))]
        )
    return out + table(head, rows) + [""]


def cpu_section(results: dict, meta: dict) -> list[str]:
    out = intro(
        "## CPU-bound (~5 ms of pure-Python work per message)",
        "The unit of work is timed inside the workers (each `burn()` in the process that runs it); "
        "efficiency = messages x the median unit ÷ (2 x the measured span): the share of two "
        "workers' time spent in the work. The ceiling is the bare claim loop in 2 processes on "
        "the same flushed files.\n",
    )
    cols = [(("efficiency",), 3), (("unit_ms",), 2), (("msgs_per_s",), 0), (("seconds",), 2)]
    head = ["system", "efficiency", "unit ms", "msgs/s", "seconds", "msgd ÷ system (msgs/s)"]
    return out + table(head, system_rows(results, "cpu", cols)) + [""]


def send_section(results: dict, meta: dict) -> list[str]:
    out = ["## Sending (the producer side, no consumer running)\n"]
    rows = []
    for system in ("msgd", "huey-sqlite", "msgd-nofsync", "huey-sqlite-nofsync"):
        for keys, how in (("send", "one by one"), ("send_many", "batch")):
            batch = "`send_many`" if system.startswith("msgd") else "`task.map`"
            label = f"{LABELS[system]}, {how}" + (f" ({batch})" if keys == "send_many" else "")
            if not runs(results, "send", system):
                rows.append([label, status(results, "send", system), ""])
                continue
            n = fmt(get(results, "send", system, keys, "n"))
            rows.append([label, n, cell(results, "send", system, (keys, "msgs_per_s"))])
    out += table(["producer", "messages", "msgs/s"], rows)
    out.append(
        "\nHuey's batch call `task.map` enqueues task by task (one commit each); msgd's "
        "`send_many` makes the whole batch durable with one flush.\n"
    )
    out.append("This disk's floors, measured in the same rounds (100 bytes each):\n")
    floors = [[label, cell(results, "send", "disk", (key, "msgs_per_s"))] for key, label in FLOORS]
    out += table(["operation", "per second"], floors)
    out.append("\n4 producer processes, each sending one message at a time, flushes on:\n")
    four = [
        [LABELS[s], cell(results, "send-4", s, ("msgs_per_s",))] for s in ("msgd", "huey-sqlite")
    ]
    return out + table(["system", "msgs/s"], four) + [""]


FLOORS = (
    ("file_two_flushes", "new file + rename, the file and the directory flushed"),
    ("file_one_flush", "new file + rename, the file flushed"),
    ("append_fdatasync", "append to one open file + fdatasync"),
    ("overwrite_fdatasync", "overwrite in place in a written file + fdatasync (a reused WAL)"),
    ("unlink_flushed", "unlink of a flushed file (a spool message finished)"),
)


def signals_section(results: dict, meta: dict) -> list[str]:
    out = ["## Signals (msgd)\n"]
    rows = []
    for label, scenario, keys in SIGNALS:
        columns = [((*keys, k), 2) for k in ("p50_ms", "p99_ms", "max_ms")]
        samples = fmt(get(results, scenario, "msgd", *keys, "samples"))
        rows.append([label, *cells(results, scenario, "msgd", *columns), samples])
    out += table(["signal → effect", "p50 ms", "p99 ms", "max ms", "samples per run"], rows)
    hup = runs(results, "hup", "msgd")
    if hup:
        total = lambda key: sum(r[key] for r in hup)  # noqa: E731
        saturated = [r.get("saturated_throughout") for r in runs(results, "usr1", "msgd")]
        out.append(
            f"\nDuring the HUPs (all runs) the producer sent {total('sent'):,} messages; "
            f"{total('handled'):,} were handled, {total('lost')} lost, {total('duplicates')} "
            f"handled twice, {total('failed')} in failed/. Pool saturated throughout the USR1 "
            f"samples: {saturated}.\n"
        )
    return out


SIGNALS = (
    ("kill USR1 → action task running, idle", "usr1", ("task_idle",)),
    ("kill USR1 → action task running, pool saturated", "usr1", ("task_saturated",)),
    ("USR1 → stats file rewritten, idle", "usr1", ("idle",)),
    ("USR1 → stats file rewritten, pool saturated", "usr1", ("saturated",)),
    ("HUP → reload applied, stream running", "hup", ()),
    ("HUP → first message run by the changed handler code", "hup-code", ()),
)


def counters_section(results: dict, meta: dict) -> list[str]:
    out = ["## Counters\n"]
    rows = (
        ("lock-free `Array('Q', lock=False)` slot `+= 1` (msgd)", "lockfree_ns"),
        ("locked `Value`: `with v.get_lock(): v.value += 1`", "locked_ns"),
        ("msgd's per-message `SlotWriter.start` + `intend` + `finish`", "per_message_ns"),
    )
    body = [[label, cell(results, "counters", "msgd", (key,), 1)] for label, key in rows]
    out += table(["update", "ns"], body)
    out.append("\nEmpty-loop overhead subtracted; best of 5 per run.\n")
    out.append("### Drain with counters on vs off (measured)\n")
    entry = (runs(results, "nocounters", "msgd") or [{}])[0]
    if not entry:
        return [*out, f"Not measured: {status(results, 'nocounters', 'msgd')}.\n"]
    out.append(
        f"{entry.get('rounds')} rounds; each round drains once per way, the order rotating. "
        "Off = `SlotWriter.start`/`intend`/`finish` made no-ops before the workers fork; the "
        "control starts msgd through the same launcher with nothing patched.\n"
    )
    arms = (("counters on", "on_runs"), ("counters off", "off_runs"), ("control", "control_runs"))
    body = [[label, with_range(entry.get(key, [])), ", ".join(fmt(v) for v in entry.get(key, []))]
            for label, key in arms]  # fmt: skip
    out += table(["msgd drain", "msgs/s", "every round"], body)
    on_off, control = goals.counters_rounds(results)
    out.append(
        f"\nPer round, on ÷ off: {with_range(on_off, 3, 'x')}; control ÷ on (the same code, "
        f"twice: the noise): {with_range(control, 3, 'x')}.\n"
    )
    return out


def memory_section(results: dict, meta: dict) -> list[str]:
    out = ["## Memory (idle, after a few messages)\n"]
    rows = []
    for system in ("msgd", "huey-sqlite", "celery"):
        if system not in results.get("memory", {}):
            continue
        if not runs(results, "memory", system):
            rows.append([LABELS[system], status(results, "memory", system), "", ""])
            continue
        columns = ((("processes",), 0), (("pss_mib",), 1), (("rss_mib",), 1))
        rows.append([LABELS[system], *cells(results, "memory", system, *columns)])
    out += table(["system", "processes", "PSS MiB", "RSS MiB"], rows)
    detail = pick(results, "memory", "msgd", "pss_mib").get("per_process", [])
    if detail:
        out.append("\nmsgd per process (the median run):\n")
        body = [[process_name(p), fmt(p["pss_kib"] / 1024, 1),
                 fmt(p.get("ssl_pss_kib", 0) / 1024, 1)] for p in detail]  # fmt: skip
        out += table(["process", "PSS MiB", "of it OpenSSL (libssl, libcrypto, _ssl)"], body)
    out.append("\nWhole process tree of the master/consumer; Huey's includes its scheduler.\n")
    return out


def start_section(results: dict, meta: dict) -> list[str]:
    out = ["## Start → READY (msgd)\n"]
    c = lambda *k: cell(results, "start", "msgd", k, 1)  # noqa: E731
    run = pick(results, "start", "msgd", "ready", "p50_ms")
    loaded, checked = run.get("optional_imported") or [], run.get("optional_checked") or []
    out.append(
        f"`sd_notify` READY=1 on a bound NOTIFY_SOCKET: p50 {c('ready', 'p50_ms')} ms, max "
        f"{c('ready', 'max_ms')} ms; state file present at p50 {c('state_file_p50_ms')} ms. "
        f"In fresh interpreters: Python's own start p50 {c('python_start_p50_ms')} ms; importing "
        f"msgd's console-script module p50 {c('import_p50_ms')} ms. Of the modules a start "
        f"needs only when configured, or never ({', '.join(checked)}), it loads: "
        f"{', '.join(loaded) or 'none'}.\n"
    )
    return out


def subscribers_section(results: dict, meta: dict) -> list[str]:
    out = ["## With 50 WebSocket subscribers\n"]
    if not runs(results, "subscribers", "msgd"):
        return [*out, f"Not measured: {status(results, 'subscribers', 'msgd')}.\n"]
    head = ["subscribers", "burst drain msgs/s", "÷ none (rounds)", "USR1 → stats p99 ms",
            "events seen (min)", "told missed (max)", "accounted for (min)",
            "CPU s in the drain: workers", "listener", "clients"]  # fmt: skip
    rows = []
    for arm in ("none", "fifty", "fifty-here", "none-again"):
        columns = (
            ((arm, "msgs_per_s"), 0),
            ((arm, "usr1", "p99_ms"), 2),
            ((arm, "events_min"), 0),
            ((arm, "missed_max"), 0),
            ((arm, "accounted_min"), 0),
            ((arm, "cpu_s", "workers"), 2),
            ((arm, "cpu_s", "listener"), 2),
            ((arm, "cpu_s", "clients"), 2),
        )
        figures = cells(results, "subscribers", "msgd", *columns)
        ratio = "—" if arm == "none" else with_range(goals.feed_ratios(results, arm), 3, "x")
        rows.append([arm, figures[0], ratio, *figures[1:]])
    return out + table(head, rows) + ["", *feed_text(results), ""]


def feed_text(results: dict) -> list[str]:
    """What the arms are, and what the clients cost, from this run's figures."""
    cpu = lambda arm, part: fmt(goals.feed_cpu(results, arm, part), 2)  # noqa: E731
    here = median(goals.feed_ratios(results, "fifty-here"))
    return [
        "Arm *fifty* runs the 50 clients' process at the lowest priority (SCHED_IDLE, in "
        "msgd's session, so that a waking worker preempts it): it stands for browsers on other "
        "machines, but still runs in the gaps the drain leaves and shares the caches and the "
        f"kernel's loopback work with it ({cpu('fifty', 'clients')} CPU s of clients during the "
        "drain). "
        "Arm *fifty-here* runs the same clients as an ordinary process on the same two cores: "
        "whatever they use is taken from the drain "
        f"(here {cpu('fifty-here', 'clients')} CPU s of clients; the drain made "
        f"{fmt(here, 3, 'x')} of arm *none*'s). The listener's own cost is its CPU column: "
        f"{cpu('fifty', 'listener')} s with 50 subscribers, {cpu('none', 'listener')} s with "
        "none. Arm *none-again* is arm *none* run once more: its ÷ none is the noise between two "
        "runs of the same thing. The arms are interleaved in rounds; ÷ none is per round. A "
        "subscriber more than "
        "2,000 frames behind is skipped ahead and told how many events it missed; accounted for: "
        "the fewest events a subscriber saw or was told it missed, of the "
        f"{fmt(get(results, 'subscribers', 'msgd', 'none', 'n'))} drained.",
    ]


def failures(results: dict) -> list[str]:
    errors = [
        f"- {scenario} / {system}: {entry.get('error')}"
        for scenario, found in results.items()
        for system, entry in found.items()
        if isinstance(entry, dict) and "error" in entry
    ]
    return ["## Failures in this run\n", *errors, ""] if errors else []


SECTIONS = (
    drain_section,
    stream_section,
    latency_section,
    cpu_section,
    send_section,
    signals_section,
    counters_section,
    memory_section,
    start_section,
    subscribers_section,
)


# --- the README's paragraph ---------------------------------------------------------------------


def readme_paragraph(results: dict, meta: dict) -> str:
    """What the README says about performance: a few headline figures and every miss."""
    _, missed = target_section(results)
    drain = get(results, "drain", "msgd", "msgs_per_s")
    versus = lambda system: median(ratios(results, ("drain", "msgd", "msgs_per_s"),  # noqa: E731
                                          ("drain", system, "msgs_per_s")))  # fmt: skip
    peers = [
        f"{fmt(versus(system), 1, 'x')} {label}"
        for system, label in (
            ("bare-1", "the bare single-process claim loop"),
            ("huey-sqlite-nofsync", "Huey (SQLite) at equal durability"),
            ("celery", "Celery"),
        )
        if versus(system) is not None
    ]
    text = (
        "`make bench` measures msgd and its peers side by side in one run on the same machine and "
        "rewrites [BENCHMARKS.md](BENCHMARKS.md): the figures with their spread over repeated "
        "runs, each target met or missed with the reason computed from the run, and a chart. "
        f"In the run of {meta.get('date', '?')} ({meta.get('cores', '?')} cores, "
        f"{meta.get('mode', '?')} mode), draining {fmt(meta.get('drain_n'))} durably sent no-op "
        f"messages with 2 workers: msgd {fmt(drain)} msgs/s"
        + "".join(f", {p}" for p in peers)
        + "."
    )
    if not missed:
        return textwrap.fill(text + " Every target was met.", 100)
    listed = "; ".join(f"{v.what} (measured {shown(v)})" for v in missed)
    return textwrap.fill(text + f" Missed there ({len(missed)}): {listed}.", 100)


def update_readme(readme: str, paragraph: str) -> str:
    """The README's text with the part between the markers replaced by `paragraph`."""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README.md lacks the markers {README_BEGIN} ... {README_END}")
    return readme[: begin + len(README_BEGIN)] + "\n" + paragraph + "\n" + readme[end:]


METHOD = """\
- 2 workers everywhere (2 cores). msgd: `workers = 2`, one continuous queue, JSON log to a file,
  `fsync = true` unless a row says `fsync = false` (it changes the producer's flushes only: claims
  and unlinks are never flushed). Huey: consumer `-k process -w 2`; SQLite in WAL mode with
  `fsync=True` (synchronous=FULL: a flush per commit, enqueue and dequeue alike) or `fsync=False`
  (synchronous=OFF: no flush at all). Consuming, msgd flushes nothing, so the drain compares it
  with Huey `fsync=False` (equal durability); sending, `fsync = true` goes against `fsync=True`.
  Celery: `worker -P prefork -c 2`, Redis broker, no result backend, default prefetch.
  Textbook: `multiprocessing.Queue` + 2 `Process` consumers, and `multiprocessing.Pool(2).imap`
  with its default chunksize (1). Redis: our own `redis-server` on a free loopback port,
  `--save '' --appendonly no` (nothing flushed).
- Every figure is repeated ({repeats} run(s) per system and scenario, in rounds: every system
  once, then again), and shown as the median with the range over the runs. A ratio between two
  systems is taken per round and its median shown with its range.
- Every system runs the same handler body (`bench/tasks.py`). Each handler process records,
  lock-free in its own shared-memory file (`bench/probe.py`), its first handler start, last
  handler end, count and one value per message (latency, the unit of work's time, or sequence
  number). The driver reads these files; no system is timed by its own statistics.
- The bare claim loop is the one ceiling, for the drain and the CPU-bound scenario alike: the
  same durably sent files, handled by 2 forked processes (as many as msgd's workers), each
  `listdir(new/)`, then per file `rename` into `cur/`, `open`+`read`, the handler, `unlink` (one
  walks the listing backwards, so they rarely race). No daemon, counters, log or background
  unlinks. The 1-process loop is the same code in one process (the drain target's baseline).
- Drain and CPU-bound: the messages are enqueued first, then the consumers start; time runs from
  the first handler start to the last handler end, so start-up is not counted for anyone. msgd
  may unlink finished files on background threads (while unlinks wait on the device), so its time
  runs on until no message file is left in `new/` or `cur/` (the bare loop unlinks as it goes:
  its time ends with its last handler).
- Stream: consumers started and warmed up first; one producer offers {rate} msgs/s on a fixed
  schedule (`msgd.send`, Huey task call, Celery `delay`, `Queue.put`, a generator fed to `imap`)
  with `time.time()` in the body; latency = handler start - that time.
- Sending: no consumer runs. One by one: `msgd.send`, a Huey task call. Batch: `msgd.send_many`,
  Huey's `task.map`. 4 producers: 4 forked processes, each sending one at a time, timed from the
  common start to the last one's end. The disk floors are measured in the same rounds
  (`bench/disk.py`).
- Signals: the driver watches the file's directory with inotify and reads the file after each
  rename; USR1 until the stats file's `generation` moves, HUP until the state file's
  `generations.reload` moves (msgd acknowledges a reload once its first new worker has imported
  the handlers, the reload's check, and claims in place of the old ones; the rest of the new
  workers are forked after that); after the handler's module was rewritten, HUP until a message
  sent every 2 ms is run by the new code. Kill → action task running: the driver's
  `time.monotonic()` before `kill` against the state file's `began_monotonic`. Samples are spaced
  10-30 ms apart at random. Saturated = both workers busy with ~5 ms messages throughout
  (checked). Runtime files on a tmpfs, as msgd's defaults put them in /run/msgd.
- Memory: summed `Pss`/`Rss` from `/proc/PID/smaps_rollup` over the process tree, 1 s idle
  after warm-up messages; OpenSSL's share from `/proc/PID/smaps`.
- Start: `msgd -c CONFIG` started with `NOTIFY_SOCKET` set to a datagram socket bound by the
  driver; time until `READY=1` arrives.
- The disk is a virtual disk: durable-write and unlink times vary between runs by up to ~2x,
  so compare figures within one run, not across runs.
"""
