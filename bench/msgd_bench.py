"""msgd's scenarios, and the bare rename-claim-read-unlink loop on the same spool and disk.

Run with the interpreter that has msgd installed (.venv):
    python bench/msgd_bench.py SCENARIO --n N --workdir D --out F [--iterations I --unit U]
Each scenario starts its own daemon with a fresh spool under D, and stops it (SIGTERM) at the end.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Iterator

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import disk  # noqa: E402
import msgd  # noqa: E402
import probe  # noqa: E402
import scenario  # noqa: E402
import tasks  # noqa: E402
from common import latency_figures, tree_memory, wait_for, write_result  # noqa: E402

WORKERS = 2
QUEUE = "default"
LAUNCH_NO_COUNTERS = os.path.join(BENCH, "launch_nocounters.py")
EXIT_SKIPPED = 3  # a scenario that cannot run here (reported as skipped, not failed)

# Runtime files (pidfile, state, stats) on a tmpfs, as msgd's defaults put them in /run/msgd;
# the spool on this disk, beside the bare loop's and the peers' files.
RUN_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") else None

CONFIG = """\
[daemon]
pidfile = "{run}/msgd.pid"
spool = "var/spool"
workers = {workers}
stats_file = "{run}/stats.json"
log_file = "var/msgd.log"
log_format = "json"
fsync = {fsync}
allow_root = true
pythonpath = [{bench!r}, {workdir!r}]

[queues.{queue}]
handler = "handlers:job"
mode = "{mode}"
timeout = 300.0
"""

# hup-code's handler, rewritten before each HUP: it notes its version and when it ran.
VERSIONED = """\
import time
VERSION = {version}
def job(message):
    with open({out!r}, "a") as f:
        f.write(f"{{VERSION}} {{time.monotonic()}}\\n")
"""


class Daemon:
    """One msgd instance with its own directory: config, spool, pidfile, state and stats files."""

    def __init__(
        self, workdir: str, mode: str = "continuous", fsync: bool = True, extra: str = ""
    ) -> None:
        self.dir = workdir
        shutil.rmtree(workdir, ignore_errors=True)
        os.makedirs(os.path.join(workdir, "var"))
        self.run = os.path.join(RUN_ROOT or workdir, f"msgd-bench-{os.getpid()}")
        self.config = os.path.join(workdir, "msgd.toml")
        with open(self.config, "w") as f:
            # The bench directory is computed at run time; the file lives under bench/out/.
            f.write(
                CONFIG.format(
                    workers=WORKERS,
                    bench=BENCH,
                    workdir=workdir,
                    queue=QUEUE,
                    mode=mode,
                    run=self.run,
                    fsync=str(fsync).lower(),
                )
                + extra
            )
        self.state_file = os.path.join(self.run, "msgd.state")
        self.stats_file = os.path.join(self.run, "stats.json")
        self.spool = os.path.join(workdir, "var", "spool", QUEUE)
        self.proc: subprocess.Popen | None = None

    def command(self, launcher: tuple[str, ...] | None = None) -> list[str]:
        """`msgd -c CONFIG`, or through bench/launch_nocounters.py with `launcher`'s options."""
        if launcher is not None:
            return [sys.executable, LAUNCH_NO_COUNTERS, *launcher, "-c", self.config]
        script = os.path.join(os.path.dirname(sys.executable), "msgd")
        if os.path.exists(script):
            return [script, "-c", self.config]
        return [sys.executable, "-m", "msgd", "-c", self.config]

    def start(
        self,
        launcher: tuple[str, ...] | None = None,
        env: dict[str, str] | None = None,
        own_session: bool = True,
    ) -> None:
        """Started in a session of its own, unless `own_session` is False: then in this one,
        in a process group of its own (the kernel shares CPUs between sessions' autogroups
        first; bench/subscribers.py wants msgd and its idle-priority clients in one)."""
        os.makedirs(self.run, exist_ok=True)
        with open(os.path.join(self.dir, "stderr.log"), "ab") as err:
            self.proc = subprocess.Popen(
                self.command(launcher),
                env=dict(os.environ, **(env or {})),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=own_session,
                process_group=None if own_session else 0,
            )

    def wait_ready(self, timeout: float = 30.0) -> dict:
        """The state file appears once the daemon is ready."""

        def ready():
            self.check_alive()
            return read_json(self.state_file)

        return wait_for(ready, timeout, "msgd's state file")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            with open(os.path.join(self.dir, "stderr.log"), errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"msgd exited early (status {self.proc.returncode}): {tail}")

    def generation(self, action: str) -> int:
        return (read_json(self.state_file) or {}).get("generations", {}).get(action, 0)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, a graceful stop; returns the exit status (killed at the deadline)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # anything of the group still there (should be nothing) goes too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.run, ignore_errors=True)
        return self.proc.returncode

    def spool_clean(self) -> bool:
        """No message file left in new/ or cur/ (claimed files live in cur/<slot>/)."""
        for top in ("new", "cur"):
            for _, _, files in os.walk(os.path.join(self.spool, top)):
                if files:
                    return False
        return True

    def send_many(self, bodies: list[bytes]) -> list[str]:
        return msgd.send_many(bodies, queue=QUEUE, config=self.config)

    def warm_up(self, probe_dir: str) -> None:
        """Warm-up messages until a worker has imported the handler and run one."""
        self.send_many([tasks.encode(-1)] * scenario.WARMUP)
        scenario.wait_ready(probe_dir, proc=self.proc)

    @contextlib.contextmanager
    def warmed(self, probe_dir: str) -> Iterator[None]:
        """Started, ready, and a worker has run a message; stopped on the way out."""
        self.start()
        try:
            self.wait_ready()
            self.warm_up(probe_dir)
            yield
        finally:
            self.stop()


