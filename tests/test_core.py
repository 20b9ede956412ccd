"""The daemon core: config checking, life cycle, pidfile, the signal table, msgctl's verbs."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BIN, Msgd, alive, wait_for
from faultkit import title


def run_msgd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "msgd"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


# -- config ---------------------------------------------------------------------------------------


def test_check_accepts_a_valid_config(daemon: Msgd) -> None:
    done = run_msgd("-c", str(daemon.config_path), "--check")
    assert done.returncode == 0
    assert done.stdout.strip() == f"config OK: {daemon.config_path}"


def test_example_config_is_valid() -> None:
    example = Path(__file__).parent.parent / "examples" / "msgd.toml"
    done = run_msgd("-c", str(example), "--check")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"daemon": {"workers": "two"}}, "daemon.workers: Expected `int`, got `str`"),
        ({"daemon": {"wokers": 2}}, "daemon: Object contains unknown field `wokers`"),
        ({"daemon": {"log_format": "xml"}}, "daemon.log_format: Invalid enum value 'xml'"),
        ({"daemon": {"grace_period": -1}}, "daemon.grace_period: Expected `float` >= 0"),
        ({"daemon": {"worker_nice": 20}}, "daemon.worker_nice: Expected `int` <= 19"),
        ({"queues": {"default": {"threads": 0}}}, "queues.default.threads: Expected `int` >= 1"),
        (
            {"queues": {"default": {"handler": "nomodule_here:f"}}},
            "queues.default.handler: cannot import nomodule_here:f",
        ),
        (
            {"queues": {"default": {"handler": "handlers:absent"}}},
            "queues.default.handler: cannot import handlers:absent",
        ),
        (
            {"queues": {"default": {"handler": "not a spec"}}},
            "queues.default.handler: expected 'package.module:function'",
        ),
        ({"queues": {"../evil": {"handler": "handlers:record"}}}, "queues.../evil: bad queue name"),
        (
            {"queues": {"default": {"command": ["/no/such/program"], "handler": ""}}},
            "queues.default.command: /no/such/program: no such program",
        ),
        (
            {"queues": {"default": {"backend": "redis", "timeout": 60, "claim_idle": 30}}},
            "queues.default.claim_idle: must be longer than timeout (60 s)",
        ),
    ],
)
def test_check_names_the_bad_key(daemon: Msgd, change: dict, expected: str) -> None:
    for table, values in change.items():
        target = daemon.daemon if table == "daemon" else daemon.queues
        for key, value in values.items():
            if isinstance(value, dict) and key in target:
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    daemon.write_config()
    done = run_msgd("-c", str(daemon.config_path), "--check")
    assert done.returncode == 1
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_check_reports_syntax_errors_and_missing_files(daemon: Msgd, tmp_path: Path) -> None:
    daemon.write_config("[daemon\nworkers = 2\n")
    done = run_msgd("-c", str(daemon.config_path), "--check")
    assert done.returncode == 1 and "TOML syntax error" in done.stderr
    done = run_msgd("-c", str(tmp_path / "absent.toml"), "--check")
    assert done.returncode == 1 and "no such file" in done.stderr


def test_config_path_from_environment(daemon: Msgd) -> None:
    done = subprocess.run(
        [str(BIN / "msgd"), "--check"],
        capture_output=True,
        text=True,
        env={**os.environ, "MSGD_CONFIG": str(daemon.config_path)},
    )
    assert done.returncode == 0 and str(daemon.config_path) in done.stdout


def test_relative_paths_resolve_against_the_config_file(daemon: Msgd) -> None:
    daemon.start()
    assert daemon.pidfile.exists()
    assert (daemon.root / "spool" / "default" / "new").is_dir()
    assert (daemon.root / "run" / "stats.json").exists()


# -- life cycle -----------------------------------------------------------------------------------


def test_start_and_graceful_stop(daemon: Msgd) -> None:
    daemon.start()
    pid = daemon.pid
    assert pid == daemon.proc.pid
    assert daemon.state()["pid"] == pid
    assert [e["event"] for e in daemon.events()][:1] == ["started"]
    assert daemon.stop() == 0
    names = [e["event"] for e in daemon.events()]
    assert names[-1] == "stopped" and "stopping" in names
    assert not daemon.pidfile.exists() and not daemon.state_file.exists()
    assert daemon.msgctl("status").returncode == 3


def test_interrupt_stops_gracefully(daemon: Msgd) -> None:
    daemon.start()
    daemon.kill(signal.SIGINT)
    assert daemon.wait_exit() == 0


def test_quit_stops_at_once(daemon: Msgd) -> None:
    daemon.start()
    daemon.kill(signal.SIGQUIT)
    assert daemon.wait_exit() == 0
    assert [e for e in daemon.events("stopping") if e["mode"] == "now"]


def test_second_instance_is_refused(daemon: Msgd) -> None:
    daemon.start()
    done = run_msgd("-c", str(daemon.config_path))
    assert done.returncode == 1
    assert f"already running (pid {daemon.pid})" in done.stderr


def test_stale_pidfile_is_taken_over(daemon: Msgd) -> None:
    daemon.pidfile.parent.mkdir(parents=True, exist_ok=True)
    daemon.pidfile.write_text("999999\n")
    daemon.state_file.write_text('{"pid": 999999}')  # a killed daemon leaves both
    daemon.start()
    assert daemon.pid == daemon.proc.pid
    warnings = daemon.events("stale pidfile taken over")
    assert warnings and warnings[0]["stale_pid"] == 999999


def test_symlink_at_pidfile_is_refused(daemon: Msgd, tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep me\n")
    daemon.pidfile.parent.mkdir(parents=True, exist_ok=True)
    daemon.pidfile.symlink_to(target)
    daemon.start(wait=False)
    assert daemon.wait_exit() == 1
    assert "msgd: " in daemon.stderr() and "Traceback" not in daemon.stderr()
    assert target.read_text() == "keep me\n"


def test_process_titles(daemon: Msgd) -> None:
    daemon.start()
    cmdline = Path(f"/proc/{daemon.pid}/cmdline").read_bytes().decode()
    assert cmdline.startswith(f"msgd: master -c {daemon.config_path}")
    workers = wait_for(daemon.workers, what="workers")
    titles = [Path(f"/proc/{w}/cmdline").read_bytes().decode() for w in workers]
    wait_for(
        lambda: all(
            Path(f"/proc/{w}/cmdline").read_bytes().decode().startswith("msgd: worker ")
            for w in workers
        ),
        what=f"worker titles, got {titles}",
    )


def test_daemon_mode_detaches_and_msgctl_stops_it(daemon: Msgd) -> None:
    done = subprocess.run(
        [str(BIN / "msgd"), "-c", str(daemon.config_path), "--daemon"],
        capture_output=True,
        text=True,
        timeout=30,
        env=daemon.env(),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    pid = daemon.pid  # ready means the pidfile and state file are there already
    try:
        assert daemon.state()["pid"] == pid
        assert os.getsid(pid) != os.getsid(0)  # a session of its own: detached from ours
        daemon.send(b"hello")
        wait_for(lambda: len(daemon.succeeded()) == 1, what="message worked by the detached daemon")
        again = subprocess.run(
            [str(BIN / "msgd"), "-c", str(daemon.config_path), "-D"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert again.returncode == 1 and f"already running (pid {pid})" in again.stderr
        stop = daemon.msgctl("stop")
        assert stop.returncode == 0, stop.stderr
        assert not alive(pid)
    finally:  # a failed assertion must not leave a detached daemon behind
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_daemon_mode_reports_a_start_error_of_the_detached_daemon(daemon: Msgd) -> None:
    """The spool is made only once detached (the config itself is valid): the error comes back
    to the command as its one line, with exit 1, and no daemon is left running."""
    (daemon.root / "spool").write_text("a file where the spool directory must go")
    assert run_msgd("-c", str(daemon.config_path), "--check").returncode == 0
    done = run_msgd("-c", str(daemon.config_path), "--daemon")
    assert done.returncode == 1
    assert done.stderr.startswith("msgd: daemon.spool: ") and done.stderr.count("\n") == 1, done
    assert daemon.msgctl("status").returncode != 0  # nobody holds the pidfile's lock


# -- signals and acknowledgements -----------------------------------------------------------------


def test_usr1_dumps_stats_once(daemon: Msgd) -> None:
    daemon.start()
    sent = time.monotonic()
    daemon.kill(signal.SIGUSR1)
    wait_for(lambda: daemon.generation("stats") == 1, what="stats ack")
    events = daemon.events("stats")
    assert len(events) == 1 and events[0]["generation"] == 1
    assert daemon.stats()["generation"] == 1
    # When the task woke, on the clock every process shares: after the kill, before the ack.
    assert sent < daemon.state()["last"]["stats"]["began_monotonic"] < time.monotonic()


NICE_AT_IMPORT = """import os
with open(os.path.join(os.path.dirname(__file__), "nice.%d" % os.getpid()), "w") as f:
    f.write(str(os.nice(0)))
