"""msgd's Redis Streams backend: msgs/s draining N pre-sent no-op messages with 1 and 2 daemons.

Run with the interpreter that has msgd and redis-py installed (.venv):
    python bench/bench_redis.py [--n N] [--workers W] [--threads T]
Starts its own redis-server on a free loopback port (no persistence: the figure is msgd's cost,
not the disk's), sends N messages to a fresh stream, then starts the daemon(s) with the queue in
burst mode and times from USR2 to the moment the group has nothing left (stream length and
pending both 0). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import msgd
import redis
from common import wait_for

BIN = os.path.dirname(sys.executable)
HANDLER = "def noop(message):\n    pass\n"
CONFIG = """\
[daemon]
pidfile = "msgd.pid"
spool = "spool"
workers = {workers}
stats_file = "stats.json"
log_file = "msgd.log"
log_format = "json"
allow_root = true
pythonpath = ["."]

[queues.rq]
handler = "bench_noop:noop"
backend = "redis"
url = "{url}"
stream = "{stream}"
mode = "burst"
threads = {threads}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(
    directory: str, url: str, stream: str, workers: int, threads: int
) -> subprocess.Popen[bytes]:
    """A daemon in `directory`, ready to work."""
    os.makedirs(directory)
    with open(os.path.join(directory, "bench_noop.py"), "w") as f:
        f.write(HANDLER)
    config = os.path.join(directory, "msgd.toml")
    with open(config, "w") as f:
        f.write(CONFIG.format(workers=workers, threads=threads, url=url, stream=stream))
    proc = subprocess.Popen(
        [os.path.join(BIN, "msgd"), "-c", config],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = os.path.join(directory, "msgd.state")
    wait_for(lambda: os.path.exists(state) or proc.poll() is not None, 30, "msgd ready")
    if proc.poll() is not None:
        raise SystemExit(f"msgd exited {proc.returncode}; see {directory}/msgd.log")
    return proc


def drained(client: redis.Redis, stream: str) -> bool:
    pending = sum(g["pending"] for g in client.xinfo_groups(stream))
    return client.xlen(stream) == 0 and pending == 0


def run(
    workdir: str, url: str, client: redis.Redis, daemons: int, args: argparse.Namespace
) -> dict:
    stream = f"msgd-bench:{daemons}:{os.getpid()}"
    root = os.path.join(workdir, f"d{daemons}")
    procs = [
        start_daemon(os.path.join(root, str(i)), url, stream, args.workers, args.threads)
        for i in range(daemons)
    ]
    try:
        config = os.path.join(root, "0", "msgd.toml")
        for start in range(0, args.n, 1000):
            msgd.send_many([b"x"] * min(1000, args.n - start), queue="rq", config=config)
        started = time.perf_counter()
        for proc in procs:
            proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: drained(client, stream), 600, f"{args.n} messages drained", 0.002)
        seconds = time.perf_counter() - started
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
    return {"seconds": round(seconds, 3), "msgs_per_s": round(args.n / seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--workers", type=int, default=2, help="workers per daemon")
    p.add_argument("--threads", type=int, default=1, help="runner threads per worker")
    args = p.parse_args()
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server not installed (make system-deps)")
    workdir = tempfile.mkdtemp(prefix="msgd-bench-redis-")
    port = free_port()
    redis_proc = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: _ping(client), 10, "redis-server")
        url = f"redis://127.0.0.1:{port}/0"
        result = {
            "system": "msgd-redis",
            "n": args.n,
            "workers_per_daemon": args.workers,
            "threads": args.threads,
            **{f"daemons_{k}": run(workdir, url, client, k, args) for k in (1, 2)},
        }
        print(json.dumps(result))
    finally:
        redis_proc.terminate()
        redis_proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


if __name__ == "__main__":
    main()
