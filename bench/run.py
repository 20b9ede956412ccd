"""Benchmark msgd against its peers in one run; write BENCHMARKS.md and bench/chart.png.

    .venv/bin/python bench/run.py [--quick] [--only SCENARIO,...]   # make bench / make bench-quick
    .venv/bin/python bench/run.py --smoke   # tiny sizes, msgd + bare loop only, no peers:
                                            # exit 0 when every scenario produced a figure
    .venv/bin/python bench/run.py --tiny    # the same sizes with every peer: the whole pipeline
                                            # checked in a minute or two (bench/out/ only)
    .venv/bin/python bench/run.py --quick --only send,send-4   # some scenarios, every system

Run it with the interpreter that has msgd installed. The peers (Huey, Celery, matplotlib) live in
their own venv, .venv-bench at the repo root, created from bench/requirements.txt when missing;
their scenarios run as subprocesses of that venv's python. A private redis-server is started on a
free loopback port for the Redis-backed peers and stopped at the end. Work files go to bench/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report
from common import (
    BENCH_DIR,
    REPO_DIR,
    calibrate,
    cpu_model,
    filesystem_type,
    free_port,
    wait_for,
)

OUT = os.path.join(BENCH_DIR, "out")
BENCH_VENV = os.path.join(REPO_DIR, ".venv-bench")
BENCH_PY = os.path.join(BENCH_VENV, "bin", "python")
REQUIREMENTS = os.path.join(BENCH_DIR, "requirements.txt")
STAMP = os.path.join(BENCH_VENV, ".bench-requirements")
SCENARIOS = [
    "drain", "stream", "idle-latency", "cpu", "usr1", "hup", "hup-code", "counters", "memory",
    "start", "send", "send-4", "nocounters", "subscribers",
]  # fmt: skip
EXIT_SKIPPED = 3

# Sizes per mode: full, --quick, --smoke (--tiny: smoke's sizes). Every scenario runs `repeats`
# times per system, in rounds; the counters-off drain runs `rounds` rounds in one run of its own,
# the subscribers' arms `feed_rounds` rounds in each of theirs.
SIZES = {
    "full": dict(drain=20_000, stream=1_000, rate=200, latency=500, cpu=2_000, usr1=200, hup=30,
                 counters=1_000_000, start=10, send=5_000, send_one=2_000, disk=1_000,
                 repeats=3, rounds=9, feed_rounds=2),
    "quick": dict(drain=5_000, stream=400, rate=200, latency=100, cpu=400, usr1=30, hup=10,
                  counters=200_000, start=5, send=5_000, send_one=500, disk=300, repeats=1,
                  rounds=3, feed_rounds=2),
    "smoke": dict(drain=300, stream=40, rate=200, latency=10, cpu=20, usr1=5, hup=3,
                  counters=20_000, start=2, send=200, send_one=40, disk=40, repeats=1, rounds=3,
                  feed_rounds=1),
}  # fmt: skip
SIZES["tiny"] = SIZES["smoke"]
PRODUCERS = 4  # the send-4 scenario


@dataclass
class Run:
    scenario: str
    system: str
    script: str  # relative to bench/
    argv: list[str]
    peer: bool = False  # needs the bench venv
    redis: bool = False  # needs redis-server


MSGD, HUEY, CELERY, TEXTBOOK = (
    "msgd_bench.py", "peers/huey_peer.py", "peers/celery_peer.py", "peers/textbook.py"
)  # fmt: skip


class Plan:
    """The runs of one mode, added scenario by scenario."""

    def __init__(self) -> None:
        self.runs: list[Run] = []

    def add(self, scenario: str, system: str, script: str, argv: list, **kw: bool) -> None:
        self.runs.append(Run(scenario, system, script, [str(a) for a in argv], **kw))

    def peers(self, scenario: str, argv: list, huey_nofsync: bool = True) -> None:
        """The textbook pair, Huey (SQLite with both fsync settings, Redis) and Celery."""
        for kind in ("queue", "pool"):
            self.add(scenario, f"mp-{kind}", TEXTBOOK, [f"{kind}-{scenario}", *argv])
        sqlite = [scenario, "--backend", "sqlite", *argv]
        self.add(scenario, "huey-sqlite", HUEY, sqlite, peer=True)
        if huey_nofsync:
            self.add(scenario, "huey-sqlite-nofsync", HUEY, [*sqlite, "--no-fsync"], peer=True)
        redis = [scenario, "--backend", "redis", *argv]
        self.add(scenario, "huey-redis", HUEY, redis, peer=True, redis=True)
        self.add(scenario, "celery", CELERY, [scenario, *argv], peer=True, redis=True)


def plan(mode: str, iterations: int, unit: float) -> list[Run]:
    """Every (scenario, system) run of the mode (smoke: msgd, the bare loop and the disk only)."""
    z, p = SIZES[mode], Plan()
    cpu = ["--n", z["cpu"], "--iterations", iterations, "--unit", unit]
    consuming(p, z, cpu)
    steering(p, z, cpu)
    producing(p, z)
    if mode == "smoke":  # no peers, no bench venv
        return [x for x in p.runs if not x.peer and not x.script.startswith("peers/")]
    return p.runs


def consuming(p: Plan, z: dict, cpu: list) -> None:
    """Drain, stream, idle latency, CPU-bound: msgd, the bare claim loop and the peers."""
    drain = ["--n", z["drain"]]
    for system in ("msgd", "bare", "bare-1"):
        p.add("drain", system, MSGD, [system if system != "msgd" else "drain", *drain])
    p.peers("drain", drain)
    stream = ["--n", z["stream"], "--rate", z["rate"]]
    p.add("stream", "msgd", MSGD, ["stream", *stream])
    p.add("stream", "msgd-nofsync", MSGD, ["stream", "--no-fsync", *stream])
    p.peers("stream", stream)
    latency = ["idle-latency", "--samples", z["latency"]]
    p.add("idle-latency", "msgd", MSGD, latency)
    p.add("idle-latency", "msgd-nofsync", MSGD, [*latency, "--no-fsync"])
    p.add("cpu", "msgd", MSGD, ["cpu", *cpu])
    p.add("cpu", "bare", MSGD, ["bare", *cpu])
    p.peers("cpu", cpu, huey_nofsync=False)


def steering(p: Plan, z: dict, cpu: list) -> None:
    """Signals, counters, memory, start, and the listener with 50 subscribers."""
    p.add("usr1", "msgd", MSGD, ["usr1", "--samples", z["usr1"], *cpu[2:]])
    p.add("hup", "msgd", MSGD, ["hup", "--samples", z["hup"]])
    p.add("hup-code", "msgd", MSGD, ["hup-code", "--samples", z["hup"]])
    p.add("counters", "msgd", MSGD, ["counters", "--n", z["counters"]])
    p.add("memory", "msgd", MSGD, ["memory"])
    p.add("memory", "huey-sqlite", HUEY, ["memory", "--backend", "sqlite"], peer=True)
    p.add("memory", "celery", CELERY, ["memory"], peer=True, redis=True)
    p.add("start", "msgd", MSGD, ["start", "--samples", z["start"]])
    p.add("nocounters", "msgd", MSGD, ["nocounters", "--n", z["drain"], "--samples", z["rounds"]])
    listener = ["drain", "--n", z["drain"], "--samples", z["usr1"], "--rounds", z["feed_rounds"]]
    p.add("subscribers", "msgd", "subscribers.py", listener)


def producing(p: Plan, z: dict) -> None:
    """The producer side: the disk's floors, one by one and batches, 4 producers."""
    sends = ["send", "--n", z["send"], "--samples", z["send_one"]]
    p.add("send", "disk", "disk.py", ["floors", "--samples", z["disk"]])
    p.add("send", "msgd", MSGD, sends)
    p.add("send", "msgd-nofsync", MSGD, [*sends, "--no-fsync"])
    p.add("send", "huey-sqlite", HUEY, [*sends, "--backend", "sqlite"], peer=True)
    p.add("send", "huey-sqlite-nofsync", HUEY, [*sends, "--backend", "sqlite", "--no-fsync"],
          peer=True)  # fmt: skip
    four = ["send", "--n", z["send_one"], "--producers", PRODUCERS]
    p.add("send-4", "msgd", MSGD, four)
    p.add("send-4", "huey-sqlite", HUEY, [*four, "--backend", "sqlite"], peer=True)


