"""Security: nothing escapes the spool, files are private, privileges drop, nothing is interpreted.

test_core.py already covers: a symlink at the pidfile, msgctl refusing an unlocked pidfile that
names a live process and a lock held by a non-msgd process, root without a user refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import msgd
import pytest
from conftest import TESTS, Msgd, alive, spool_store, wait_for
from faultkit import Tally, tmpfs, uid_of, world_dir
from msgd.config import ConfigError
from msgd.spool import SpoolError, check_name

EVIL = [
    "../x",
    "../../etc/passwd",
    "/etc/passwd",
    "a/b",
    ".",
    "..",
    ".hidden",
    "a\0b",
    "x" * 300,
    "",
]


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# -- names never escape the spool -----------------------------------------------------------------


@pytest.mark.parametrize("name", EVIL, ids=range(len(EVIL)))
def test_queue_names_and_ids_cannot_escape(tmp_path: Path, name: str) -> None:
    root = tmp_path / "spool"
    with pytest.raises(SpoolError):
        spool_store(root, name).send_many([b"x"])
    with pytest.raises(SpoolError):
        spool_store(root, "q").retry_failed([name])
    if name not in (".hidden",):  # a dot name is refused as an id, allowed nowhere as a queue
        with pytest.raises(SpoolError):
            check_name(name)
    outside = {p.name for p in tmp_path.iterdir()}
    assert outside <= {"spool"}, outside
    assert not Path("/etc/passwd.new").exists()


def test_msgctl_and_the_library_refuse_escaping_names(daemon: Msgd) -> None:
    daemon.start()
    for name in ("../x", "/etc", "a/b"):
        sent = daemon.msgctl("send", "-q", name, input=b"x")
        assert sent.returncode == 1 and "no queue" in sent.stderr, sent.stderr
        with pytest.raises(ConfigError):
            msgd.send(b"x", queue=name, config=str(daemon.config_path))
        retry = daemon.msgctl("retry-failed", "default", name)
        assert retry.returncode == 1 and "bad message id" in retry.stderr, retry.stderr
    assert sorted(p.name for p in (daemon.root / "spool").iterdir()) == [".msgd", "default"]


# -- private files -----------------------------------------------------------------------------


def test_a_first_batch_makes_its_queue_and_a_planted_link_is_refused(tmp_path: Path) -> None:
    """A producer makes a new queue's directories (0700) on its first batch; a symbolic link
    planted at a queue's tmp/ is refused, and nothing is written where it points."""
    spool, elsewhere = tmp_path / "spool", tmp_path / "elsewhere"
    store = spool_store(spool, "fresh")
    ids = store.send_many([b"a", b"b"])
    assert sorted(os.listdir(store.new)) == sorted(ids)
    assert stat.S_IMODE(os.stat(store.tmp).st_mode) == 0o700
    elsewhere.mkdir()
    (spool / "planted").mkdir(mode=0o700)
    (spool / "planted" / "tmp").symlink_to(elsewhere)
    with pytest.raises(OSError, match="is a symbolic link"):
        spool_store(spool, "planted").send_many([b"c", b"d"])
    assert not list(elsewhere.iterdir())


def test_files_are_0600_and_directories_0700_by_default(daemon: Msgd) -> None:
    old = os.umask(0o022)  # the usual umask: msgd's own modes must not depend on it
    try:
        daemon.queues["default"] = {"handler": "handlers:by_body"}
        daemon.write_config()
        daemon.start()
        ids = daemon.send_many([b"reject", b"ok"])
        wait_for(lambda: daemon.files("default", "failed"), what="the dead letter")
        wait_for(lambda: ids[1] in daemon.succeeded(), what="the success")
        for _ in range(2):  # msgctl waits for each: two raw TTOUs may coalesce into one
            assert daemon.msgctl("scale", "down").returncode == 0
        wait_for(lambda: not daemon.workers(), what="no workers")
        # The master removes a retired worker's ack file just after reaping it.
        wait_for(lambda: len(daemon.events("worker exited")) == 2, what="both retirements")
        waiting = daemon.send(b"ok")
    finally:
        os.umask(old)
    spool = daemon.root / "spool"
    converted = spool / "default" / "new" / waiting  # from the intake log, by the master
    wait_for(converted.exists, what="the intake to convert the waiting message")
    dirs = [spool, *(p for p in spool.rglob("*") if p.is_dir())]
    assert {str(d.relative_to(daemon.root)): oct(mode(d)) for d in dirs if mode(d) != 0o700} == {}
    files = [p for p in spool.rglob("*") if p.is_file()]
    assert converted in files and spool / "default" / "intake" / "log" in files
    assert (spool / "default" / "failed" / f"{ids[0]}.error.json") in files
    assert any(p.name.startswith("dump.") for p in files)  # the workers' traceback files
    assert {str(p.relative_to(spool)): oct(mode(p)) for p in files if mode(p) != 0o600} == {}
    # The run directory (pidfile, state and stats files, rewritten every second) and the log.
    run = daemon.root / "run"
    assert oct(mode(run)) == oct(0o700)
    made = {p.name: oct(mode(p)) for p in [*run.iterdir(), daemon.root / "msgd.log"]}
    assert made == dict.fromkeys(["msgd.pid", "msgd.state", "stats.json", "msgd.log"], oct(0o600))