from handlers import record
"""


def test_workers_run_nicer_than_the_master_and_a_reload_changes_it(
    daemon: Msgd, tmp_path: Path
) -> None:
    """`worker_nice`: the master outranks its workers, so its signals act at once under load;
    but a worker imports its handlers at the master's priority, since a reload waits for that."""
    (tmp_path / "nice_at_import.py").write_text(NICE_AT_IMPORT)
    daemon.daemon["pythonpath"] = [str(tmp_path), *daemon.daemon["pythonpath"]]
    daemon.queues["default"] = {"handler": "nice_at_import:record"}
    daemon.write_config()
    daemon.start()
    master = os.getpriority(os.PRIO_PROCESS, daemon.pid)

    def nice_of_workers() -> list[int]:
        return [os.getpriority(os.PRIO_PROCESS, pid) for pid in daemon.workers()]

    default = [min(master + 5, 19)] * 2
    wait_for(lambda: nice_of_workers() == default, what="the workers at nice +5 (the default)")
    imported_at = {int(p.read_text()) for p in tmp_path.glob("nice.*")}
    assert imported_at == {master}, imported_at
    daemon.daemon["worker_nice"] = 0
    daemon.write_config()
    assert daemon.msgctl("reload").returncode == 0
    wait_for(lambda: nice_of_workers() == [master] * 2, what="the new workers at the master's")
    assert os.getpriority(os.PRIO_PROCESS, daemon.pid) == master