# --- environment --------------------------------------------------------------------------------


def compile_bytecode() -> None:
    """msgd's modules compiled, as `pip install` leaves them: a daemon that compiled its sources
    at every start (PYTHONDONTWRITEBYTECODE in the environment) would measure the compiler. The
    same for bench/, whose handler modules every system's workers import: compiled in each worker,
    they cost each ~0.6 MB of PSS (the memory scenario, 2 workers: 28.6 -> 27.4 MiB)."""
    sources = [os.path.join(REPO_DIR, d) for d in ("daemon", "ctl")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *sources], check=True)
    handlers = [BENCH_DIR, os.path.join(BENCH_DIR, "peers")]  # -l: not out/, with its spools
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-l", *handlers], check=True)


def ensure_bench_venv() -> None:
    """Create .venv-bench from bench/requirements.txt when missing or out of date."""
    with open(REQUIREMENTS) as f:
        wanted = f.read()
    try:
        with open(STAMP) as f:
            if f.read() == wanted and os.path.exists(BENCH_PY):
                return
    except FileNotFoundError:
        pass
    print(f"bench: creating {os.path.relpath(BENCH_VENV, REPO_DIR)} for the peers", flush=True)
    subprocess.run([sys.executable, "-m", "venv", BENCH_VENV], check=True)
    subprocess.run([BENCH_PY, "-m", "pip", "install", "-q", "-r", REQUIREMENTS], check=True)
    with open(STAMP, "w") as f:
        f.write(wanted)


