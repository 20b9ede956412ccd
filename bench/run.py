"""Benchmark msgd against its peers in one run; write BENCHMARKS.md and bench/chart.png.

    .venv/bin/python bench/run.py [--quick] [--only SCENARIO,...]   # make bench / make bench-quick
    .venv/bin/python bench/run.py --smoke   # tiny sizes, msgd + bare loop only, no peers:
                                            # exit 0 when every scenario produced a figure

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
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

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
    "start", "send", "nocounters",
]  # fmt: skip
EXIT_SKIPPED = 3

# Sizes per mode: full, --quick, --smoke.
SIZES = {
    "full": dict(drain=20_000, stream=10_000, latency=500, cpu=2_000, usr1=200, hup=30,
                 counters=1_000_000, start=10, send=5_000, send_one=2_000, repeats=3),
    "quick": dict(drain=5_000, stream=2_000, latency=100, cpu=400, usr1=30, hup=10,
                  counters=200_000, start=5, send=5_000, send_one=500, repeats=1),
    "smoke": dict(drain=300, stream=200, latency=10, cpu=20, usr1=5, hup=3, counters=20_000,
                  start=2, send=200, send_one=50, repeats=1),
}  # fmt: skip


@dataclass
class Run:
    scenario: str
    system: str
    script: str  # relative to bench/
    argv: list[str]
    peer: bool = False  # needs the bench venv
    redis: bool = False  # needs redis-server
    repeats: int = 1
    extra: dict = field(default_factory=dict)


def plan(mode: str, iterations: int, unit: float) -> list[Run]:
    z = SIZES[mode]
    cpu = ["--iterations", str(iterations), "--unit", str(unit)]
    m = "msgd_bench.py"
    runs: list[Run] = []

    def add(scenario, system, script, argv, **kw):
        runs.append(Run(scenario, system, script, [str(a) for a in argv], **kw))

    def peers(scenario, n, argv=(), textbook=None, repeats=1):
        for kind in textbook or ():
            add(scenario, f"mp-{kind}", "peers/textbook.py", [f"{kind}-{textbook[kind]}", "--n", n,
                *argv], repeats=repeats)  # fmt: skip
        add(scenario, "huey-sqlite", "peers/huey_peer.py", [scenario, "--backend", "sqlite",
            "--n", n, *argv], peer=True, repeats=repeats)  # fmt: skip
        add(scenario, "huey-redis", "peers/huey_peer.py", [scenario, "--backend", "redis",
            "--n", n, *argv], peer=True, redis=True, repeats=repeats)  # fmt: skip
        add(scenario, "celery", "peers/celery_peer.py", [scenario, "--n", n, *argv], peer=True,
            redis=True, repeats=repeats)  # fmt: skip

    r = z["repeats"]
    add("drain", "msgd", m, ["drain", "--n", z["drain"]], repeats=r)
    add("drain", "bare", m, ["bare", "--n", z["drain"]], repeats=r)
    peers("drain", z["drain"], textbook={"queue": "drain", "pool": "drain"}, repeats=r)
    add("stream", "msgd", m, ["stream", "--n", z["stream"]])
    peers("stream", z["stream"], textbook={"queue": "stream", "pool": "stream"})
    add("idle-latency", "msgd", m, ["idle-latency", "--samples", z["latency"]])
    add("cpu", "msgd", m, ["cpu", "--n", z["cpu"], *cpu], repeats=r)
    add("cpu", "bare", m, ["cpu-bare", "--n", z["cpu"], *cpu], repeats=r)
    peers("cpu", z["cpu"], cpu, textbook={"queue": "cpu", "pool": "cpu"}, repeats=r)
    add("usr1", "msgd", m, ["usr1", "--samples", z["usr1"], *cpu])
    add("hup", "msgd", m, ["hup", "--samples", z["hup"]])
    add("hup-code", "msgd", m, ["hup-code", "--samples", z["hup"]])
    add("counters", "msgd", m, ["counters", "--n", z["counters"]])
    add("memory", "msgd", m, ["memory"])
    add("memory", "huey-sqlite", "peers/huey_peer.py", ["memory", "--backend", "sqlite"], peer=True)
    add("memory", "celery", "peers/celery_peer.py", ["memory"], peer=True, redis=True)
    add("start", "msgd", m, ["start", "--samples", z["start"]])
    add("send", "msgd", m, ["send", "--n", z["send"], "--samples", z["send_one"]])
    add("send", "huey-sqlite", "peers/huey_peer.py", ["enqueue", "--backend", "sqlite",
        "--n", z["send"]], peer=True)  # fmt: skip
    rounds = 3 * r  # a multiple of 3: each way of starting msgd goes first equally often
    add("nocounters", "msgd", m, ["nocounters", "--n", z["drain"], "--samples", rounds])
    if mode == "smoke":  # msgd and the bare loop only: no peers, no bench venv
        runs = [x for x in runs if x.system in ("msgd", "bare")]
    return runs


# --- environment --------------------------------------------------------------------------------


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


def execute(run: Run, redis_url: str, index: int, timeout: float) -> dict:
    """Run one scenario script once; its result, or why there is none."""
    python = BENCH_PY if run.peer else sys.executable
    workdir = os.path.join(OUT, f"{index:02d}-{run.scenario}-{run.system}")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    out = os.path.join(workdir, "result.json")
    argv = [python, os.path.join(BENCH_DIR, run.script), *run.argv]
    argv += ["--workdir", workdir, "--out", out]
    if run.redis:
        argv += ["--redis-url", redis_url]
    quiet()
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


def median_run(results: list[dict]) -> dict:
    """Of a system's repeated runs, the median one by msgs/s (the failure, if one failed)."""
    if len(results) == 1 or failed(results[-1]):
        return results[-1]
    rates = [r.get("msgs_per_s", 0) for r in results]
    chosen = results[rates.index(statistics.median_low(rates))]
    return {**chosen, "runs_msgs_per_s": rates}


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