def test_hup_reloads_and_a_bad_config_keeps_the_old_one(daemon: Msgd) -> None:
    daemon.start()
    daemon.kill(signal.SIGHUP)
    wait_for(lambda: daemon.generation("reload") == 1, what="reload ack")
    assert daemon.state()["last"]["reload"]["outcome"] == "ok"
    daemon.write_config("[daemon]\nworkers = 'many'\n")
    daemon.kill(signal.SIGHUP)
    wait_for(lambda: daemon.generation("reload") == 2, what="second reload ack")
    last = daemon.state()["last"]["reload"]
    assert last["outcome"] == "rejected" and "Expected `int`" in last["error"]
    rejected = [e for e in daemon.events("reload") if e.get("outcome") == "rejected"]
    assert len(rejected) == 1
    daemon.store().send_many([b"still serving"])  # the file is broken: write the spool
    wait_for(lambda: len(daemon.succeeded()) == 1, what="the old config to keep working")


EXITS_AT_IMPORT = """import sys
sys.exit(3)
"""


def test_a_reload_whose_new_workers_cannot_load_keeps_the_old_workers(
    daemon: Msgd, tmp_path: Path
) -> None:
    """The reload's handler check is its first new worker's import: when it fails (here
    sys.exit at import), it is killed before claiming anything and the same old workers serve
    on."""
    (tmp_path / "exits.py").write_text(EXITS_AT_IMPORT)
    daemon.daemon["pythonpath"] = [str(tmp_path)]
    daemon.start()
    wait_for(lambda: len(daemon.workers()) == 2, what="two workers")
    serving = sorted(daemon.workers())
    daemon.queues["default"] = {"handler": "exits:handle"}
    daemon.write_config()
    daemon.kill(signal.SIGHUP)
    wait_for(lambda: daemon.generation("reload") == 1, what="the reload's answer")
    last = daemon.state()["last"]["reload"]
    assert last["outcome"] == "rejected", last
    assert "importing handlers: SystemExit(3)" in last["error"], last
    wait_for(lambda: sorted(daemon.workers()) == serving, what="only the old workers left")
    ids = daemon.store().send_many([b"a", b"b", b"c"])
    wait_for(lambda: sorted(daemon.succeeded()) == sorted(ids), what="the old handler's runs")
    assert not daemon.files("default", "failed"), "a new worker claimed a message"