class Redis:
    """A private redis-server: loopback only, no persistence, its own temp dir."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        self.proc: subprocess.Popen | None = None
        self.dir = ""
        self.url = ""

    def start(self) -> bool:
        if not self.binary:
            return False
        self.dir = tempfile.mkdtemp(prefix="msgd-bench-redis-")
        port = free_port()
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{port}/0"
        wait_for(lambda: self.ping(port), 15, "redis-server to answer PING", 0.02)
        return True

    def ping(self, port: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError("redis-server exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def version(self) -> str:
        if not self.binary:
            return "not installed"
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout
        return next((w[2:] for w in out.split() if w.startswith("v=")), out.strip())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def peer_versions() -> str:
    code = (
        "import importlib.metadata as m;"
        "print(', '.join(f'{p} {m.version(p)}' for p in ('huey','celery','redis','matplotlib')))"
    )
    done = subprocess.run([BENCH_PY, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


# --- running ------------------------------------------------------------------------------------


def quiet(limit: float = 10.0) -> None:
    """Flush dirty pages and wait (at most `limit` s) for the CPUs to go idle, so that one run's
    writeback or lingering processes are not billed to the next."""
    os.sync()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and busy_share(0.2) > 0.1:
        pass


def busy_share(interval: float) -> float:
    """The share of all CPUs' time spent busy (not idle, not waiting on I/O) over `interval`."""

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # idle, iowait

    total0, idle0 = ticks()
    time.sleep(interval)
    total1, idle1 = ticks()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def execute(run: Run, redis_url: str, index: int, timeout: float, settle: float) -> dict:
    """Run one scenario script once (after up to `settle` s of quiet); its result, or why not."""
    python = BENCH_PY if run.peer else sys.executable
    workdir = os.path.join(OUT, f"{index:02d}-{run.scenario}-{run.system}")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    out = os.path.join(workdir, "result.json")
    argv = [python, os.path.join(BENCH_DIR, run.script), *run.argv]
    argv += ["--workdir", workdir, "--out", out]
    if run.redis:
        argv += ["--redis-url", redis_url]
    quiet(settle)
    with open(os.path.join(workdir, "stderr.log"), "w") as err:
        try:
            done = subprocess.run(argv, stdout=err, stderr=err, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode == EXIT_SKIPPED:
        with open(os.path.join(workdir, "stderr.log")) as f:
            return {"skipped": f.read().strip().splitlines()[-1][:200]}
    if done.returncode != 0 or not os.path.exists(out):
        with open(os.path.join(workdir, "stderr.log"), errors="replace") as f:
            tail = f.read().strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit status {done.returncode}: {tail[0][:300]}"}
    with open(out) as f:
        return json.load(f)


def failed(entry: dict) -> bool:
    return "error" in entry or "skipped" in entry


def collect(entries: list[dict]) -> dict:
    """A system's repeated runs as {"runs": [...]} (report.py takes medians and ranges), or the
    failure or skip if one run had it: a figure with a failed repeat is not shown as measured."""
    return next((e for e in entries if failed(e)), None) or {"runs": entries}


def has_number(entry: dict) -> bool:
    """A scenario produced a figure: some finite number somewhere in its result."""
    stack = [entry]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, int | float) and not isinstance(x, bool) and x == x:
            return True
    return False