def test_privileges_drop_to_the_configured_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    root = world_dir()
    try:
        d = Msgd(root)
        # The test sends as root: files another user's producer writes must be readable to the
        # daemon user (file_mode); the daemon itself never runs the interpreter anew after the
        # drop, so an interpreter only root can read is fine.
        d.daemon.update(user="nobody", group="nogroup", allow_root=False, file_mode=0o644)
        # Handler code must be readable to the daemon user: wherever this checkout lives (a 0700
        # temporary directory, say), give it a copy it can import.
        code = root / "code"
        code.mkdir(mode=0o755)
        shutil.copy(TESTS / "handlers.py", code / "handlers.py")
        (code / "handlers.py").chmod(0o644)
        d.daemon["pythonpath"] = [str(code)]
        d.queues["default"] = {"handler": "handlers:by_body"}
        d.write_config()
        (root / "out").chmod(0o777)  # the test handlers report here, as nobody
        for sub in ("run", "spool"):  # what tmpfiles.d would make: the daemon user's directories
            (root / sub).mkdir(mode=0o700)
            os.chown(root / sub, 65534, 65534)
        d.start()
        nobody = (65534, 65534, "")
        assert uid_of(d.proc.pid) == nobody
        workers = wait_for(lambda: len(d.workers()) == 2 and d.workers(), what="workers")
        assert all(uid_of(w) == nobody for w in workers)
        # Opened as root before the drop, then handed over: the pidfile (msgd removes it at the
        # end) and the log file (a HUP reopens it).
        assert os.stat(d.pidfile).st_uid == 65534 and d.pid == d.proc.pid
        assert os.stat(root / "msgd.log").st_uid == 65534 and d.events("started")
        spool = root / "spool"
        assert os.stat(spool).st_uid == 65534 and mode(spool) == 0o700
        # A message file nobody may read (a root-owned 0600 file): quarantined, not a crash.
        # Made 0600 before it appears in new/: a worker must never see it readable.
        staged = spool / "default" / "tmp" / "secret00000000000000001"
        staged.write_bytes(b"root only")
        staged.chmod(0o600)
        secret = staged.rename(spool / "default" / "new" / staged.name)
        tally = Tally(d)
        tally.add([secret.name], fail=True)
        tally.add(d.send_many([b"ok"] * 10))
        tally.add([d.send(b"ok")])  # root's record in the intake log nobody made, and converts
        wait_for(tally.settled, 15, "messages worked as nobody")
        record = json.loads(
            (spool / "default" / "failed" / f"{secret.name}.error.json").read_text()
        )
        assert record["error_type"] == "PermissionError"
        stats = d.msgctl("stats")
        assert stats.returncode == 0, stats.stderr
        reload = d.msgctl("reload")
        assert reload.returncode == 0, reload.stderr
        assert d.stop() == 0
        assert not d.pidfile.exists()
        tally.check("privileges dropped to nobody (unreadable file)", 1)
    finally:
        if "d" in locals():
            d.cleanup()
        shutil.rmtree(root, ignore_errors=True)


# -- nothing is interpreted ----------------------------------------------------------------------


BAIT = [
    b"$(touch PWNED1)",
    b"`touch PWNED2`",
    b"; touch PWNED3 #",
    b"' \" && touch PWNED4",
    b"%s%s%n %(x)s {0} {__class__}",
    b"\x00\xff\n-rf /",
]


ARG_BAIT = ["$(touch PWNED7)", "`touch PWNED8`", "; touch PWNED9 #", "' \" | touch PWNED0", "*"]