def test_a_reload_whose_new_workers_import_too_long_is_rejected(daemon: Msgd) -> None:
    """A reload's first new worker whose import outlives `import_timeout` (here it would last
    until the test releases it, which it never does) is killed, the reload is rejected with the
    limit in its error, and the old workers serve on."""
    daemon.daemon["import_timeout"] = 1.0
    daemon.start()
    wait_for(lambda: len(daemon.workers()) == 2, what="two workers")
    serving = sorted(daemon.workers())
    daemon.queues["default"] = {"handler": "slow_import:record"}
    daemon.write_config()
    (daemon.out / "slow").touch()
    daemon.kill(signal.SIGHUP)
    wait_for(lambda: (daemon.out / "importing").exists(), what="a new worker's import under way")
    stuck = int((daemon.out / "importing").read_text())
    wait_for(lambda: daemon.generation("reload") == 1, what="the reload's answer")
    last = daemon.state()["last"]["reload"]
    assert last["outcome"] == "rejected", last
    assert last["error"] == "queues: importing the handlers took over 1s", last
    wait_for(lambda: sorted(daemon.workers()) == serving, what="only the old workers left")
    assert stuck not in daemon.workers()
    ids = daemon.store().send_many([b"a", b"b"])
    wait_for(lambda: sorted(daemon.succeeded()) == sorted(ids), what="the old handler's runs")


IMPORTS_ONCE = """import os, sys
_marker = os.path.join(os.path.dirname(__file__), "imported")
if os.path.exists(_marker):
    sys.exit(4)
open(_marker, "w").close()
from handlers import record as handle  # noqa: E402,F401
"""


def test_a_new_worker_failing_after_the_reloads_check_is_a_death_like_any_other(
    daemon: Msgd, tmp_path: Path
) -> None:
    """The reload's check is one new worker's import; the rest of the generation is forked once
    it passed. One of them failing its import (here: every import after the first) is a worker
    death: logged as a warning and respawned with backoff, while the reload stands and the
    worker that passed serves."""
    (tmp_path / "imports_once.py").write_text(IMPORTS_ONCE)
    daemon.daemon["pythonpath"] = [str(tmp_path), *daemon.daemon["pythonpath"]]
    daemon.start()
    daemon.queues["default"] = {"handler": "imports_once:handle"}
    daemon.write_config()
    daemon.kill(signal.SIGHUP)
    wait_for(lambda: daemon.generation("reload") == 1, what="the reload's answer")
    assert daemon.state()["last"]["reload"]["outcome"] == "ok"
    died = lambda: [  # noqa: E731
        e for e in daemon.events("worker exited")
        if e["level"] == "warning" and e["how"] == "exit status 1"
    ]  # fmt: skip
    wait_for(lambda: len(died()) >= 2, what="a failing new worker, respawned and failing again")
    ids = daemon.store().send_many([b"a", b"b", b"c"])
    wait_for(lambda: sorted(daemon.succeeded()) == sorted(ids), what="the checked worker's runs")


def test_a_reload_keeps_the_stores_of_unchanged_queues(daemon: Msgd) -> None:
    """A reload reopens (and closes the old store of) only the queues whose settings changed,
    or all of them when a [daemon] key did: an unchanged queue keeps its connections, and a HUP
    after a log rotation closes nothing."""
    from msgd.config import load
    from msgd.master import open_stores, reopen_stores

    daemon.queues["other"] = {"handler": "handlers:record"}
    daemon.write_config()
    old = load(str(daemon.config_path))
    stores = open_stores(old)
    same, closing = reopen_stores(old, load(str(daemon.config_path)), stores)
    assert same == stores and all(same[n] is stores[n] for n in stores) and closing == {}
    daemon.queues["other"]["max_attempts"] = 9
    daemon.queues["third"] = {"handler": "handlers:record"}
    del daemon.queues["default"]
    daemon.write_config()
    changed, closing = reopen_stores(old, load(str(daemon.config_path)), stores)
    assert sorted(changed) == ["other", "third"] and changed["other"] is not stores["other"]
    assert closing == stores
    daemon.daemon["grace_period"] = 5.0
    daemon.write_config()
    config = load(str(daemon.config_path))
    _, closing = reopen_stores(config, load(str(daemon.config_path)), changed)
    assert closing == {}
    daemon.daemon["grace_period"] = 6.0
    daemon.write_config()
    _, closing = reopen_stores(config, load(str(daemon.config_path)), changed)
    assert closing == changed


