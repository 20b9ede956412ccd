"""Redis Streams queues: several daemons on one consumer group, reclaim, outages, dead letters.

Each test runs against a real redis-server the tests start on a free loopback port, with its own
stream name. Duplicates are allowed only where at-least-once delivery makes them unavoidable: a
kill -9 of a daemon re-runs the messages its runners had in hand (at most one per runner).
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Msgd, alive, wait_for

redis = pytest.importorskip("redis", reason="redis-py missing (pip install -e '.[redis]')")
REDIS_SERVER = shutil.which("redis-server")
pytestmark = [
    pytest.mark.skipif(
        REDIS_SERVER is None, reason="redis-server not installed (run `make system-deps`)"
    ),
    pytest.mark.xdist_group("redis"),  # one worker: see pyproject's addopts
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of our own: loopback, a temporary directory, AOF fsynced on every write."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = redis.Redis(port=self.port, socket_timeout=5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                *("--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir)),
                *("--save", "", "--appendonly", "yes", "--appendfsync", "always"),
            ],
            stdout=open(self.dir / "redis.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_for(self.ping, 10, "redis-server to answer")

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        """SIGTERM: Redis flushes its AOF and exits, as in an orderly restart."""
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


def on_redis(d: Msgd, server: RedisServer, stream: str, **queue: Any) -> Msgd:
    """Give `d` a Redis queue "rq" on `stream` (the spool queue "default" stays)."""
    d.queues["rq"] = {
        "handler": "handlers:record",
        "backend": "redis",
        "url": server.url,
        "stream": stream,
        "timeout": 5.0,
        **queue,
    }
    d.write_config()
    return d


def new_stream() -> str:
    return f"msgd-test:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def stream() -> str:
    return new_stream()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Msgd, Msgd]]:
    daemons = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        daemons.append(Msgd(tmp_path / name))
    yield daemons[0], daemons[1]
    for d in daemons:
        d.cleanup()


def pending_of(server: RedisServer, stream: str, pid: int) -> int:
    """Entries pending for the consumers of the daemon whose master is `pid`."""
    consumers = server.client.xinfo_consumers(stream, "msgd")
    return sum(c["pending"] for c in consumers if c["name"].decode().split(":")[-2] == str(pid))


def backlog(server: RedisServer, stream: str) -> tuple[int, int]:
    """(stream length, pending in the group): (0, 0) once everything is acknowledged."""
    groups = server.client.xinfo_groups(stream)
    return server.client.xlen(stream), sum(g["pending"] for g in groups)


def check_all_once(sent: list[str], *daemons: Msgd, duplicates: int = 0) -> list[int]:
    """Every id sent succeeded, no other, at most `duplicates` re-runs; per-daemon counts."""
    runs = [d.succeeded() for d in daemons]
    seen = collections.Counter(i for r in runs for i in r)
    assert set(seen) == set(sent)
    extra = sum(seen.values()) - len(sent)
    assert extra <= duplicates, f"{extra} duplicate successes"
    return [len(r) for r in runs]


# -- sharing --------------------------------------------------------------------------------------


def test_two_daemons_share_ten_thousand(
    pair: tuple[Msgd, Msgd], redis_server: RedisServer, stream: str
) -> None:
    n = 10_000
    for d in pair:
        on_redis(d, redis_server, stream)
        d.start()
    sent = pair[0].send_many([b"x"] * n, "rq")
    wait_for(
        lambda: sum(len(d.succeeded()) for d in pair) >= n, 60, f"{n} successes on two daemons"
    )
    counts = check_all_once(sent, *pair)
    assert all(counts), f"one daemon did nothing: {counts}"
    wait_for(lambda: backlog(redis_server, stream) == (0, 0), 10, "every entry acknowledged")
    for d in pair:
        assert d.stop() == 0


def test_kill_9_of_a_daemon_its_pending_entries_are_reclaimed(
    pair: tuple[Msgd, Msgd], redis_server: RedisServer, stream: str
) -> None:
    a, b = pair
    for d in pair:
        on_redis(d, redis_server, stream, handler="handlers:record_slowly", claim_idle=1.0)
        d.queues["rq"]["timeout"] = 0.5
        d.write_config()
        d.start()
    sent = a.send_many([b"x"] * 1500, "rq")
    wait_for(lambda: len(a.succeeded()) >= 100, 30, "daemon a to be busy")
    wait_for(lambda: pending_of(redis_server, stream, a.pid) > 0, 10, "entries pending for a")
    victim = a.pid
    runners = len(a.workers())
    a.kill(signal.SIGKILL)  # the workers follow (parent-death signal): a host gone at once
    wait_for(lambda: not alive(victim), 10, "a's master to die")
    wait_for(lambda: not a.workers(), 10, "a's workers to die")
    orphans = pending_of(redis_server, stream, victim)
    assert orphans > 0, "a left nothing pending: the test did not interrupt anything"
    wait_for(lambda: set(a.succeeded()) | set(b.succeeded()) >= set(sent), 60, "b to finish")
    check_all_once(sent, a, b, duplicates=runners)
    assert b.events("reclaimed"), "b never reclaimed a's entries"
    wait_for(lambda: backlog(redis_server, stream) == (0, 0), 10, "every entry acknowledged")
    assert b.stop() == 0


def test_a_dead_workers_entries_are_taken_up_by_its_successor_at_once(
    daemon: Msgd, redis_server: RedisServer, stream: str
) -> None:
    """The replacement in the same slot is the same consumer: it reads that consumer's pending
    entries first, long before claim_idle (60 s here, beyond the deadline) would let XAUTOCLAIM."""
    on_redis(daemon, redis_server, stream, handler="handlers:record_slowly", claim_idle=60.0)
    daemon.start()
    sent = daemon.send_many([b"x"] * 1000, "rq")
    wait_for(lambda: len(daemon.succeeded()) >= 100, 20, "work to be under way")
    before = {c["name"] for c in redis_server.client.xinfo_consumers(stream, "msgd")}
    victim = daemon.workers()[0]
    os.kill(victim, signal.SIGKILL)
    # By ids, not lines: the victim may have run one message whose ack never reached Redis.
    wait_for(lambda: set(daemon.succeeded()) >= set(sent), 20, "the successor to finish")
    check_all_once(sent, daemon, duplicates=1)
    assert {c["name"] for c in redis_server.client.xinfo_consumers(stream, "msgd")} == before
    assert daemon.stop() == 0


def test_a_message_that_kills_its_workers_ends_in_the_dead_letters(
    daemon: Msgd, redis_server: RedisServer, stream: str
) -> None:
    on_redis(daemon, redis_server, stream, handler="handlers:by_body", max_attempts=2)
    daemon.start()
    poison = daemon.send(b"abort", "rq")
    letters = wait_for(lambda: redis_server.client.xrange(f"{stream}:failed"), 20, "a dead letter")
    assert letters[0][1][b"id"].decode() == poison
    assert letters[0][1][b"error"] == b"delivered 3 times without being settled (its workers died)"
    after = daemon.send(b"ok", "rq")
    wait_for(lambda: after in daemon.succeeded(), 10, "the queue to work on")
    # The handler notes its success just before the worker acknowledges the entry.
    wait_for(lambda: backlog(redis_server, stream) == (0, 0), 10, "the entry acknowledged")
    assert daemon.stop() == 0


# -- outages --------------------------------------------------------------------------------------


def test_redis_restart_mid_stream_loses_nothing(daemon: Msgd, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        on_redis(daemon, server, new_stream(), handler="handlers:record_slowly")
        daemon.start()
        sent = daemon.send_many([b"x"] * 1500, "rq")
        wait_for(lambda: len(daemon.succeeded()) >= 200, 30, "work to be under way")
        server.stop()
        wait_for(lambda: daemon.events("redis unavailable"), 10, "the outage to be logged")
        spool_id = daemon.send(b"spool", "default")  # the other queues keep working
        wait_for(lambda: spool_id in daemon.succeeded(), 10, "the spool queue to work")
        server.start()
        wait_for(lambda: set(daemon.succeeded()) >= {*sent, spool_id}, 60, "all after restart")
        check_all_once([*sent, spool_id], daemon)
        assert daemon.events("redis back")
        assert len(daemon.events("redis unavailable")) <= len(daemon.events("redis back"))
        assert daemon.stop() == 0
    finally:
        server.kill()


# -- failures, stats, msgctl ----------------------------------------------------------------------


def test_retries_dead_letters_stats_and_msgctl(
    daemon: Msgd, redis_server: RedisServer, stream: str
) -> None:
    on_redis(
        daemon, redis_server, stream, handler="handlers:by_body", max_attempts=2, backoff=[0.05]
    )
    daemon.start()
    bodies = [b"ok", b"fail", b"reject", b"fail-once"]
    ids = dict(zip(bodies, daemon.send_many(bodies, "rq"), strict=True))
    sent = daemon.msgctl("send", "-q", "rq", input=b"ok")
    assert sent.returncode == 0, sent.stderr
    ids[b"ctl"] = sent.stdout.strip()
    failed = wait_for(
        lambda: (e := redis_server.client.xrange(f"{stream}:failed")) and len(e) == 2 and e,
        10,
        "two dead letters",
    )
    letters = {f[b"body"]: f for _, f in failed}
    assert letters[b"reject"][b"error_type"] == b"Reject"
    assert letters[b"reject"][b"error"] == b"not acceptable"
    assert letters[b"reject"][b"attempts"] == b"1"
    assert letters[b"fail"][b"error_type"] == b"RuntimeError"
    assert letters[b"fail"][b"error"] == b"failing attempt 2"
    assert letters[b"fail"][b"attempts"] == b"2"
    assert letters[b"fail"][b"id"].decode() == ids[b"fail"]
    assert b"Traceback" in letters[b"fail"][b"traceback"]
    wait_for(
        lambda: {ids[b"ok"], ids[b"fail-once"], ids[b"ctl"]} <= set(daemon.succeeded()),
        10,
        "the successes",
    )
    started = (daemon.out / "started").read_text().split("\n")
    assert f"{ids[b'fail-once']} 2" in started  # retried, then succeeded

    def counted() -> dict[str, Any] | None:
        q = daemon.stats().get("queues", {}).get("rq", {})
        return q if q.get("succeeded") == 3 and q["depth"].get("failed") == 2 else None

    q = wait_for(counted, 10, "the stats file to count the queue")
    assert (q["failed"], q["retried"], q["rejected"]) == (2, 2, 1)
    assert (q["depth"]["new"], q["depth"]["cur"], q["depth"]["defer"]) == (0, 0, 0)
    assert daemon.stats()["queues"]["default"]["succeeded"] == 0  # counted per queue
    listing = daemon.msgctl("queues")
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if x.startswith("rq "))
    assert f"redis stream {stream}: length 0, pending 0, consumers" in line
    assert line.split()[1:5] == ["0", "0", "0", "2"]  # new, cur, defer, failed
    assert int(line.rpartition("consumers ")[2]) >= 2  # one per worker slot
    assert daemon.stop() == 0


# -- burst and stop -------------------------------------------------------------------------------


def test_burst_mode_redis_queue_waits_for_usr2(
    daemon: Msgd, redis_server: RedisServer, stream: str
) -> None:
    on_redis(daemon, redis_server, stream, mode="burst")
    daemon.start()
    night = daemon.send_many([b"n"] * 20, "rq")
    marker = daemon.send(b"day", "default")
    wait_for(lambda: marker in daemon.succeeded(), 10, "the continuous queue to work")
    assert daemon.succeeded() == [marker]
    assert backlog(redis_server, stream) == (20, 0)  # not even read before the burst
    done = daemon.msgctl("burst", "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "burst done: 20 succeeded, 0 retried, 0 failed"
    assert set(night) <= set(daemon.succeeded())  # all worked when --wait returned
    check_all_once([*night, marker], daemon)
    assert daemon.stop() == 0


def test_graceful_stop_finishes_in_flight_and_leaves_the_rest_pending(
    daemon: Msgd, redis_server: RedisServer, stream: str
) -> None:
    # claim_idle is short so the restart's takeover is quick, and 3 s so that a batch a loaded
    # machine is slow to work is not taken over (and run twice) by the new daemon's other worker.
    on_redis(daemon, redis_server, stream, handler="handlers:by_body", threads=2, claim_idle=3.0)
    daemon.queues["rq"]["timeout"] = 0.9
    daemon.write_config()
    daemon.start()
    sent = daemon.send_many([b"sleep:0.002"] * 2000, "rq")
    wait_for(lambda: len(daemon.succeeded()) >= 300, 20, "batches to be read ahead")
    master = daemon.pid
    assert daemon.stop() == 0
    started = {line.split()[0] for line in (daemon.out / "started").read_text().splitlines()}
    done = daemon.succeeded()
    assert started == set(done)  # what was in flight finished
    length, _ = backlog(redis_server, stream)
    assert length == len(sent) - len(done)  # the rest is still in Redis, nothing acked unworked
    assert pending_of(redis_server, stream, master) > 0, "nothing read ahead was left pending"
    daemon.start()  # a new master: new consumer names; the old ones' entries come by XAUTOCLAIM
    wait_for(lambda: len(daemon.succeeded()) >= len(sent), 30, "the rest after a restart")
    check_all_once(sent, daemon)
    assert daemon.events("reclaimed")
    assert daemon.stop() == 0


def test_retry_failed_gives_redis_dead_letters_a_fresh_start(
    daemon: Msgd, redis_server: RedisServer, stream: str
) -> None:
    on_redis(daemon, redis_server, stream, handler="handlers:by_body", max_attempts=1)
    daemon.start()
    n = 1200  # more than one page of dead letters (1,000), so the scan must stop at its start
    ids = daemon.send_many([b"fail"] * n, "rq")
    dead = lambda: [  # noqa: E731
        (f[b"id"].decode(), int(f[b"attempts"]))
        for _, f in redis_server.client.xrange(f"{stream}:failed")
    ]
    started = daemon.out / "started"
    runs = lambda: collections.Counter(started.read_text().split("\n"))  # noqa: E731
    wait_for(lambda: len(dead()) == n, 30, "the dead letters")
    unknown = daemon.msgctl("retry-failed", "rq", "nosuchid")
    assert unknown.returncode == 1 and "rq: no failed message nosuchid" in unknown.stderr
    done = daemon.msgctl("retry-failed", "rq", ids[0])
    assert done.returncode == 0 and done.stdout.startswith("1 message(s)"), done.stderr
    wait_for(lambda: runs()[f"{ids[0]} 1"] == 2, what="it ran again, attempt counted from 1")
    wait_for(lambda: len(dead()) == n, what="and is a dead letter again")
    done = daemon.msgctl("retry-failed", "rq")  # all: each once, though they fail again at once
    assert done.returncode == 0 and done.stdout.startswith(f"{n} message(s)"), done.stdout
    wait_for(lambda: sum(runs().values()) >= 2 * n + 1, 30, "every one run again")
    wait_for(lambda: len(dead()) == n, 30, "all dead again")
    assert sorted(dead()) == sorted((mid, 1) for mid in ids)
    daemon.queues["gone"] = {**daemon.queues["rq"], "url": f"redis://127.0.0.1:{free_port()}/0"}
    daemon.write_config()  # a Redis nobody listens on: one clear line, exit 1
    gone = daemon.msgctl("retry-failed", "gone")
    assert gone.returncode == 1 and "gone: redis://127.0.0.1:" in gone.stderr, gone.stderr
