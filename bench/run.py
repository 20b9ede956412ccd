"""Benchmark msgd against its peers in one run; write BENCHMARKS.md and bench/chart.png.

    .venv/bin/python bench/run.py [--quick] [--only SCENARIO,...]   # make bench / make bench-quick
    .venv/bin/python bench/run.py --smoke   # tiny sizes, msgd + bare loop only, no peers:
                                            # exit 0 when every scenario produced a figure
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

# Sizes per mode: full, --quick, --smoke. Every scenario runs `repeats` times per system, in rounds;
# the counters-off drain runs `rounds` rounds inside one run of its own.
SIZES = {
    "full": dict(drain=20_000, stream=1_000, rate=200, latency=500, cpu=2_000, usr1=200, hup=30,
                 counters=1_000_000, start=10, send=5_000, send_one=2_000, disk=1_000,
                 repeats=3, rounds=9),
    "quick": dict(drain=5_000, stream=400, rate=200, latency=100, cpu=400, usr1=30, hup=10,
                  counters=200_000, start=5, send=5_000, send_one=500, disk=300, repeats=1,
                  rounds=3),
    "smoke": dict(drain=300, stream=40, rate=200, latency=10, cpu=20, usr1=5, hup=3,
                  counters=20_000, start=2, send=200, send_one=40, disk=40, repeats=1, rounds=3),
}  # fmt: skip
PRODUCERS = 4  # the send-4 scenario


@dataclass
class Run:
    scenario: str
    system: str
    script: str  # relative to bench/
    argv: list[str]
    peer: bool = False  # needs the bench venv
    redis: bool = False  # needs redis-server


def plan(mode: str, iterations: int, unit: float) -> list[Run]:
    """Every (scenario, system) run, msgd's and the bare loop's first (smoke keeps only those)."""
    z = SIZES[mode]
    m, huey = "msgd_bench.py", "peers/huey_peer.py"
    runs: list[Run] = []

    def add(scenario, system, script, argv, **kw):
        runs.append(Run(scenario, system, script, [str(a) for a in argv], **kw))

    def peers(scenario, argv, huey_nofsync=True):
        for kind in ("queue", "pool"):
            add(scenario, f"mp-{kind}", "peers/textbook.py", [f"{kind}-{scenario}", *argv])
        sqlite = [scenario, "--backend", "sqlite", *argv]
        add(scenario, "huey-sqlite", huey, sqlite, peer=True)
        if huey_nofsync:
            add(scenario, "huey-sqlite-nofsync", huey, [*sqlite, "--no-fsync"], peer=True)
        add(scenario, "huey-redis", huey, [scenario, "--backend", "redis", *argv], peer=True,
            redis=True)  # fmt: skip
        add(scenario, "celery", "peers/celery_peer.py", [scenario, *argv], peer=True, redis=True)

    drain = ["--n", z["drain"]]
    for system in ("msgd", "bare", "bare-1"):
        add("drain", system, m, [system if system != "msgd" else "drain", *drain])
    peers("drain", drain)
    stream = ["--n", z["stream"], "--rate", z["rate"]]
    add("stream", "msgd", m, ["stream", *stream])
    add("stream", "msgd-nofsync", m, ["stream", "--no-fsync", *stream])
    peers("stream", stream)
    add("idle-latency", "msgd", m, ["idle-latency", "--samples", z["latency"]])
    add(
        "idle-latency", "msgd-nofsync", m, ["idle-latency", "--no-fsync", "--samples", z["latency"]]
    )
    cpu = ["--n", z["cpu"], "--iterations", iterations, "--unit", unit]
    add("cpu", "msgd", m, ["cpu", *cpu])
    add("cpu", "bare", m, ["bare", *cpu])
    peers("cpu", cpu, huey_nofsync=False)
    add("usr1", "msgd", m, ["usr1", "--samples", z["usr1"], *cpu[2:]])
    add("hup", "msgd", m, ["hup", "--samples", z["hup"]])
    add("hup-code", "msgd", m, ["hup-code", "--samples", z["hup"]])
    add("counters", "msgd", m, ["counters", "--n", z["counters"]])
    add("memory", "msgd", m, ["memory"])
    add("memory", "huey-sqlite", huey, ["memory", "--backend", "sqlite"], peer=True)
    add("memory", "celery", "peers/celery_peer.py", ["memory"], peer=True, redis=True)
    add("start", "msgd", m, ["start", "--samples", z["start"]])
    sends = ["--n", z["send"], "--samples", z["send_one"]]
    add("send", "disk", "disk.py", ["floors", "--samples", z["disk"]])
    add("send", "msgd", m, ["send", *sends])
    add("send", "msgd-nofsync", m, ["send", "--no-fsync", *sends])
    add("send", "huey-sqlite", huey, ["send", "--backend", "sqlite", *sends], peer=True)
    add("send", "huey-sqlite-nofsync", huey, ["send", "--backend", "sqlite", "--no-fsync", *sends],
        peer=True)  # fmt: skip
    four = ["send", "--n", z["send_one"], "--producers", PRODUCERS]
    add("send-4", "msgd", m, four)
    add("send-4", "huey-sqlite", huey, [*four, "--backend", "sqlite"], peer=True)
    add("nocounters", "msgd", m, ["nocounters", "--n", z["drain"], "--samples", z["rounds"]])
    add("subscribers", "msgd", "subscribers.py", ["drain", "--n", z["drain"], "--samples",
        z["usr1"]])  # fmt: skip
    if mode == "smoke":  # msgd, the bare loop and the disk only: no peers, no bench venv
        runs = [x for x in runs if not x.peer and not x.script.startswith("peers/")]
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
    timeout = {"full": 900, "quick": 180, "smoke": 60}[mode]
    settle = 0.0 if mode == "smoke" else 10.0  # smoke: no waiting for a quiet machine
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
    try:
        outcomes = run_rounds(runs, mode, redis.url if redis_up else "")
    finally:
        redis.stop()
    results: dict[str, dict] = {}
    for i, run in enumerate(runs):
        results.setdefault(run.scenario, {})[run.system] = collect(outcomes[i])

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
        "rate": SIZES[mode]["rate"],
        "repeats": SIZES[mode]["repeats"],
    }
    name = "smoke-results.json" if mode == "smoke" else "results.json"
    with open(os.path.join(OUT, name), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)

    if mode == "smoke":  # the report is rendered too (to bench/out/), so that its code runs
        with open(os.path.join(OUT, "smoke-BENCHMARKS.md"), "w") as f:
            f.write(report.markdown(results, meta) + "\n" + report.readme_paragraph(results, meta))
        bad = [f"{sc}/{sy}" for sc, runs_ in results.items() for sy, e in runs_.items()
               if "skipped" not in e and not has_number(e)]  # fmt: skip
        print(f"bench: smoke run took {total:.1f} s; " + (f"no figure from {bad}" if bad else "ok"))
        return 1 if bad else 0

    with open(os.path.join(REPO_DIR, "BENCHMARKS.md"), "w") as f:
        f.write(report.markdown(results, meta))
    write_readme(results, meta)
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