def test_msgctl_reload_refuses_a_bad_config_and_reports_rejections(daemon: Msgd) -> None:
    daemon.start()
    ok = daemon.msgctl("reload")
    assert ok.returncode == 0 and "reloaded" in ok.stdout
    daemon.queues["default"]["threads"] = 0
    daemon.write_config()
    bad = daemon.msgctl("reload")
    assert bad.returncode == 1
    assert "queues.default.threads" in bad.stderr
    assert daemon.generation("reload") == 1  # msgctl did not signal
    # A config that is valid for msgctl but not for the daemon: pidfile may not change live.
    daemon.queues["default"]["threads"] = 1
    daemon.daemon["pidfile"] = "run/other.pid"
    daemon.write_config()
    rejected = daemon.msgctl("--pidfile", str(daemon.pidfile), "reload")
    assert rejected.returncode == 1
    assert "reload rejected: daemon.pidfile: cannot change on reload" in rejected.stderr


def test_ttin_ttou_scale_the_pool(daemon: Msgd) -> None:
    daemon.start()
    wait_for(lambda: len(daemon.workers()) == 2, what="2 workers")
    daemon.kill(signal.SIGTTIN)
    wait_for(lambda: len(daemon.workers()) == 3, what="3 workers")
    assert daemon.msgctl("scale", "down").stdout.strip() == "workers: 2"
    wait_for(lambda: len(daemon.workers()) == 2, what="back to 2 workers")
    assert [e["workers"] for e in daemon.events("scale")] == [3, 2]


def test_signal_storm_never_loses_the_hup(daemon: Msgd) -> None:
    """10,000 USR1 with one HUP in the middle: the reload happens."""
    daemon.start()
    pid = daemon.pid
    for i in range(10_000):
        os.kill(pid, signal.SIGHUP if i == 5_000 else signal.SIGUSR1)
    wait_for(lambda: daemon.generation("reload") == 1, what="the HUP sent mid-storm")
    gen = wait_for(lambda: daemon.generation("stats"), what="the coalesced USR1s to dump stats")
    daemon.kill(signal.SIGUSR1)  # and a signal after the storm still runs its action
    wait_for(lambda: daemon.generation("stats") > gen, what="stats after the storm")
    assert daemon.proc.poll() is None


GATED = """# A handler whose import waits at a numbered gate once the gate exists (reload checks).
import os, time
from pathlib import Path

GATE = Path(os.environ["MSGD_TEST_OUT"]) / "gate"
if GATE.is_dir():
    N = len(list(GATE.glob("arrived.*"))) + 1
    (GATE / f"arrived.{N}").touch()
    while not (GATE / f"open.{N}").exists():
        time.sleep(0.005)


def handle(message):
    pass
"""


def test_signals_during_an_action_make_exactly_one_more_run(daemon: Msgd, tmp_path: Path) -> None:
    """50 HUPs that arrive while a reload runs make exactly one more reload: not none, not one
    each. Each reload's handler check (its one new worker's import) is held at a gate until the
    test opens it."""
    (tmp_path / "gated.py").write_text(GATED)
    daemon.daemon["pythonpath"] = [str(tmp_path)]
    daemon.daemon["workers"] = 1
    daemon.queues["default"] = {"handler": "gated:handle"}
    daemon.write_config()
    daemon.start()
    wait_for(lambda: any(" idle" in title(p) for p in daemon.workers()), what="the first import")
    gate = daemon.out / "gate"
    gate.mkdir()
    daemon.kill(signal.SIGHUP)
    wait_for((gate / "arrived.1").exists, what="the first reload held at the gate")
    for _ in range(50):
        daemon.kill(signal.SIGHUP)
    (gate / "open.1").touch()
    wait_for((gate / "arrived.2").exists, what="one more reload")
    (gate / "open.2").touch()
    wait_for(lambda: daemon.generation("reload") == 2, what="both reloads acknowledged")
    # One more HUP: a third reload must be its doing, so it begins after it was sent (a third
    # run owed to the storm would have begun as soon as the second ended).
    sent = time.monotonic()
    daemon.kill(signal.SIGHUP)
    wait_for((gate / "arrived.3").exists, what="the reload of the last HUP")
    (gate / "open.3").touch()
    wait_for(lambda: daemon.generation("reload") == 3, what="the third reload acknowledged")
    assert daemon.state()["last"]["reload"]["began_monotonic"] > sent, "a run nobody asked for"
    assert not (gate / "arrived.4").exists()