def run_rounds(runs: list[Run], mode: str, redis_url: str) -> dict[int, list[dict]]:
    """Each run `repeats` times, in rounds: every system once, then again, so that no system
    always runs right after another one, and the k-th runs of two systems ran side by side."""
    repeats = SIZES[mode]["repeats"]
    timeout = {"full": 900, "quick": 180, "smoke": 60, "tiny": 60}[mode]
    settle = 10.0 if mode in ("full", "quick") else 0.0  # tiny sizes: no waiting for quiet
    order = sorted(((i, n) for n in range(repeats) for i in range(len(runs))),
                   key=lambda x: (SCENARIOS.index(runs[x[0]].scenario), x[1], x[0]))  # fmt: skip
    outcomes: dict[int, list[dict]] = {i: [] for i in range(len(runs))}
    for i, n in order:
        run = runs[i]
        if outcomes[i] and failed(outcomes[i][-1]):
            continue  # a run that failed or was skipped once is not tried again
        label = f"{run.scenario}/{run.system}" + (f" #{n + 1}" if repeats > 1 else "")
        print(f"bench: {label} ...", end=" ", flush=True)
        t = time.time()
        if run.redis and not redis_url:
            entry = {"skipped": "redis-server not installed (make system-deps)"}
        else:
            entry = execute(run, redis_url, i, timeout, settle)
        outcomes[i].append(entry)
        print(entry.get("error") or entry.get("skipped") or f"{time.time() - t:.1f} s", flush=True)
    return outcomes


def write_readme(results: dict, meta: dict) -> None:
    """The README's performance paragraph, between its markers, from this run (full runs only:
    a partial or quick run does not speak for the project)."""
    if meta["partial"] or meta["mode"] != "full":
        print("bench: README.md left as it is (only a full run rewrites its paragraph)")
        return
    path = os.path.join(REPO_DIR, "README.md")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(report.update_readme(text, report.readme_paragraph(results, meta)))


