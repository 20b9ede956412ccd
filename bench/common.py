"""Helpers shared by the driver and every scenario script (standard library only).

Waiting is always done with `wait_for` (a condition and a deadline), never with a fixed sleep.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from tasks import burn

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.005) -> T:
    """Poll `condition` until it returns something truthy; raise TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, round(p / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def latency_figures(seconds: list[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds."""
    return {
        "p50_ms": percentile(seconds, 50) * 1e3,
        "p99_ms": percentile(seconds, 99) * 1e3,
        "max_ms": max(seconds) * 1e3,
        "samples": len(seconds),
    }


# --- CPU-bound work: tasks.burn, the same pure-Python loop for every system, calibrated ----------


def calibrate(target_seconds: float = 0.005, rounds: int = 15) -> tuple[int, float]:
    """Iterations that take about `target_seconds`, and the median measured time for them."""
    iterations = 10_000
    while True:
        t = time.perf_counter()
        burn(iterations)
        elapsed = time.perf_counter() - t
        if elapsed > 0.002:
            break
        iterations *= 2
    iterations = int(iterations * target_seconds / elapsed)
    return iterations, unit_time(iterations, rounds)


def unit_time(iterations: int, rounds: int = 15) -> float:
    """The median time of `burn(iterations)` in this process (seconds)."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        burn(iterations)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# --- processes and memory ---------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of `pid` (all threads' children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


ROLLUP = ("Pss", "Rss", "Private_Dirty", "Pss_Anon", "Pss_File", "Pss_Shmem")


def memory_kib(pid: int) -> dict[str, int]:
    """Pss and Rss of one process in KiB, from /proc/PID/smaps_rollup; with Private_Dirty (the
    pages only this process maps: in a forked process, what it or its parent wrote since the fork)
    and Pss split into anonymous memory, files (libraries) and shared memory."""
    figures = {key.lower() + "_kib": 0 for key in ROLLUP}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ROLLUP:
                figures[key.lower() + "_kib"] = int(rest.split()[0])
    return figures


def ssl_pss_kib(pid: int) -> int:
    """PSS of OpenSSL's libraries (libssl, libcrypto) and the _ssl module mapped into `pid`, KiB:
    what `import ssl` costs a process, whether or not it ever makes a TLS connection."""
    total, counting = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                name = line.split()[-1] if len(line.split()) >= 6 else ""
                base = os.path.basename(name)
                counting = base.startswith(("libssl", "libcrypto", "_ssl"))
            elif counting and first == "Pss:":
                total += int(line.split()[1])
    return total


def tree_memory(pid: int) -> dict[str, object]:
    """Summed PSS and RSS (MiB) of `pid` and its descendants, with each process's figures."""
    procs: list[dict] = []
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            procs.append(
                {"pid": p, "cmd": cmd[:80], **memory_kib(p), "ssl_pss_kib": ssl_pss_kib(p)}
            )
        except (FileNotFoundError, ProcessLookupError):
            continue
    return {
        "pss_mib": sum(p["pss_kib"] for p in procs) / 1024,
        "rss_mib": sum(p["rss_kib"] for p in procs) / 1024,
        "processes": len(procs),
        "per_process": procs,
    }


# --- small system facts -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding `path` (longest matching mount point)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount_point = fields[4]
            fs = fields[fields.index("-") + 1]
            inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, kind = mount_point, fs
    return kind


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return "unknown"


def write_result(path: str, result: dict) -> None:
    """Scenario scripts hand their figures back to the driver as one JSON file."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def fail(message: str, code: int = 1) -> None:
    print(f"bench: {message}", file=sys.stderr)
    sys.exit(code)