def read_json(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Watch:
    """Wake up when a file in a directory is replaced (msgd renames its stats and state files into
    place). Not when a temporary file is written: the watcher would wake and take a CPU from the
    master in the middle of the write it is timing."""

    def __init__(self, path: str) -> None:
        from msgd.sysutil import IN_MOVED_TO, watch

        self.path = path
        self.fd = watch(os.path.dirname(path), IN_MOVED_TO)

    def until(self, condition, timeout: float, what: str) -> None:
        """Block until `condition(json of the file)` holds; checked after each change."""
        from msgd.sysutil import drain

        deadline = time.monotonic() + timeout
        while True:
            data = read_json(self.path)
            if data is not None and condition(data):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            if select.select([self.fd], [], [], left)[0]:
                drain(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def spaced() -> None:
    """A short random pause between latency samples, so they do not fall into a rhythm."""
    time.sleep(random.uniform(0.01, 0.03))


# --- throughput ---------------------------------------------------------------------------------


def presend_run(args, iterations: int, launcher: tuple[str, ...] | None = None) -> dict:
    """Send N durably, then start msgd on the full spool and wait until every message is handled.

    Timed like every peer: first handler start to last handler end (probe), so start-up is not
    counted. A continuous queue is used, as for the peers: the consumers start on a full queue.
    """
    d = Daemon(os.path.join(args.workdir, "msgd"))
    probe_dir = scenario.fresh_probe(args.workdir, args.n)
    d.send_many([tasks.encode(i, 0.0, iterations) for i in range(args.n)])
    started = time.time()
    d.start(launcher)
    try:
        s = scenario.wait_count(probe_dir, args.n, args.timeout, bool(iterations), d.proc)
        wait_for(d.spool_clean, 60, "new/ and cur/ to be empty", 0.002)
        clean = time.time()
    finally:
        status = d.stop()
    handled = scenario.drain_result(s, args.n)
    # msgd may unlink finished files on background threads: the headline figure runs until the spool
    # holds no message file (the bare loop unlinks as it goes); the handler-only span beside it.
    result = scenario.drain_result(s, args.n, end=clean)
    result.update(
        handlers_seconds=handled["seconds"],
        handlers_msgs_per_s=handled["msgs_per_s"],
        start_to_clean_s=clean - started,
        exit_status=status,
    )
    return result


def drain(args) -> dict:
    return presend_run(args, 0)


def cpu(args) -> dict:
    return presend_run(args, args.iterations)


# The drain's three ways of starting msgd: plain, through the launcher with the counters' updates
# made no-ops, and through the launcher unchanged (a control: the launcher's own effect and this
# machine's run-to-run spread).
LAUNCHES = {"on": None, "off": (), "control": ("--control",)}


def no_counters(args) -> dict:
    """The drain started each of the LAUNCHES ways, `--samples` rounds, the order rotating.

    The lists keep the rounds' order: the report pairs each round's runs (on ÷ off per round)."""
    check = subprocess.run(
        [sys.executable, LAUNCH_NO_COUNTERS, "--check-names"], capture_output=True, text=True
    )
    if check.returncode != 0:
        print(check.stdout + check.stderr, file=sys.stderr)
        sys.exit(EXIT_SKIPPED)
    runs: dict[str, list[float]] = {arm: [] for arm in LAUNCHES}
    arms = list(LAUNCHES)
    for i in range(args.samples):
        for arm in arms[i % 3 :] + arms[: i % 3]:
            runs[arm].append(presend_run(args, 0, LAUNCHES[arm])["msgs_per_s"])
    return {"rounds": args.samples, **{f"{arm}_runs": rates for arm, rates in runs.items()}}


def bare(args, processes: int) -> dict:
    """The bare claim loop on the same durably sent files, in `processes` forked processes.

    Per file: rename new/ -> cur/, open + read, the handler, unlink (synchronous): the work of
    msgd's workers without the daemon around it (no counters, no log, no background unlinks).
    Timed from the first handler start to the last handler end (the forks and exits not counted;
    only each process's last unlink falls outside).
    """
    d = Daemon(os.path.join(args.workdir, "bare"))  # never started: its spool and config only
    probe_dir = scenario.fresh_probe(args.workdir, args.n)
    d.send_many([tasks.encode(i, 0.0, args.iterations) for i in range(args.n)])
    new, cur = os.path.join(d.spool, "new"), os.path.join(d.spool, "cur")
    os.makedirs(cur, exist_ok=True)
    found = len(os.listdir(new))
    if found != args.n:  # the loop works message files; a send that makes none cannot be compared
        raise RuntimeError(f"new/ holds {found} files after send_many of {args.n} messages")
    pids = [forked(claim_loop, new, cur, w % 2 == 1) for w in range(processes)]
    failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} bare loop process(es) failed")
    s = probe.summary(probe_dir, with_values=bool(args.iterations))
    return {**scenario.drain_result(s, args.n), "processes": processes}


def forked(target, *args) -> int:
    """Run `target(*args)` in a forked child; its pid (exit status 1 if it raised)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            target(*args)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def claim_loop(new: str, cur: str, backwards: bool) -> None:
    """Claim, read, handle and unlink until new/ is empty. Of two processes one walks the listing
    backwards, so they rarely race for a file; a lost race is a rename failing: skipped."""
    rename, unlink, run_body = os.rename, os.unlink, tasks.run_body
    while names := os.listdir(new):
        for name in reversed(names) if backwards else names:
            path = os.path.join(cur, name)
            try:
                rename(os.path.join(new, name), path)
            except FileNotFoundError:
                continue
            run_body(read_all(path))
            unlink(path)


def read_all(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        body = chunk = os.read(fd, 65536)
        while len(chunk) == 65536:
            chunk = os.read(fd, 65536)
            body += chunk
        return body
    finally:
        os.close(fd)


def stream(args) -> dict:
    """A producer offering one message at a time, `--rate` per second, while 2 workers run."""
    d = Daemon(os.path.join(args.workdir, "msgd"), fsync=not args.no_fsync)
    probe_dir = scenario.fresh_probe(args.workdir, args.n)
    with d.warmed(probe_dir):
        first, last = scenario.produce(
            lambda i, ts: msgd.send(tasks.encode(i, ts), queue=QUEUE, config=d.config),
            args.n,
            args.rate,
        )
        s = scenario.wait_count(probe_dir, args.n, args.timeout, with_values=True, proc=d.proc)
    return scenario.stream_result(s, args.n, first, last)


def idle_latency(args) -> dict:
    """send -> handler start on an idle daemon: one message at a time, 10-30 ms apart.

    Beside each sample, in the same minutes: how long the `msgd.send` call itself took, and one
    flush on the spool's disk (an append + fdatasync to an open file, `bench/disk.py`)."""
    d = Daemon(os.path.join(args.workdir, "msgd"), fsync=not args.no_fsync)
    probe_dir = scenario.fresh_probe(args.workdir, args.samples)
    calls, flushes = [], []
    with d.warmed(probe_dir), disk.Appender(os.path.join(d.dir, "var")) as flush:
        for i in range(args.samples):
            t = time.time()
            msgd.send(tasks.encode(i, t), queue=QUEUE, config=d.config)
            calls.append(time.time() - t)
            spaced()
            flushes.append(flush())
        s = scenario.wait_count(probe_dir, args.samples, 30, with_values=True, proc=d.proc)
    return {
        **latency_figures(s.values),
        "send_call": latency_figures(calls),
        "flush": latency_figures(flushes),
        "fsync": not args.no_fsync,
    }


# --- signals ------------------------------------------------------------------------------------


def usr1_samples(d: Daemon, samples: int) -> tuple[list[float], list[float]]:
    """Per USR1: kill → stats file rewritten, and kill → the action's task running (the state
    file's `began_monotonic`: CLOCK_MONOTONIC, the same clock in every process)."""
    stats, state = Watch(d.stats_file), Watch(d.state_file)
    rewritten, running = [], []
    try:
        for _ in range(samples):
            before = (read_json(d.stats_file) or {}).get("generation", 0)
            t0 = time.monotonic()
            d.signal(signal.SIGUSR1)
            stats.until(lambda s, b=before: s.get("generation", 0) > b, 5, "stats generation")
            rewritten.append(time.monotonic() - t0)
            acked = lambda s, b=before: s["generations"]["stats"] > b  # noqa: E731
            state.until(acked, 5, "stats acknowledged")
            acknowledged = read_json(d.state_file)
            assert acknowledged is not None  # it was just read by the wait above
            running.append(acknowledged["last"]["stats"]["began_monotonic"] - t0)
            spaced()
    finally:
        stats.close()
        state.close()
    return rewritten, running


def usr1(args) -> dict:
    """USR1 -> stats file rewritten with a new generation: idle, then with both workers busy."""
    d = Daemon(os.path.join(args.workdir, "msgd"))
    probe_dir = scenario.fresh_probe(args.workdir, 0)
    d.start()
    try:
        d.wait_ready()
        wait_for(lambda: read_json(d.stats_file), 10, "the first stats file")
        idle, idle_running = usr1_samples(d, args.samples)
        # Saturate: CPU-bound messages worth about twice the expected sampling time.
        sampling = args.samples * 0.03
        n = max(100, int(2 * sampling * WORKERS / args.unit))
        d.send_many([tasks.encode(i, 0.0, args.iterations) for i in range(n)])
        wait_for(lambda: probe.summary(probe_dir).count >= 1, 30, "the pool to start working")
        busy, busy_running = usr1_samples(d, args.samples)
        saturated = probe.summary(probe_dir).count < n  # work was still queued at the end
    finally:
        d.stop()
    return {
        "idle": latency_figures(idle),
        "saturated": latency_figures(busy),
        "task_idle": latency_figures(idle_running),
        "task_saturated": latency_figures(busy_running),
        "saturated_throughout": saturated,
        "queued": n,
    }


PRODUCER = """
import signal, sys
sys.path.insert(0, {bench!r})
import msgd, tasks
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print("started", flush=True)
i = 0
while not stop:
    msgd.send(tasks.encode(i), queue={queue!r}, config={config!r})
    i += 1
print(i, flush=True)
"""


def hup(args) -> dict:
    """HUP -> reload applied (state generation "reload" moves), while a producer streams.

    Afterwards every message sent must have been handled: lost = sent - distinct handled.
    """
    d = Daemon(os.path.join(args.workdir, "msgd"))
    probe_dir = scenario.fresh_probe(args.workdir, 200_000)
    code = PRODUCER.format(bench=BENCH, queue=QUEUE, config=d.config)
    with d.warmed(probe_dir):
        producer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert producer.stdout is not None
            producer.stdout.readline()  # "started"
            wait_for(lambda: probe.summary(probe_dir).count > 0, 30, "the stream to flow")
            watch = Watch(d.state_file)
            samples = []
            try:
                for _ in range(args.samples):
                    before = d.generation("reload")
                    t0 = time.perf_counter()
                    d.signal(signal.SIGHUP)
                    watch.until(
                        lambda s, b=before: s["generations"]["reload"] > b, 10, "reload generation"
                    )
                    samples.append(time.perf_counter() - t0)
                    spaced()
            finally:
                watch.close()
            during = probe.summary(probe_dir).count
            producer.send_signal(signal.SIGTERM)
            sent = int(producer.stdout.readline())
            producer.wait(10)
            s = scenario.wait_count(probe_dir, sent, 60, with_values=True, proc=d.proc)
            ok = [e for e in (read_json(d.state_file) or {}).get("last", {}).items()]
        finally:
            if producer.poll() is None:  # an error on the way: the producer must not outlive us
                producer.kill()
    seen = {int(v) for v in s.values}
    failed_dir = os.path.join(d.spool, "failed")
    failed = len(os.listdir(failed_dir)) if os.path.isdir(failed_dir) else 0
    return {
        **latency_figures(samples),
        "sent": sent,
        "handled_during_hups": during,
        "handled": s.count,
        "lost": len(set(range(sent)) - seen),
        "duplicates": s.count - len(seen),
        "failed": failed,
        "last": dict(ok),
    }


def hup_code(args) -> dict:
    """HUP after the handler's code changed -> the first message run by the new code.

    A second queue's handler lives in a module the driver rewrites before each HUP; after the
    signal the driver sends a message every 2 ms until one is run by the new version (old workers
    may still take one or two). The handler notes time.monotonic(), the driver's clock too.
    """
    d = Daemon(os.path.join(args.workdir, "msgd"))
    module, out = os.path.join(d.dir, "versioned.py"), os.path.join(d.dir, "ran.txt")

    def install(version: int) -> None:
        with open(module + ".tmp", "w") as f:
            f.write(VERSIONED.format(version=version, out=out))
        os.replace(module + ".tmp", module)

    def ran(version: int) -> list[float]:
        with open(out) as f:
            return [float(t) for v, t in (line.split() for line in f) if int(v) == version]

    install(0)
    with open(d.config, "a") as f:
        f.write('\n[queues.code]\nhandler = "versioned:job"\n')
    open(out, "w").close()
    # No bytecode cache: a rewrite within the same second could otherwise load a stale .pyc.
    d.start(env={"PYTHONDONTWRITEBYTECODE": "1"})
    samples = []
    try:
        d.wait_ready()
        for version in range(1, args.samples + 1):
            install(version)
            t0 = time.monotonic()
            d.signal(signal.SIGHUP)

            def new_code_ran(v: int = version) -> list[float]:
                msgd.send(b"probe", queue="code", config=d.config)
                return ran(v)

            samples.append(min(wait_for(new_code_ran, 10, "the new code", 0.002)) - t0)
            spaced()
    finally:
        d.stop()
    return latency_figures(samples)


# --- counters, memory, start, send --------------------------------------------------------------


def counters(args) -> dict:
    """ns per update: an update of msgd's lock-free slot (its own view of the shared
    `Array('Q', lock=False)`) vs a locked multiprocessing.Value."""
    from msgd.counters import Counters

    value = multiprocessing.Value("Q", 0)
    number = args.n
    writer = Counters().writer(0)
    env = {"a": writer.a, "v": value, "w": writer}

    def ns(stmt: str) -> float:
        best = min(timeit.Timer(stmt, globals=env).repeat(5, number))
        return best / number * 1e9

    empty = ns("pass")
    lockfree = ns("a[5] += 1")
    locked = ns("with v.get_lock():\n    v.value += 1")
    result = {
        "loops": number,
        "loop_overhead_ns": empty,
        "lockfree_ns": lockfree - empty,
        "locked_ns": locked - empty,
    }
    # What a worker does per message: start, intend and finish, with a real message name.
    env["name"] = "19bd2c1e0f5a3b7c9d1e4f60@1"
    per_message = "w.intend(0, 0, 0)\nw.finish(0, 0, 0, w.start(0, 0, name, name))"
    result["per_message_ns"] = ns(per_message) - empty
    return result


def memory(args) -> dict:
    """Summed PSS and RSS of the master and its 2 workers, idle after a few messages."""
    d = Daemon(os.path.join(args.workdir, "msgd"))
    probe_dir = scenario.fresh_probe(args.workdir, 0)
    with d.warmed(probe_dir):
        wait_for(lambda: d.proc and len(tree_pids(d.proc.pid)) >= 1 + WORKERS, 10, "workers")
        time.sleep(1.0)  # measured idle: 1 s after the last message (a condition, not a sync)
        assert d.proc is not None
        return tree_memory(d.proc.pid)


def tree_pids(pid: int) -> list[int]:
    from common import process_tree

    return process_tree(pid)


def start(args) -> dict:
    """msgd start -> READY=1 on NOTIFY_SOCKET (a datagram socket bound here), several times.

    Beside it, what a start is made of: a bare interpreter's start, and the import of msgd's
    console-script module in a fresh interpreter, with the optional modules that import loaded."""
    d = Daemon(os.path.join(args.workdir, "msgd"))
    path = os.path.join(args.workdir, "notify.sock")
    times, state_times = [], []
    for _ in range(args.samples):
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        try:
            t0 = time.perf_counter()
            d.start(env={"NOTIFY_SOCKET": path})
            sock.settimeout(30)
            while True:
                message = sock.recv(4096).decode(errors="replace")
                if "READY=1" in message.split("\n"):
                    break
            times.append(time.perf_counter() - t0)
            d.wait_ready()
            state_times.append(time.perf_counter() - t0)
        finally:
            sock.close()
            d.stop()
    return {
        "ready": latency_figures(times),
        "state_file_p50_ms": sorted(state_times)[len(state_times) // 2] * 1e3,
        **import_costs(args.samples),
    }


# Modules msgd needs only when a feature is configured (python-daemon: only for --daemon) or never
# (ssl): their presence after importing the entry point is what a start pays for nothing.
OPTIONAL = ("ssl", "redis", "pika", "websockets", "cronsim", "daemon")
IMPORT = """
import importlib, importlib.metadata as m, json, sys, time
t = time.perf_counter()
importlib.import_module(m.entry_points(group="console_scripts", name="msgd")[0].module)
print(json.dumps([time.perf_counter() - t, [n for n in {optional!r} if n in sys.modules]]))
"""


def import_costs(samples: int) -> dict:
    """p50 of a bare interpreter's start-up and of importing msgd's entry point, in ms."""
    bare, imports, loaded = [], [], []
    code = IMPORT.format(optional=OPTIONAL)
    for _ in range(samples):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - t)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        seconds, loaded = json.loads(out.stdout)
        imports.append(seconds)
    return {
        "python_start_p50_ms": statistics.median(bare) * 1e3,
        "import_p50_ms": statistics.median(imports) * 1e3,
        "optional_imported": loaded,
        "optional_checked": list(OPTIONAL),
    }


def send(args) -> dict:
    """The producer side, no daemon running: `--samples` msgd.send calls one by one and one
    send_many of `--n`; or, with `--producers P`, P processes sending `--n` one by one."""
    d = Daemon(os.path.join(args.workdir, "msgd"), fsync=not args.no_fsync)
    d.send_many([tasks.encode(-1)])  # config parsed and directories made before timing

    def one(i: int) -> str:
        return msgd.send(tasks.encode(i), queue=QUEUE, config=d.config)

    if args.producers > 1:
        return scenario.producers(lambda: one, args.producers, args.n)
    single = scenario.timed(lambda: [one(i) for i in range(args.samples)], args.samples)
    bodies = [tasks.encode(i) for i in range(args.n)]
    return {"send": single, "send_many": scenario.timed(lambda: d.send_many(bodies), args.n)}


SCENARIOS = {
    "drain": drain,
    "bare": lambda args: bare(args, WORKERS),
    "bare-1": lambda args: bare(args, 1),
    "stream": stream,
    "idle-latency": idle_latency,
    "cpu": cpu,
    "usr1": usr1,
    "hup": hup,
    "hup-code": hup_code,
    "counters": counters,
    "memory": memory,
    "start": start,
    "send": send,
    "nocounters": no_counters,
}


def main() -> None:
    args = scenario.parse(list(SCENARIOS))
    write_result(args.out, SCENARIOS[args.scenario](args))


if __name__ == "__main__":
    main()
