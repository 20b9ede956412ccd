"""Fault injection: kill -9 of workers and of the master, signal storms, disk full, bad reloads.

Each test ends with faultkit.Tally.check(): sent = succeeded + failed-as-expected, nothing left
in cur/ (or new/, defer/), and the duplicate successes counted. Duplicates are allowed only where
at-least-once delivery makes them unavoidable, and the bound says which:
  - kill -9 of a worker: a message whose handler returned in the instant before its ack-log record
    was written is re-run (at most one per runner per kill; in practice 0);
  - kill -9 of the master: every message in flight at that moment goes back to new/ untouched and
    runs again; those whose handler had already finished are duplicates (at most the in-flight
    count, measured in cur/ after the kill).
The long variants are marked `slow`; the default run keeps bounded versions of each.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import Msgd, spool_store, wait_for
from faultkit import FAST_DEATH, Tally, age, msgd_processes, title, tmpfs
from msgd.spool import AckLog


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def fast_retries(d: Msgd, queue: str = "default", **extra: object) -> None:
    d.queues[queue] = {**d.queues.get(queue, {}), "backoff": [0.0], **extra}


def kill_busy_workers(d: Msgd, kills: int, finished: threading.Event) -> int:
    """kill -9 `kills` workers, each in the middle of a message; returns how many were killed.

    Only workers older than the pool's FAST_DEATH are chosen, so the pool's crash-loop backoff
    never slows the stream down: the fault is the kill, not a crash loop.
    """
    killed: set[int] = set()
    while len(killed) < kills and not finished.is_set():
        busy = [
            p
            for p in d.workers()
            if p not in killed and age(p) > FAST_DEATH + 0.05 and " busy " in title(p)
        ]
        if not busy:
            time.sleep(0.002)
            continue
        victim = random.choice(busy)
        os.kill(victim, signal.SIGKILL)
        killed.add(victim)
    return len(killed)


# -- kill -9 of a worker -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kills", "messages", "pause"),
    [
        pytest.param(10, 1_000, 0.02, id="10x1000"),
        pytest.param(100, 10_000, 0.015, id="100x10000", marks=pytest.mark.slow),
    ],
)
def test_kill9_worker_mid_message(daemon: Msgd, kills: int, messages: int, pause: float) -> None:
    daemon.daemon["workers"] = 4
    daemon.queues["default"] = {"handler": "handlers:by_body", "max_attempts": 50}
    fast_retries(daemon)
    daemon.write_config()
    daemon.start()
    tally = Tally(daemon)
    finished = threading.Event()

    def produce() -> None:
        body = f"sleep:{pause}".encode()
        for _ in range(messages // 100):
            tally.add(daemon.send_many([body] * 100))
            time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    killed = kill_busy_workers(daemon, kills, finished)
    producer.join()
    wait_for(tally.settled, 60 + messages * pause / 2, "every message to be worked")
    finished.set()
    assert killed == kills, f"the stream ended after {killed} kills"
    assert daemon.proc.poll() is None, "the master survived"
    deaths = [e for e in daemon.events("worker exited") if "SIGKILL" in e["how"]]
    assert len(deaths) == kills
    # Each kill failed the attempt of the message in hand: it was retried, not lost.
    assert sum(e.get("retried", 0) for e in deaths) >= kills * 0.8
    tally.check("kill -9 worker mid-message", kills, max_dups=kills)
    wait_for(lambda: len(daemon.workers()) == 4, what="the pool back at 4 workers")


def test_kill9_worker_with_ack_pending_is_not_rerun(daemon: Msgd) -> None:
    """A worker killed between success and unlink: the ack log says done; no second run."""
    daemon.daemon["workers"] = 1
    daemon.write_config()
    daemon.start()
    store = daemon.store()
    ids = store.send_many([b"x"] * 3)
    daemon.wait_processed(3)
    worker = daemon.workers()[0]
    cur = daemon.root / "spool/default/cur/0"
    log = AckLog(store.root, 0)
    [done_id] = store.send_many([b"done already"])
    daemon.wait_processed(4)
    wait_for(lambda: not log.entries("default") and not list(cur.iterdir()), what="the unlink")
    os.kill(worker, signal.SIGSTOP)
    wait_for(lambda: state_of(worker) == "T", what="the worker stopped")
    # Fake the instant after a success: the file back in cur/0 and its record in the ack log.
    (cur / done_id).write_bytes(b"done already")
    record = f"default/{done_id}".encode().ljust(AckLog.RECORD, b"\0")
    with open(log.path, "r+b") as f:  # what the worker's mapped log holds at that instant
        f.seek(7 * AckLog.RECORD)
        f.write(record)
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: daemon.events("worker exited"), what="the death noticed")
    wait_for(lambda: not list(cur.iterdir()), what="cur/0 settled")
    tally = Tally(daemon, sent=[*ids, done_id])
    tally.check("kill -9 worker after success, before unlink", 1)
    assert daemon.events("worker exited")[0]["finished"] == 1


# -- kill -9 of the master -----------------------------------------------------------------------


def kill_master(d: Msgd) -> int:
    """kill -9 the master; wait until no process of it remains (PDEATHSIG); return in-flight."""
    before = msgd_processes(d)
    assert before, "msgd is running"
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(10)
    wait_for(lambda: not msgd_processes(d), 10, f"no orphan workers (had {before})")
    assert d.pidfile.exists()  # left behind, unlocked: the next start takes it over
    return len(d.files("default", "cur"))


def restart(d: Msgd) -> None:
    """Start again after a kill -9: ready once the state file (the old one is left) is ours."""
    d.start(wait=False)
    wait_for(lambda: d.state().get("pid") == d.proc.pid and d.proc.poll() is None, 15, "restart")


def test_kill9_master_during_burst(daemon: Msgd) -> None:
    daemon.daemon["workers"] = 2
    daemon.queues["default"] = {"handler": "handlers:by_body", "mode": "burst", "threads": 2}
    daemon.write_config()
    daemon.start()
    tally = Tally(daemon)
    tally.add(daemon.send_many([b"sleep:0.005"] * 600))
    done = daemon.msgctl("burst")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: len(daemon.succeeded()) > 100, what="the burst under way")
    in_flight = kill_master(daemon)
    assert 0 < len(daemon.succeeded()) < 600
    restart(daemon)
    assert daemon.events("recovered messages left in flight by a previous master") or not in_flight
    done = daemon.msgctl("--timeout", "60", "burst", "--wait")
    assert done.returncode == 0, done.stderr
    wait_for(tally.settled, 30, "every message worked")
    tally.check("kill -9 master during a burst", 1, restarts=1, max_dups=in_flight)


@pytest.mark.parametrize(
    "rounds", [pytest.param(3, id="3"), pytest.param(20, marks=pytest.mark.slow)]
)
def test_kill9_master_during_reload(daemon: Msgd, rounds: int) -> None:
    daemon.daemon["workers"] = 2
    daemon.queues["default"] = {"handler": "handlers:by_body", "threads": 2}
    daemon.write_config()
    daemon.start()
    tally = Tally(daemon)
    tally.add(daemon.send_many([b"sleep:0.005"] * (300 * rounds)))
    dups_allowed = 0
    for i in range(rounds):
        wait_for(lambda i=i: len(daemon.succeeded()) > 150 * i + 50, what="messages flowing")
        daemon.kill(signal.SIGHUP)
        time.sleep(random.uniform(0.0, 0.05))  # somewhere inside the reload
        dups_allowed += kill_master(daemon)
        restart(daemon)
    wait_for(tally.settled, 60, "every message worked")
    tally.check("kill -9 master during a reload", rounds, restarts=rounds, max_dups=dups_allowed)
    assert len(msgd_processes(daemon)) == 3  # the master and its two workers, no more


# -- a signal storm ------------------------------------------------------------------------------


STORM = {
    signal.SIGHUP: "reload",
    signal.SIGUSR1: "stats",
    signal.SIGUSR2: "burst",
    signal.SIGTTIN: "scale",
    signal.SIGTTOU: "scale",
}


@pytest.mark.parametrize("signals", [pytest.param(10_000, id="10000")])
def test_mixed_signal_storm_while_messages_flow(daemon: Msgd, signals: int) -> None:
    daemon.daemon["workers"] = 2
    daemon.write_config()
    daemon.start()
    pid = daemon.pid
    tally = Tally(daemon)
    last: dict[str, float] = {}
    kinds = list(STORM)
    rng = random.Random(8)
    started = time.monotonic()
    for i in range(signals):
        if i % 1000 == 0:
            tally.add(daemon.send_many([b"x"] * 100))
        sig = rng.choice(kinds)
        os.kill(pid, sig)
        last[STORM[sig]] = time.time()
    storm_s = time.monotonic() - started
    assert storm_s < 10, f"the storm took {storm_s:.1f}s"

    def ran_after_its_last_signal() -> bool:
        state = daemon.state()
        return all(state["last"].get(a, {}).get("at", 0) > t for a, t in last.items())

    wait_for(ran_after_its_last_signal, 30, "every action once more after its last signal")
    assert daemon.proc.poll() is None, "the master survived the storm"
    # Coherent: the pool reaches the size the daemon reports, and a reload resets it.
    ok = daemon.msgctl("reload")
    assert ok.returncode == 0, ok.stderr
    wait_for(lambda: len(daemon.workers()) == 2, 20, "the pool settled at the config's 2")
    # A reload does not rewrite the stats file: the next periodic rewrite shows the size.
    wait_for(lambda: daemon.stats().get("workers_target") == 2, 5, "the stats file to agree")
    wait_for(tally.settled, 30, "every message worked")
    tally.check("signal storm (10,000 mixed)", signals)


# -- bad config on reload ------------------------------------------------------------------------


def test_bad_configs_on_reload_are_rejected_and_the_old_one_serves(daemon: Msgd) -> None:
    daemon.start()
    good = daemon.config_path.read_text()
    tally = Tally(daemon)
    cases = [
        ("syntax error", good + "\n[queues.broken\n", "TOML syntax error"),
        ("unknown key", good.replace("workers = 2", "wokers = 2"), "unknown field `wokers`"),
        (
            "wrong type",
            good.replace("workers = 2", 'workers = "two"'),
            "daemon.workers: Expected `int`, got `str`",
        ),
        (
            "unimportable handler",
            good.replace("handlers:record", "no_such_module:f"),
            "queues.default.handler: cannot import no_such_module:f",
        ),
    ]
    rejected = 0
    for what, text, reason in cases:
        daemon.write_config(text)
        via_ctl = daemon.msgctl("reload")
        assert via_ctl.returncode == 1, what
        assert reason in via_ctl.stderr, (what, via_ctl.stderr)
        before = daemon.generation("reload")
        daemon.kill(signal.SIGHUP)  # the daemon's own check, without msgctl's
        wait_for(lambda b=before: daemon.generation("reload") > b, what=f"reload of {what}")
        last = daemon.state()["last"]["reload"]
        assert last["outcome"] == "rejected" and reason in last["error"], (what, last)
        rejected += 1
        tally.add(daemon.store().send_many([what.encode()]))
        wait_for(tally.settled, what=f"the old config serving after {what}")
    # An unwritable spool for a queue the new config adds: only the daemon can tell.
    extra = daemon.root / "spool" / "extra"
    with tmpfs(extra, "ro,size=64k") as mounted:
        if not mounted:
            extra.rmdir()
            extra.write_text("a file where the queue's directory must go")
        daemon.write_config(good + '\n[queues.extra]\nhandler = "handlers:record"\n')
        via_ctl = daemon.msgctl("reload")
        assert via_ctl.returncode == 1
        assert "reload rejected: daemon.spool: not writable" in via_ctl.stderr, via_ctl.stderr
        rejected += 1
    tally.add(daemon.store().send_many([b"after the spool case"]))
    wait_for(tally.settled, what="the old config serving")
    rejections = [e for e in daemon.events("reload") if e["outcome"] == "rejected"]
    assert len(rejections) == len(cases) + 1  # msgctl signalled only for the spool case
    daemon.write_config(good)
    assert daemon.msgctl("reload").returncode == 0
    tally.check("bad config on reload", rejected)


# -- disk full -----------------------------------------------------------------------------------


def complete_files(new: Path, size: int) -> None:
    for p in new.iterdir():
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            continue  # claimed meanwhile
        assert len(data) == size and data == data[:1] * size, f"partial message {p.name}"


def test_disk_full_while_producing(daemon: Msgd) -> None:
    spool_dir = daemon.root / "spool"
    with tmpfs(spool_dir, "size=2m") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs is not permitted here (see the injected variant)")
        daemon.daemon["workers"] = 0  # nothing drains: the disk fills
        daemon.write_config()
        daemon.start()
        tally = Tally(daemon)
        size = 64 * 1024
        new = spool_dir / "default" / "new"
        watching = threading.Event()
        seen_partial: list[str] = []

        def watch() -> None:  # a consumer's eye on new/ the whole time
            while not watching.is_set():
                try:
                    complete_files(new, size)
                except AssertionError as e:
                    seen_partial.append(str(e))

        watcher = threading.Thread(target=watch)
        watcher.start()
        errors = 0
        try:
            for i in range(200):
                body = bytes([65 + i % 26]) * size
                try:
                    tally.add(daemon.send_many([body] * 3))
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    errors += 1
                    if errors == 5:
                        break
        finally:
            watching.set()
            watcher.join()
        assert errors == 5, "the disk never filled"
        assert not seen_partial, seen_partial[:3]
        complete_files(new, size)
        assert not list((spool_dir / "default" / "tmp").iterdir()), "tmp/ cleaned up"
        assert sorted(p.name for p in new.iterdir()) == sorted(tally.sent)
        # Space comes back as the daemon works: scale up, drain, then produce again.
        daemon.kill(signal.SIGTTIN)
        wait_for(tally.settled, 30, "the backlog worked")
        tally.add(daemon.send_many([b"z" * size] * 3))
        wait_for(tally.settled, 10, "the new messages worked")
        assert daemon.stop() == 0
        tally.check("disk full while producing (tmpfs ENOSPC)", errors)


def test_disk_full_injected_mid_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a mount: the 4th write of a batch fails with ENOSPC; nothing of it appears."""
    store = spool_store(tmp_path / "spool", "q")
    store.send_many([b"before"])
    real_write = os.write
    calls = {"n": 0}

    def write(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 4:
            return real_write(fd, bytes(data)[: len(data) // 2])  # a short write first...
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ...then the disk is full
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError) as e:
        store.send_many([b"%d" % i * 1000 for i in range(6)])
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert store.depths().new == 1, "only the earlier message is waiting"
    assert store.names("tmp") == [], "no partial file left behind"


# -- stats file unwritable -----------------------------------------------------------------------


def test_unwritable_run_directory_does_not_stop_timekeeping(daemon: Msgd) -> None:
    """The 1 s stats rewrite failing (full /run, a stray entry) must not stop retries/timeouts."""
    daemon.queues["default"] = {"handler": "handlers:by_body", "timeout": 0.5, "max_attempts": 2}
    fast_retries(daemon)
    daemon.write_config()
    daemon.start()
    blocker = daemon.root / "run" / f"stats.json.tmp.{daemon.pid}"
    blocker.mkdir()  # atomic_write's temporary name is taken by a directory: every write fails
    (blocker / "x").write_text("")

    def failed() -> list[dict]:
        return [e for e in daemon.events("periodic duty failed") if e["duty"] == "stats file"]

    wait_for(failed, 5, "a stats rewrite to fail")
    tally = Tally(daemon)
    tally.add(daemon.store().send_many([b"fail-once"]))  # needs a due retry released
    tally.add(daemon.store().send_many([b"hang"]), fail=True)  # needs the timeout enforced
    wait_for(tally.settled, 15, "the retry and the timeout to happen")
    assert daemon.proc.poll() is None
    (blocker / "x").unlink()
    blocker.rmdir()
    wait_for(lambda: daemon.events("periodic duty recovered"), 5, "the stats file rewritten")
    assert len(failed()) == 1  # logged once while it lasted, not every second
    tally.check("stats file unwritable", 1)


def test_burst_that_defers_a_message_still_reports(daemon: Msgd) -> None:
    """A burst whose messages end in defer/ must finish: defer names carry two '@' fields."""
    daemon.queues["default"] = {"handler": "handlers:by_body", "backoff": [300.0], "mode": "burst"}
    daemon.write_config()
    daemon.start()
    tally = Tally(daemon)
    tally.add(daemon.send_many([b"ok"] * 5))
    retried = daemon.send(b"fail-once")
    done = daemon.msgctl("--timeout", "20", "burst", "--wait")
    assert done.returncode == 0, done.stderr
    assert "5 succeeded, 1 retried, 0 failed" in done.stdout
    assert daemon.files("default", "defer")[0].startswith(f"{retried}@1@")
    done = daemon.msgctl("--timeout", "20", "burst", "--wait")  # forces the retry now
    assert done.returncode == 0 and "1 succeeded" in done.stdout, done.stdout
    tally.add([retried])
    tally.check("burst with a deferred message", 1)