def test_hundred_hups_leave_a_coherent_daemon(daemon: Msgd) -> None:
    daemon.start()
    for _ in range(100):
        daemon.kill(signal.SIGHUP)
    wait_for(lambda: daemon.generation("reload") >= 1, what="reloads")
    ok = daemon.msgctl("reload")  # the daemon still acknowledges, and serves
    assert ok.returncode == 0, ok.stderr
    wait_for(lambda: len(daemon.workers()) == 2, what="the pool settled at 2 workers")
    ids = daemon.send_many([b"a"] * 20)
    wait_for(lambda: sorted(daemon.succeeded()) == sorted(ids), what="messages after the HUPs")


def test_log_file_is_reopened_on_hup(daemon: Msgd) -> None:
    daemon.start()
    log = daemon.root / "msgd.log"
    log.rename(daemon.root / "msgd.log.1")
    daemon.kill(signal.SIGHUP)
    wait_for(lambda: log.exists() and daemon.events("reload"), what="a fresh log with the reload")


# -- msgctl ---------------------------------------------------------------------------------------


def test_msgctl_status_pid_and_exit_codes(daemon: Msgd) -> None:
    assert daemon.msgctl("status").returncode == 3
    assert daemon.msgctl("pid").returncode == 3
    daemon.start()
    status = daemon.msgctl("status")
    assert status.returncode == 0 and f"pid {daemon.pid}" in status.stdout
    assert daemon.msgctl("pid").stdout.strip() == str(daemon.pid)
    usage = daemon.msgctl("frobnicate")
    assert usage.returncode == 2


def test_msgctl_status_is_1_when_the_daemon_died_and_left_its_pidfile(daemon: Msgd) -> None:
    daemon.start()
    pid = daemon.pid
    daemon.proc.kill()  # kill -9: no clean-up, the pidfile stays behind (unlocked)
    daemon.wait_exit()
    status = daemon.msgctl("status")
    assert status.returncode == 1
    said = status.stdout + status.stderr
    assert "stale pidfile" in said and f"pid {pid}" in said, said


def test_msgctl_finds_the_daemon_while_the_config_is_broken(daemon: Msgd) -> None:
    daemon.start()
    daemon.write_config(daemon.config_path.read_text() + "\nnonsense = [\n")
    assert daemon.msgctl("status").returncode == 0
    stats = daemon.msgctl("stats")
    assert stats.returncode == 0, stats.stderr
    assert daemon.msgctl("reload").returncode == 1
    assert daemon.msgctl("check").returncode == 1
    assert daemon.msgctl("stop").returncode == 0


def test_msgctl_never_signals_a_process_that_is_not_msgd(daemon: Msgd) -> None:
    victim = subprocess.Popen(["sleep", "60"])
    try:
        daemon.pidfile.parent.mkdir(parents=True, exist_ok=True)
        daemon.pidfile.write_text(f"{victim.pid}\n")
        stale = daemon.msgctl("stop")  # unlocked pidfile naming a live, unrelated process
        assert stale.returncode == 1 and "stale pidfile" in stale.stderr
        # Now the pidfile is locked, but by a process that is not msgd.
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl,sys,time\n"
                f"f=open({str(daemon.pidfile)!r});fcntl.flock(f,fcntl.LOCK_EX);print('x',flush=True)\n"
                "time.sleep(60)",
            ],
            stdout=subprocess.PIPE,
        )
        assert holder.stdout.readline() == b"x\n"
        daemon.pidfile.write_text(f"{holder.pid}\n")
        refused = daemon.msgctl("stop")
        assert refused.returncode == 1 and "not msgd" in refused.stderr
        # A main pid vouched for (as systemd does) stands in only for a name /proc hides.
        vouched = daemon.msgctl("--main-pid", str(holder.pid), "stop")
        assert vouched.returncode == 1 and "not msgd" in vouched.stderr
        daemon.pidfile.write_text(f"{victim.pid}\n")
        refused = daemon.msgctl("stop")
        assert refused.returncode == 1 and "holds its lock" in refused.stderr
        assert victim.poll() is None and holder.poll() is None
        holder.kill()
    finally:
        victim.kill()