def test_command_handlers_get_the_body_on_stdin_never_a_shell(
    daemon: Msgd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configured argv is executed as it is, the body goes to stdin: no bait in either one
    reaches a shell. (The program here is a shell the config names: its script quotes "$@".)"""
    bodies = daemon.out / "bodies"
    script = 'cat >> "$0" && printf "%s\\n" "$@" > "$0.argv"'
    daemon.queues["default"] = {
        "command": ["sh", "-c", script, str(bodies), *ARG_BAIT],
        "handler": "",
        "max_attempts": 1,
    }
    daemon.write_config()
    monkeypatch.chdir(daemon.root)  # where a shell's `touch` would land
    daemon.start()
    ids = daemon.send_many(BAIT)
    wait_for(lambda: daemon.stats().get("processed") == len(BAIT), what="every message worked")
    for place in (daemon.root, daemon.out, Path("/")):
        assert not list(place.glob("PWNED*")), place
    assert not daemon.files("default", "failed")
    assert sorted(bodies.read_bytes()) == sorted(b"".join(BAIT))  # bytes intact, none lost
    assert (daemon.out / "bodies.argv").read_text().splitlines() == ARG_BAIT
    assert len(ids) == len(BAIT)


def test_exception_text_is_recorded_verbatim_never_formatted(daemon: Msgd) -> None:
    daemon.queues["default"] = {"handler": "handlers:format_bait", "max_attempts": 1}
    daemon.write_config()
    daemon.start()
    ids = daemon.send_many(BAIT[:5])
    wait_for(lambda: len(daemon.files("default", "failed")) == 10, what="dead letters")
    wait_for(lambda: len(daemon.events("message failed")) == 5, what="the failures logged")
    for mid, body in zip(ids, BAIT[:5], strict=True):
        record = json.loads(
            (daemon.root / "spool/default/failed" / f"{mid}.error.json").read_text()
        )
        assert record["error"] == body.decode()
        logged = [e for e in daemon.events("message failed") if e["id"] == mid]
        assert logged and logged[0]["error"] == f"RuntimeError: {body.decode()}"
    assert daemon.proc.poll() is None


# -- pidfile and msgctl --------------------------------------------------------------------------


def test_msgctl_refuses_a_process_called_msgd_that_does_not_hold_the_lock(
    daemon: Msgd, tmp_path: Path
) -> None:
    fake = tmp_path / "msgd"
    shutil.copy("/bin/sleep", fake)
    impostor = subprocess.Popen([str(fake), "60"])
    try:
        daemon.start()
        worker = wait_for(daemon.workers, what="a worker")[0]
        real = daemon.pid
        for pid in (impostor.pid, worker):  # a look-alike, and msgd's own worker
            daemon.pidfile.write_text(f"{pid}\n")  # the lock stays with the real master
            refused = daemon.msgctl("stop")
            assert refused.returncode == 1 and "holds its lock" in refused.stderr, refused.stderr
        assert impostor.poll() is None and alive(worker) and alive(real)
        daemon.pidfile.write_text(f"{real}\n")
        assert daemon.msgctl("stop").returncode == 0
    finally:
        impostor.kill()


def test_pidfile_naming_a_reused_pid_is_taken_over_without_touching_it(daemon: Msgd) -> None:
    victim = subprocess.Popen(["sleep", "60"])
    try:
        daemon.pidfile.parent.mkdir(parents=True, exist_ok=True)
        daemon.pidfile.write_text(f"{victim.pid}\n")  # unlocked: its msgd died, the pid moved on
        daemon.start()
        assert daemon.pid == daemon.proc.pid
        assert daemon.events("stale pidfile taken over")[0]["stale_pid"] == victim.pid
        assert daemon.stop() == 0
        assert victim.poll() is None, "the program that reused the pid was not signalled"
    finally:
        victim.kill()


def test_unwritable_pidfile_directory_is_a_clean_error(daemon: Msgd) -> None:
    run = daemon.root / "run"
    with tmpfs(run, "ro,size=64k") as mounted:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("mount not permitted, and root writes any directory")
            run.chmod(0o500)
        daemon.start(wait=False)
        assert daemon.wait_exit() == 1
        err = daemon.stderr()
        assert "msgd: " in err and "Traceback" not in err, err
        assert "msgd.pid" in err or "Read-only" in err or "Permission" in err, err


def test_no_stray_file_is_followed_into_place(daemon: Msgd, tmp_path: Path) -> None:
    """A symlink planted at the stats or state file's temporary name is removed, not followed."""
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    daemon.start()
    for name in (f"stats.json.tmp.{daemon.pid}", f"msgd.state.tmp.{daemon.pid}"):
        (daemon.root / "run" / name).symlink_to(victim)
    gen = daemon.generation("stats")
    daemon.kill(signal.SIGUSR1)
    wait_for(lambda: daemon.generation("stats") > gen, what="stats written despite the plant")
    assert victim.read_text() == "keep me\n"
    assert not (daemon.root / "run" / f"stats.json.tmp.{daemon.pid}").exists()
    assert daemon.proc.poll() is None