def command_line(argv: list[str]) -> str:
    python = sys.executable
    rel = os.path.relpath(python, REPO_DIR)
    shown = python if rel.startswith("..") else rel
    return " ".join([shown, "bench/run.py", *argv])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 1 run each")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, msgd + bare loop only")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, every system")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {SCENARIOS}")
    args = parser.parse_args()
    mode = next((m for m in ("smoke", "tiny", "quick") if getattr(args, m)), "full")
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {SCENARIOS}")
    began = time.time()
    os.makedirs(OUT, exist_ok=True)

    compile_bytecode()
    iterations, unit = calibrate(0.005)
    runs = [r for r in plan(mode, iterations, unit) if not only or r.scenario in only]
    if any(r.peer for r in runs):
        ensure_bench_venv()
    redis = Redis()
    redis_up = any(r.redis for r in runs) and redis.start()
    try:
        outcomes = run_rounds(runs, mode, redis.url if redis_up else "")
    finally:
        redis.stop()
    results: dict[str, dict] = {}
    for i, run in enumerate(runs):
        results.setdefault(run.scenario, {})[run.system] = collect(outcomes[i])
    meta = describe(mode, only, time.time() - began, redis.version(), (iterations, unit))
    return publish(results, meta) if mode in ("full", "quick") else smoke_verdict(results, meta)


def describe(mode: str, only: list[str], total: float, redis: str, work: tuple) -> dict:
    """The machine, the command and the sizes, for the report's head."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version() + f" ({platform.python_implementation()})",
        "kernel": platform.release(),
        "spool_fs": f"{filesystem_type(OUT)} (spools under bench/out/)",
        "redis": redis,
        "peers": peer_versions() if os.path.exists(BENCH_PY) else "not installed",
        "mode": mode,
        "command": command_line(sys.argv[1:]),
        "total_seconds": total,
        "partial": ",".join(only),
        "iterations": work[0],
        "unit_ms": work[1] * 1e3,
        "drain_n": SIZES[mode]["drain"],
        "rate": SIZES[mode]["rate"],
        "repeats": SIZES[mode]["repeats"],
        "scenarios": SCENARIOS,
    }


def save(name: str, results: dict, meta: dict) -> str:
    path = os.path.join(OUT, name)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    return path


def smoke_verdict(results: dict, meta: dict) -> int:
    """0 when every scenario produced a figure; the report is rendered too (into bench/out/),
    so that its code runs."""
    mode = meta["mode"]
    save(f"{mode}-results.json", results, meta)
    with open(os.path.join(OUT, f"{mode}-BENCHMARKS.md"), "w") as f:
        f.write(report.markdown(results, meta) + "\n" + report.readme_paragraph(results, meta))
    bad = [f"{sc}/{sy}" for sc, runs_ in results.items() for sy, e in runs_.items()
           if "skipped" not in e and not has_number(e)]  # fmt: skip
    total = meta["total_seconds"]
    print(f"bench: {mode} run took {total:.1f} s; " + (f"no figure from {bad}" if bad else "ok"))
    return 1 if bad else 0


def publish(results: dict, meta: dict) -> int:
    """BENCHMARKS.md, the chart, and (full runs) the README's paragraph; 1 if a run failed."""
    path = save("results.json", results, meta)
    with open(os.path.join(REPO_DIR, "BENCHMARKS.md"), "w") as f:
        f.write(report.markdown(results, meta))
    write_readme(results, meta)
    if os.path.exists(BENCH_PY):
        chart = subprocess.run(
            [BENCH_PY, os.path.join(BENCH_DIR, "chart.py"), path,
             os.path.join(BENCH_DIR, "chart.png")],
            env=dict(os.environ, PYTHONPATH=BENCH_DIR), capture_output=True, text=True,
        )  # fmt: skip
        if chart.returncode != 0:
            print(f"bench: chart failed: {chart.stderr.strip()[-500:]}", file=sys.stderr)
    print(f"bench: wrote BENCHMARKS.md and bench/chart.png in {meta['total_seconds']:.0f} s")
    broken = [f"{sc}/{sy}" for sc, r in results.items() for sy, e in r.items() if "error" in e]
    if broken:
        print(f"bench: failed: {broken}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