def command_line(argv: list[str]) -> str:
    python = sys.executable
    rel = os.path.relpath(python, REPO_DIR)
    shown = python if rel.startswith("..") else rel
    return " ".join([shown, "bench/run.py", *argv])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, < 2 minutes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, msgd + bare loop only")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {SCENARIOS}")
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {SCENARIOS}")
    began = time.time()
    os.makedirs(OUT, exist_ok=True)

    iterations, unit = calibrate(0.005)
    runs = [r for r in plan(mode, iterations, unit) if not only or r.scenario in only]
    if any(r.peer for r in runs):
        ensure_bench_venv()
    redis = Redis()
    redis_up = any(r.redis for r in runs) and redis.start()
    results: dict[str, dict] = {}
    timeout = {"full": 600, "quick": 120, "smoke": 60}[mode]
    # Repeated runs go in rounds (every system once, then again), so that no system always runs
    # right after another one, or first after a change of scenario.
    rounds = [(i, run, n) for n in range(max(r.repeats for r in runs)) for i, run in
              enumerate(runs) if n < run.repeats]  # fmt: skip
    rounds.sort(key=lambda x: (SCENARIOS.index(x[1].scenario), x[2], x[0]))
    outcomes: dict[int, list[dict]] = {i: [] for i in range(len(runs))}
    try:
        for i, run, n in rounds:
            if outcomes[i] and failed(outcomes[i][-1]):
                continue  # a repeated run that failed once is not tried again
            label = f"{run.scenario}/{run.system}" + (f" #{n + 1}" if run.repeats > 1 else "")
            print(f"bench: {label} ...", end=" ", flush=True)
            t = time.time()
            if run.redis and not redis_up:
                entry = {"skipped": "redis-server not installed (make system-deps)"}
            else:
                entry = execute(run, redis.url, i, timeout)
            outcomes[i].append(entry)
            shown = entry.get("error") or entry.get("skipped") or f"{time.time() - t:.1f} s"
            print(shown, flush=True)
    finally:
        redis.stop()
    for i, run in enumerate(runs):
        results.setdefault(run.scenario, {})[run.system] = median_run(outcomes[i])

    total = time.time() - began
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version() + f" ({platform.python_implementation()})",
        "kernel": platform.release(),
        "spool_fs": f"{filesystem_type(OUT)} (spools under bench/out/)",
        "redis": redis.version(),
        "peers": peer_versions() if os.path.exists(BENCH_PY) else "not installed",
        "mode": mode,
        "command": command_line(sys.argv[1:]),
        "total_seconds": total,
        "partial": ",".join(only),
        "unit_ms": unit * 1e3,
        "iterations": iterations,
        "drain_n": SIZES[mode]["drain"],
        "repeats": SIZES[mode]["repeats"],
    }
    name = "smoke-results.json" if mode == "smoke" else "results.json"
    with open(os.path.join(OUT, name), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)

    if mode == "smoke":
        bad = [f"{sc}/{sy}" for sc, runs_ in results.items() for sy, e in runs_.items()
               if "skipped" not in e and not has_number(e)]  # fmt: skip
        print(f"bench: smoke run took {total:.1f} s; " + (f"no figure from {bad}" if bad else "ok"))
        return 1 if bad else 0

    with open(os.path.join(REPO_DIR, "BENCHMARKS.md"), "w") as f:
        f.write(report.markdown(results, meta))
    if os.path.exists(BENCH_PY):
        chart = subprocess.run(
            [BENCH_PY, os.path.join(BENCH_DIR, "chart.py"), os.path.join(OUT, name),
             os.path.join(BENCH_DIR, "chart.png")],
            env=dict(os.environ, PYTHONPATH=BENCH_DIR), capture_output=True, text=True,
        )  # fmt: skip
        if chart.returncode != 0:
            print(f"bench: chart failed: {chart.stderr.strip()[-500:]}", file=sys.stderr)
    print(f"bench: wrote BENCHMARKS.md and bench/chart.png in {total:.0f} s")
    broken = [f"{sc}/{sy}" for sc, r in results.items() for sy, e in r.items() if "error" in e]
    if broken:
        print(f"bench: failed: {broken}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