def test_msgctl_stop_waits_for_exit(daemon: Msgd) -> None:
    daemon.start()
    pid = daemon.pid
    done = daemon.msgctl("stop")
    assert done.returncode == 0 and f"stopped (pid {pid})" in done.stdout
    assert daemon.proc.poll() == 0


def test_msgctl_stop_now_returns_in_flight_messages_untouched(daemon: Msgd) -> None:
    daemon.queues["default"] = {"handler": "handlers:by_body"}
    daemon.write_config()
    daemon.start()
    pid = daemon.pid
    mid = daemon.send(b"sleep:30")
    wait_for((daemon.out / "started").exists, what="the message started")
    done = daemon.msgctl("stop", "--now")
    assert done.returncode == 0 and f"stopped (pid {pid})" in done.stdout, done
    assert daemon.proc.poll() == 0
    assert [e["mode"] for e in daemon.events("stopping")] == ["now"]
    assert daemon.files("default", "new") == [mid]  # back, its attempt not counted


def test_root_without_user_is_refused(daemon: Msgd) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    daemon.daemon["allow_root"] = False
    daemon.write_config()
    daemon.start(wait=False)
    assert daemon.wait_exit() == 1
    assert "refusing to run as root" in daemon.stderr()


def test_state_file_is_valid_json_throughout(daemon: Msgd) -> None:
    daemon.start()
    files = (daemon.state_file, daemon.root / "run/stats.json")
    readers = [open(p, "rb") for p in files]  # noqa: SIM115 - readers caught mid-read
    seen = [r.read() for r in readers]
    for _ in range(20):
        daemon.kill(signal.SIGUSR1)
        json.loads(daemon.state_file.read_text())
    wait_for(lambda: daemon.generation("stats") >= 1, what="stats ack")
    # Atomic rewrites: each one is a new file renamed into place, so a reader that opened the
    # old one still reads it whole, never a truncated or half-written file.
    for path, reader, old in zip(files, readers, seen, strict=True):
        with reader:
            assert os.fstat(reader.fileno()).st_ino != os.stat(path).st_ino, f"{path} in place"
            reader.seek(0)
            assert reader.read() == old and json.loads(old)


def test_pidfile_lock_is_held(daemon: Msgd) -> None:
    daemon.start()
    with open(daemon.pidfile) as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_handler_import_that_hangs_is_a_config_error(daemon: Msgd, tmp_path: Path) -> None:
    """The import check runs in a forked child with a deadline (`import_timeout`): neither
    `msgctl check` (nor a reload it precedes) nor a start can hang on it."""
    (tmp_path / "stuck.py").write_text("import time\nwhile True:\n    time.sleep(1)\n")
    daemon.daemon["pythonpath"] = [str(tmp_path)]
    daemon.queues["default"] = {"handler": "stuck:run"}
    daemon.daemon["import_timeout"] = 0.5
    daemon.write_config()
    checked = daemon.msgctl("check")
    assert checked.returncode == 1
    assert checked.stderr == "msgctl: queues: importing the handlers took over 0.5s\n"


def test_a_failing_action_is_reported_and_the_next_signal_runs_it_again(daemon: Msgd) -> None:
    """An action that raises (here: the stats file cannot be replaced, a directory is in its
    way) is logged once with its traceback, recorded as an error in the state file, and makes
    msgctl exit 1 with the reason; it neither hangs msgctl nor ends the action's task."""
    daemon.start()
    stats_file = daemon.root / "run/stats.json"
    stats_file.unlink()
    stats_file.mkdir()
    failed = daemon.msgctl("stats")
    assert failed.returncode == 1
    assert failed.stderr.startswith("msgctl: stats failed in msgd: ") and "Is a directory" in (
        failed.stderr
    ), failed.stderr
    assert daemon.state()["last"]["stats"]["outcome"] == "error"
    [event] = wait_for(lambda: daemon.events("action failed"), what="the failure logged")
    assert event["action"] == "stats" and "IsADirectoryError" in event["exception"]
    stats_file.rmdir()
    again = daemon.msgctl("stats", "--json")
    assert again.returncode == 0, again.stderr
    assert daemon.state()["last"]["stats"]["outcome"] == "ok"
    assert daemon.stop() == 0
