"""Messages end to end: producing, handlers, retries, dead letters, the pool, burst and drain.

Every test that can lose a message counts: sent = succeeded + dead-lettered, nothing in cur/.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
from pathlib import Path

import pytest
from conftest import Msgd, wait_for
from faultkit import title


def use(daemon: Msgd, handler: str, **queue: object) -> None:
    daemon.queues["default"] = {"handler": handler, **queue}
    daemon.write_config()


def assert_settled(daemon: Msgd, sent: list[str], failed: int = 0, queue: str = "default") -> None:
    """Everything sent is accounted for: each success once, the rest dead letters, cur/ empty.

    Finished files are unlinked in the background, so cur/ empties a moment after the handler.
    """
    wait_for(
        lambda: daemon.files(queue, "cur") == [] and daemon.files(queue, "new") == [],
        what="cur/ and new/ to empty",
    )
    done = daemon.succeeded()
    dead = [n for n in daemon.files(queue, "failed") if not n.endswith(".error.json")]
    assert len(dead) == failed
    assert sorted(done + dead) == sorted(sent), "lost or duplicated messages"


def send_and_await_start(daemon: Msgd, body: bytes = b"sleep:30") -> str:
    """Start the daemon, send `body` (to a by_body queue), return its id once it is running."""
    daemon.start()
    mid = daemon.send(body)
    wait_for(lambda: (daemon.out / "started").exists(), what="the message started")
    return mid


# -- producing ------------------------------------------------------------------------------------


def test_send_from_python_and_msgctl(daemon: Msgd, tmp_path: Path) -> None:
    daemon.start()
    one = daemon.send(b"from python")
    batch = daemon.send_many([b"a", b"b", b"c"])
    files = []
    for i in range(3):
        f = tmp_path / f"body{i}"
        f.write_bytes(b"file %d" % i)
        files.append(str(f))
    sent = daemon.msgctl("send", *files)
    assert sent.returncode == 0, sent.stderr
    from_files = sent.stdout.split()
    piped = daemon.msgctl("send", "-", input=b"from stdin")
    ids = [one, *batch, *from_files, *piped.stdout.split()]
    assert len(ids) == 8 and len(set(ids)) == 8
    assert ids == sorted(ids)  # ids sort by enqueue time
    wait_for(lambda: len(daemon.succeeded()) == 8, what="8 messages worked")
    assert_settled(daemon, ids)


def test_sending_works_without_the_daemon_and_is_durable_on_disk(daemon: Msgd) -> None:
    ids = daemon.send_many([b"x"] * 5)
    new = daemon.files("default", "new")
    assert new == sorted(ids)
    path = daemon.root / "spool" / "default" / "new" / ids[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert daemon.files("default", "tmp") == []
    queues = daemon.msgctl("queues")
    assert queues.returncode == 0
    assert queues.stdout.splitlines()[1].split() == ["default", "5", "0", "0", "0", "0"]
    daemon.start()
    wait_for(lambda: len(daemon.succeeded()) == 5, what="backlog worked at start")
    assert_settled(daemon, ids)


def test_bad_queue_names_are_refused(daemon: Msgd) -> None:
    for name in ["../escape", "/abs", ".hidden", "a/b", "x" * 65, ""]:
        done = daemon.msgctl("send", "-q", name, "-", input=b"x")
        assert done.returncode == 1, name
        assert "Traceback" not in done.stderr
    with pytest.raises(Exception, match=r"no such queue|bad queue name"):
        daemon.send(b"x", queue="../escape")
    assert not (daemon.root / "escape").exists()


@pytest.mark.parametrize(
    "body", [b"", bytes(range(256)) * 4, os.urandom(1 << 20)], ids=["empty", "binary", "1MB"]
)
def test_bodies_arrive_intact(daemon: Msgd, body: bytes) -> None:
    import hashlib

    use(daemon, "handlers:record_body")
    daemon.start()
    mid = daemon.send(body)
    wait_for(lambda: daemon.succeeded() == [mid], what="the body recorded (written before this)")
    line = (daemon.out / "bodies").read_text().split()
    assert line == [mid, str(len(body)), hashlib.sha256(body).hexdigest()]


def test_message_over_max_size_is_dead_lettered_unread(daemon: Msgd) -> None:
    daemon.daemon["max_message_size"] = 1000
    daemon.write_config()
    daemon.start()
    big, small = daemon.send(b"x" * 1001), daemon.send(b"x" * 1000)
    wait_for(lambda: daemon.succeeded() == [small], what="the small message")
    wait_for(lambda: big in daemon.files("default", "failed"), what="the big one dead-lettered")
    error = json.loads((daemon.root / "spool/default/failed" / f"{big}.error.json").read_text())
    assert "exceeds max_message_size" in error["error"]


# -- handlers, retries and dead letters -----------------------------------------------------------


def test_failure_is_retried_with_backoff_then_dead_lettered(daemon: Msgd) -> None:
    use(daemon, "handlers:attempts", max_attempts=3, backoff=[0.2, 0.4])
    daemon.start()
    mid = daemon.send(b"doomed")
    wait_for(lambda: mid in daemon.files("default", "failed"), what="dead letter")
    lines = [line.split() for line in (daemon.out / "attempts").read_text().splitlines()]
    assert [(i, int(a)) for i, a, _ in lines] == [(mid, 1), (mid, 2), (mid, 3)]
    times = [float(t) for _, _, t in lines]
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4  # backoff honoured
    error = json.loads((daemon.root / "spool/default/failed" / f"{mid}.error.json").read_text())
    assert error["id"] == mid and error["attempts"] == 3
    assert error["error_type"] == "RuntimeError" and error["error"] == "attempt 3 failed"
    assert "Traceback" in error["traceback"] and "attempts" in error["traceback"]
    totals = wait_for(
        lambda: daemon.stats()["totals"] if daemon.stats()["totals"]["failed"] else None,
        what="stats",
    )
    assert (totals["retried"], totals["failed"], totals["succeeded"]) == (2, 1, 0)


def test_deferred_messages_survive_a_restart(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body", max_attempts=2, backoff=[3600])
    daemon.start()
    mid = daemon.send(b"fail-once")
    wait_for(lambda: daemon.files("default", "defer"), what="a deferred retry")
    assert daemon.stop() == 0
    (deferred,) = daemon.files("default", "defer")
    assert deferred.startswith(f"{mid}@1@")  # attempt count and not-before, kept on disk
    daemon.start()
    daemon.kill(signal.SIGUSR2)  # a burst makes deferred messages due at once
    wait_for(lambda: daemon.succeeded() == [mid], what="the retry after restart")
    started = (daemon.out / "started").read_text().split("\n")
    assert started[:2] == [f"{mid} 1", f"{mid} 2"]


def test_reject_dead_letters_at_once(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body", max_attempts=5)
    daemon.start()
    mid = daemon.send(b"reject")
    wait_for(lambda: mid in daemon.files("default", "failed"), what="dead letter")
    error = json.loads((daemon.root / "spool/default/failed" / f"{mid}.error.json").read_text())
    assert error["attempts"] == 1 and error["error_type"] == "Reject"
    wait_for(lambda: daemon.stats()["totals"]["rejected"] == 1, what="rejected counted")
    assert daemon.stats()["totals"]["failed"] == 1


def test_retry_failed_gives_dead_letters_a_fresh_start(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body", max_attempts=1)
    daemon.start()
    mid = daemon.send(b"fail")
    wait_for(lambda: mid in daemon.files("default", "failed"), what="dead letter")
    done = daemon.msgctl("retry-failed", "default", mid)
    assert done.returncode == 0, done.stderr
    started = daemon.out / "started"
    wait_for(
        lambda: started.read_text().split("\n")[:2] == [f"{mid} 1", f"{mid} 1"],
        what="the retried message, attempt counted from 1 again",
    )
    wait_for(lambda: mid in daemon.files("default", "failed"), what="dead-lettered again")
    assert daemon.msgctl("retry-failed", "default", "../../etc").returncode == 1


def test_retry_failed_without_ids_moves_every_dead_letter(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body", max_attempts=1)
    daemon.start()
    ids = daemon.send_many([b"fail"] * 3)
    wait_for(lambda: len(daemon.files("default", "failed")) == 6, what="3 dead letters, 3 records")
    for _ in range(2):  # no worker left to take them again
        assert daemon.msgctl("scale", "down").returncode == 0
    wait_for(lambda: not daemon.workers(), what="no workers")
    done = daemon.msgctl("retry-failed", "default")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("3 message(s) back in default")
    assert daemon.files("default", "new") == sorted(ids)  # bare ids: no attempt counted
    assert daemon.files("default", "failed") == []  # their error records gone with them


@pytest.mark.parametrize(("code", "outcome"), [(0, "succeeded"), (65, "failed"), (3, "retried")])
def test_command_handler_exit_codes(daemon: Msgd, code: int, outcome: str) -> None:
    script = (
        'cat > "$MSGD_TEST_OUT/$MSGD_MESSAGE_ID.$MSGD_ATTEMPT.$MSGD_QUEUE"; '
        f'echo "exiting {code}" >&2; exit {code}'
    )
    daemon.queues["default"] = {
        "command": ["/bin/sh", "-c", script],
        "max_attempts": 2,
        "backoff": [30],
    }
    daemon.write_config()
    daemon.start()
    mid = daemon.send(b"body for the command")
    wait_for(lambda: daemon.stats()["totals"][outcome] == 1, what=outcome)
    assert (daemon.out / f"{mid}.1.default").read_bytes() == b"body for the command"
    if outcome == "failed":
        error = json.loads((daemon.root / "spool/default/failed" / f"{mid}.error.json").read_text())
        assert error["exit_status"] == "exit status 65" and "exiting 65" in error["error"]
    if outcome == "retried":
        assert daemon.files("default", "defer")[0].startswith(f"{mid}@1@")


def test_timeout_kills_the_worker_dumps_the_stack_and_retries(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body", timeout=0.5, max_attempts=2, backoff=[0])
    daemon.start()
    mid = daemon.send(b"hang")
    wait_for(lambda: mid in daemon.files("default", "failed"), timeout=20, what="dead letter")
    error = json.loads((daemon.root / "spool/default/failed" / f"{mid}.error.json").read_text())
    assert error["error_type"] == "Timeout" and error["attempts"] == 2
    assert "by_body" in error["traceback"]  # the handler's stack, dumped before the kill
    stacks = daemon.events("timed-out handler's stack")
    assert len(stacks) == 2 and "by_body" in stacks[0]["traceback"]  # and in the log
    ran_past = lambda: [e for e in daemon.events("worker exited") if "ran past" in e["how"]]  # noqa: E731
    wait_for(lambda: len(ran_past()) == 2, what="both exits logged (after the file moved)")
    wait_for(lambda: daemon.stats()["totals"]["timed_out"] == 2, what="2 timeouts counted")
    other = daemon.send(b"ok")
    wait_for(lambda: other in daemon.succeeded(), what="the pool still serving")


def test_kill_9_of_a_worker_retries_its_message_and_replaces_it(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body", backoff=[0])
    daemon.daemon["workers"] = 1
    daemon.write_config()
    mid = send_and_await_start(daemon)
    (worker,) = daemon.workers()
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: daemon.workers() and daemon.workers() != [worker], what="a new worker")
    died = wait_for(lambda: daemon.events("worker exited"), what="the death logged")
    assert died[0]["how"] == "killed by signal SIGKILL"
    wait_for(lambda: f"{mid} 2" in (daemon.out / "started").read_text(), what="attempt 2")
    daemon.kill(signal.SIGQUIT)
    assert daemon.wait_exit() == 0
    assert daemon.files("default", "new")[0].startswith(f"{mid}@1")  # returned, attempt kept


def test_term_to_one_worker_stops_it_alone_and_the_master_replaces_it(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body")
    gate = daemon.out / "gate"
    mid = send_and_await_start(daemon, b"until:%s" % bytes(gate))
    (busy,) = wait_for(
        lambda: [w for w in daemon.workers() if " busy " in title(w)], what="the busy worker"
    )
    (other,) = [w for w in daemon.workers() if w != busy]
    os.kill(busy, signal.SIGTERM)
    gate.touch()  # the message in hand may finish
    exited = wait_for(lambda: daemon.events("worker exited"), what="the worker's exit")
    assert (exited[0]["pid"], exited[0]["how"]) == (busy, "exit status 0")  # a clean stop
    wait_for(lambda: len(daemon.workers()) == 2, what="a replacement")
    assert busy not in daemon.workers() and other in daemon.workers()
    assert daemon.succeeded() == [mid]  # the message in hand finished, not retried
    assert (daemon.out / "started").read_text() == f"{mid} 1\n"
    assert len(daemon.events("worker exited")) == 1 and daemon.proc.poll() is None


def test_a_message_that_kills_workers_ends_in_failed(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body", max_attempts=2, backoff=[0])
    daemon.start()
    mid = daemon.send(b"abort")
    wait_for(lambda: mid in daemon.files("default", "failed"), what="dead letter")
    error = json.loads((daemon.root / "spool/default/failed" / f"{mid}.error.json").read_text())
    assert error["error_type"] == "WorkerDied" and "SIGABRT" in error["error"]
    ok = daemon.send(b"ok")
    wait_for(lambda: ok in daemon.succeeded(), what="other messages keep flowing")


def test_kill_9_of_the_master_then_restart_recovers_everything(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body")
    daemon.start()
    ids = daemon.send_many([b"sleep:30", b"sleep:30"])
    wait_for(lambda: len(daemon.files("default", "cur")) == 2, what="both in flight")
    workers = daemon.workers()
    daemon.proc.kill()
    daemon.proc.wait()
    wait_for(
        lambda: not any(Path(f"/proc/{w}").exists() for w in workers),
        what="workers to die with the master",
    )
    assert sorted(daemon.files("default", "cur")) == sorted(ids)
    use(daemon, "handlers:record")
    daemon.start()
    wait_for(lambda: sorted(daemon.succeeded()) == sorted(ids), what="recovered and worked")
    assert_settled(daemon, ids)


def test_graceful_stop_finishes_in_flight_work(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body")
    mid = send_and_await_start(daemon, b"sleep:1")
    daemon.kill(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert daemon.succeeded() == [mid]
    assert_settled(daemon, [mid])


def test_grace_period_ends_with_messages_returned_untouched(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body")
    daemon.daemon["grace_period"] = 0.3
    daemon.write_config()
    mid = send_and_await_start(daemon)
    assert daemon.stop() == 0
    assert daemon.files("default", "new") == [mid]  # attempt not counted


def test_quit_returns_in_flight_messages_to_new(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body")
    mid = send_and_await_start(daemon)
    daemon.kill(signal.SIGQUIT)
    assert daemon.wait_exit() == 0
    assert daemon.files("default", "new") == [mid]


def test_second_term_while_draining_means_quit(daemon: Msgd) -> None:
    use(daemon, "handlers:by_body")
    mid = send_and_await_start(daemon)
    daemon.kill(signal.SIGTERM)
    wait_for(lambda: daemon.events("stopping"), what="draining")
    daemon.kill(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert daemon.files("default", "new") == [mid]


# -- burst and scale ------------------------------------------------------------------------------


def test_burst_mode_queue_waits_for_usr2_then_drains(daemon: Msgd) -> None:
    daemon.queues["nightly"] = {"handler": "handlers:record", "mode": "burst"}
    daemon.write_config()
    daemon.start()
    night = daemon.send_many([b"n"] * 20, queue="nightly")
    day = daemon.send(b"d")
    wait_for(lambda: daemon.succeeded() == [day], what="the continuous queue")
    assert sorted(daemon.files("nightly", "new")) == sorted(night)  # untouched until the burst
    done = daemon.msgctl("burst", "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "burst done: 20 succeeded, 0 retried, 0 failed"
    assert sorted(daemon.succeeded()) == sorted([day, *night])
    later = daemon.send(b"n", queue="nightly")
    assert daemon.msgctl("burst", "--wait").stdout.strip().startswith("burst done: 1 succeeded")
    assert later in daemon.succeeded()


def test_a_burst_reports_the_outcomes_counted_after_the_store_saw_them(daemon: Msgd) -> None:
    """A worker tells the store a message is done, then counts it: the burst is over once the
    stores say so, but its report waits for those counts (here each comes 0.3 s late)."""
    daemon.queues["nightly"] = {"handler": "slow_count:record", "mode": "burst"}
    daemon.write_config()
    daemon.start()
    daemon.send_many([b"n"] * 3, queue="nightly")
    done = daemon.msgctl("burst", "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "burst done: 3 succeeded, 0 retried, 0 failed"


def test_a_worker_started_during_a_burst_joins_it(daemon: Msgd) -> None:
    daemon.daemon["workers"] = 1
    daemon.queues["nightly"] = {"handler": "handlers:pid_after_a_while", "mode": "burst"}
    daemon.write_config()
    daemon.start()
    ids = daemon.send_many([b"n"] * 20, queue="nightly")  # 4 s of work: time for one more
    daemon.kill(signal.SIGUSR2)
    wait_for(lambda: daemon.generation("burst") == 1, what="the burst under way")
    assert daemon.msgctl("scale", "up").returncode == 0
    wait_for(lambda: sorted(daemon.succeeded()) == sorted(ids), what="the burst drained")
    pids = {line.split()[1] for line in (daemon.out / "pids").read_text().splitlines()}
    assert len(pids) == 2  # the worker added mid-burst worked burst messages too


def test_burst_reports_failures(daemon: Msgd) -> None:
    daemon.queues["nightly"] = {"handler": "handlers:by_body", "mode": "burst", "max_attempts": 1}
    daemon.write_config()
    daemon.start()
    daemon.send_many([b"ok", b"reject", b"ok"], queue="nightly")
    done = daemon.msgctl("burst", "--wait")
    assert done.stdout.strip() == "burst done: 2 succeeded, 0 retried, 1 failed"


def test_messages_are_worked_oldest_first(daemon: Msgd) -> None:
    daemon.daemon["workers"] = 0
    daemon.write_config()
    daemon.start()
    ids = [daemon.send(b"x") for _ in range(30)]  # one by one: each its own enqueue time
    assert ids == sorted(ids)
    # Out of the intake log into new/ (the master does that), then back into new/ in a shuffled
    # order, so that no directory order matches the enqueue order.
    wait_for(lambda: daemon.files("default", "new") == ids, what="the intake converted")
    spool = daemon.root / "spool" / "default"
    for mid in ids:
        os.rename(spool / "new" / mid, spool / "tmp" / mid)
    for mid in random.sample(ids, len(ids)):
        os.rename(spool / "tmp" / mid, spool / "new" / mid)
    assert daemon.msgctl("scale", "up").returncode == 0
    daemon.wait_processed(30)
    assert daemon.succeeded() == ids


SELECT_CALLS = {"x86_64": {23, 270}, "aarch64": {72}}  # select, pselect6
IN_MOVED_TO = 0x80


def inotify_watching(pid: int, directory: Path) -> int | None:
    """The descriptor of `pid` that is an inotify instance watching arrivals in `directory`."""
    ino = os.stat(directory).st_ino
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:  # a descriptor may close while we look
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("inotify "):  # inotify wd:1 ino:3b4c sdev:fd00001 mask:88 ...
                watch = dict(field.split(":", 1) for field in line.split()[1:])
                if int(watch["ino"], 16) == ino and int(watch["mask"], 16) & IN_MOVED_TO:
                    return int(fd)
    return None


def asleep_on(pid: int, fd: int) -> bool:
    """Whether a thread of `pid` is blocked in select() on `fd` with no timeout: it sleeps
    until `fd` (or another descriptor of the set) turns readable, however long that takes."""
    calls = SELECT_CALLS[os.uname().machine]
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:  # syscall: number, six arguments (hex), stack and instruction pointers
            nr, _, readfds, _, _, timeout = (
                Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()[:6]
            )
        except (OSError, ValueError):
            continue  # gone, or "running"
        if not nr.isdigit() or int(nr) not in calls or int(timeout, 16) != 0:
            continue
        with open(f"/proc/{pid}/mem", "rb") as mem:  # the fd_set the thread passed
            mem.seek(int(readfds, 16) + fd // 8)
            if mem.read(1)[0] & (1 << fd % 8):
                return True
    return False


def test_an_idle_worker_is_woken_by_inotify_not_a_poll(daemon: Msgd) -> None:
    """The worker sleeps in select() without a timeout on its inotify watch of new/: nothing
    but inotify can wake it, so a message sent then and worked proves inotify did."""
    if os.uname().machine not in SELECT_CALLS:
        pytest.skip(f"select's syscall numbers on {os.uname().machine} are not listed here")
    daemon.daemon["workers"] = 1
    daemon.write_config()
    daemon.start()
    (worker,) = wait_for(daemon.workers, what="the worker")
    new = daemon.root / "spool" / "default" / "new"
    fd = wait_for(lambda: inotify_watching(worker, new), what="an inotify watch on new/")
    wait_for(lambda: asleep_on(worker, fd), what="the worker asleep on it, with no timeout")
    mid = daemon.send(b"wake up")
    daemon.wait_processed(1)
    assert daemon.succeeded() == [mid] and daemon.workers() == [worker]


def test_threads_run_handlers_concurrently(daemon: Msgd) -> None:
    """One worker, four threads: each handler succeeds only once all four are running at the
    same time (handlers:together), so a worker that ran them one by one fails them all."""
    use(daemon, "handlers:together", threads=4)
    daemon.daemon["workers"] = 1
    daemon.write_config()
    daemon.start()
    ids = daemon.send_many([b"4"] * 4)
    wait_for(lambda: sorted(daemon.succeeded()) == sorted(ids), 15, "all 4 done together")
    assert not daemon.files("default", "defer") and not daemon.files("default", "failed")


def test_reload_changes_workers_and_handler_code_under_load(daemon: Msgd, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "handler_version.py").write_text("VERSION = 1\n")
    daemon.daemon["pythonpath"].append(str(code))
    use(daemon, "handlers:version")
    daemon.start()
    first = daemon.send_many([b"v"] * 300)
    # Replaced whole, and with another size: within the same second, a source of the same size
    # would pass Python's .pyc check (mtime in seconds, size) and the old bytecode would load.
    (code / "handler_version.py.tmp").write_text("VERSION = 2  # after the reload\n")
    (code / "handler_version.py.tmp").replace(code / "handler_version.py")
    daemon.daemon["workers"] = 3
    daemon.write_config()
    reload = daemon.msgctl("reload")
    assert reload.returncode == 0, reload.stderr
    wait_for(lambda: len(daemon.workers()) == 3, what="3 workers after the reload")
    second = daemon.send_many([b"v"] * 300)
    wait_for(lambda: len(daemon.succeeded()) >= 600, what="600 messages")
    assert_settled(daemon, first + second)
    versions = dict(line.split() for line in (daemon.out / "versions").read_text().splitlines())
    assert {versions[i] for i in second} == {"2"}  # new code, without a restart


def test_scale_up_and_down_under_load_loses_nothing(daemon: Msgd) -> None:
    daemon.start()
    ids = daemon.send_many([b"s"] * 500)
    for direction in ("up", "up", "down", "down", "down"):
        assert daemon.msgctl("scale", direction).returncode == 0
    ids += daemon.send_many([b"s"] * 500)
    wait_for(lambda: len(daemon.succeeded()) >= 1000, what="1000 messages")
    assert_settled(daemon, ids)
    wait_for(lambda: len(daemon.workers()) == 1, what="1 worker")


def test_foreign_producer_files_and_corrupt_entries(daemon: Msgd) -> None:
    """A program that writes tmp/ then renames into new/ is a producer; junk is quarantined."""
    daemon.start()
    spool = daemon.root / "spool" / "default"
    # Junk first: a mkdir wakes no worker (inotify watches renames and closed writes), the
    # rename after it does, and the listing that follows sees both.
    (spool / "new" / "a-directory").mkdir()
    (spool / "tmp" / "job-42").write_bytes(b"from a shell script")
    os.rename(spool / "tmp" / "job-42", spool / "new" / "job-42")
    wait_for(lambda: daemon.succeeded() == ["job-42"], what="the foreign message")
    wait_for(lambda: "a-directory" in daemon.files("default", "failed"), what="quarantine")
    ok = daemon.send(b"after the junk")
    wait_for(lambda: ok in daemon.succeeded(), what="still serving")
