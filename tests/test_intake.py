"""The intake log: a single durable send appends one record; the daemon turns records into
messages exactly once after a crash at any step, replays them after a power loss without making
one twice, and skips torn records."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Msgd, spool_store, wait_for
from msgd import intake
from msgd.spool import SpoolStore, _sent_name, new_id
from msgd.when import NOW, SendOptions


@pytest.fixture
def store(tmp_path: Path) -> SpoolStore:
    s = spool_store(tmp_path / "spool", "q")
    s.ensure()
    return s


def files(store: SpoolStore, state: str = "new") -> dict[str, bytes]:
    """What waits in one state directory: name -> body."""
    return {p.name: p.read_bytes() for p in Path(store.dir, state).iterdir()}


def staged(store: SpoolStore) -> list[str]:
    return os.listdir(Path(store.dir, "intake", "staged"))


def send(store: SpoolStore, *bodies: bytes, options: SendOptions = NOW) -> list[str]:
    """Records appended as msgd.send does; returns their spool names."""
    names = [_sent_name(new_id(), options) for _ in bodies]
    for name, body in zip(names, bodies, strict=True):
        intake.append(store.dir, [(name, body)], 0o600)
    return names


def convert(store: SpoolStore) -> int:
    return intake.convert(store.dir, 0o600)


def header(store: SpoolStore) -> intake.Header:
    fd = os.open(Path(store.dir, "intake", "log"), os.O_RDONLY)
    try:
        return intake.read_header(fd)
    finally:
        os.close(fd)


def test_records_become_messages_once(store: SpoolStore) -> None:
    names = send(store, b"one", b"two", b"")
    assert intake.pending(store.dir) == names
    log = Path(store.dir, "intake", "log")
    assert log.stat().st_size == intake.SIZE  # written over zeros: the file never grew
    assert files(store) == {}  # not visible before the daemon converts them
    assert convert(store) == 3
    assert files(store) == dict(zip(names, [b"one", b"two", b""], strict=True))
    assert intake.pending(store.dir) == [] and convert(store) == 0
    assert len(files(store)) == 3 and staged(store) == []


def test_a_queue_watched_while_the_converter_waits_is_converted_on_its_first_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The converter's thread waits on the queues it knew; a queue added later (a reload's, or
    the second at start) is taken in at once, not at its next safety look (made an hour here)."""
    monkeypatch.setattr(intake.Converter, "SAFETY", 3600.0)
    first, second = (spool_store(tmp_path / "spool", q) for q in ("a", "b"))
    for s in (first, second):
        s.ensure()
    converter = intake.Converter(0o600)
    converter.watch(first.dir)
    send(first, b"a")
    done = header(first).end
    wait_for(lambda: header(first).durable == done, 10, "a's message converted and flushed")
    loop = next(t.native_id for t in threading.enumerate() if t.name == "intake")
    wait_for(lambda: asleep(loop), 10, "the converter waiting on a's log alone")
    converter.watch(second.dir)
    names = send(second, b"b")
    wait_for(lambda: list(files(second)) == names, 10, "b's message, converted on its write")


def asleep(tid: int | None) -> bool:
    """Whether a thread of this process sleeps in the kernel (the converter: in its select)."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "S"


def test_send_options_ride_in_the_record(store: SpoolStore) -> None:
    """A single send's priority and expiry name its file in new/; a delayed one goes to defer/,
    counted as scheduled while it is still a record."""
    (urgent,) = send(store, b"u", options=SendOptions(priority=9, expires=4e9))
    (later,) = send(store, b"l", options=SendOptions(due=4e9))
    assert store.depths().new == 1 and store.depths().scheduled == 1
    convert(store)
    assert urgent.endswith("@p9@x4000000000000") and files(store) == {urgent: b"u"}
    assert later.endswith("@t4000000000000") and files(store, "defer") == {later: b"l"}


def test_a_torn_record_and_garbage_are_skipped_and_the_rest_kept(store: SpoolStore) -> None:
    (first,) = send(store, b"before")
    fd = os.open(Path(store.dir, "intake", "log"), os.O_RDWR)
    try:  # a power loss: the header's `end` reached the disk, the end of its record did not
        end = intake.read_header(fd).end
        torn = intake.frame(new_id(), b"x" * 100)[:60]
        garbage = b"MSGR\xff\xff\xff\x7f" + b"MSGR" + os.urandom(50)
        os.pwrite(fd, torn + garbage, end)
        os.pwrite(fd, intake.OFFSET.pack(end + len(torn + garbage)), intake.END_AT)
    finally:
        os.close(fd)
    (last,) = send(store, b"after")
    assert intake.pending(store.dir) == [first, last]
    convert(store)
    assert files(store) == {first: b"before", last: b"after"}


def test_a_producer_killed_inside_its_write_is_written_over(store: SpoolStore) -> None:
    (first,) = send(store, b"before")
    fd = os.open(Path(store.dir, "intake", "log"), os.O_RDWR)
    try:  # a whole record written, the producer killed before it moved `end`
        end = intake.read_header(fd).end
        os.pwrite(fd, intake.frame(new_id(), b"never acknowledged" * 10), end)
    finally:
        os.close(fd)
    (last,) = send(store, b"after")
    convert(store)
    assert files(store) == {first: b"before", last: b"after"}


def crash_at_rename(store: SpoolStore, monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    """A conversion pass that dies at its `nth` rename (1: before any)."""
    real_rename = os.rename
    calls = {"n": 0}

    def rename(src: str, dst: str) -> None:
        calls["n"] += 1
        if calls["n"] == nth:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        convert(store)
    monkeypatch.undo()


def test_a_crash_mid_pass_finishes_the_moves_and_never_remakes(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cursor moved, one file renamed into new/, the other still staged; a worker then
    finished the first. Recovery in the same mount trusts the cursor: it renames the staged one
    and makes neither again."""
    names = send(store, b"a", b"b")
    crash_at_rename(store, monkeypatch, 2)
    assert list(files(store)) == [names[0]] and staged(store) == [names[1]]
    os.unlink(Path(store.dir, "new", names[0]))  # a worker ran and finished the first one
    assert intake.recover(store.dir, 0o600) == 0
    assert files(store) == {names[1]: b"b"}, "the finished message is not made again"
    assert staged(store) == []


def test_a_crash_while_staging_replays_each_record_once(store: SpoolStore) -> None:
    """Staged files written (one cut short), the cursor not moved: recovery stages them again
    over what was left and makes each message once."""
    names = send(store, b"a" * 100, b"b")
    Path(store.dir, "intake", "staged", names[0]).write_bytes(b"a" * 10)
    assert intake.recover(store.dir, 0o600) == 2
    assert files(store) == dict(zip(names, [b"a" * 100, b"b"], strict=True))
    assert staged(store) == [] and intake.pending(store.dir) == []


def lose_the_page_cache(store: SpoolStore) -> None:
    """What a power loss leaves in the header: another mount's instance."""
    fd = os.open(Path(store.dir, "intake", "log"), os.O_RDWR)
    try:
        os.pwrite(fd, b"\1" * 24, intake.CURSOR_AT + 8)
    finally:
        os.close(fd)


def test_after_a_power_loss_records_past_the_durable_cursor_mend_their_messages(
    store: SpoolStore,
) -> None:
    """Converted, not yet flushed as a batch: after a power loss the files may be torn or gone.
    Each record past the durable cursor is written again over its message wherever it is now
    (its name kept), or made anew; none is made twice."""
    torn, retried, gone, durable = send(store, b"t" * 50, b"r", b"g", b"d")
    convert(store)
    assert header(store).durable < header(store).cursor
    Path(store.dir, "new", torn).write_bytes(b"t")  # what reached the disk of it
    retry = f"{retried}@1@12345"  # it failed once before the cut: a retry waits in defer/
    os.rename(Path(store.dir, "new", retried), Path(store.dir, "defer", retry))
    os.unlink(Path(store.dir, "new", gone))  # finished before the cut, or never on the disk
    (after,) = send(store, b"a")  # acknowledged, not converted
    lose_the_page_cache(store)
    assert intake.recover(store.dir, 0o600) == 5
    assert files(store) == {torn: b"t" * 50, gone: b"g", durable: b"d", after: b"a"}
    assert files(store, "defer") == {retry: b"r"}
    assert header(store).durable == header(store).cursor == header(store).end
    assert intake.recover(store.dir, 0o600) == 0


def test_a_flushed_batch_is_not_replayed_after_a_power_loss(store: SpoolStore) -> None:
    (finished,) = send(store, b"f")
    convert(store)
    intake.make_durable(store.dir, 0o600)
    assert header(store).durable == header(store).end
    os.unlink(Path(store.dir, "new", finished))  # a worker finished it
    lose_the_page_cache(store)
    assert intake.recover(store.dir, 0o600) == 0 and files(store) == {}


def waiting_for_lock(path: Path) -> bool:
    """Whether some process waits for a lock on `path` (a "->" line of /proc/locks)."""
    inode = f":{path.stat().st_ino} "
    return any("->" in line and inode in line for line in Path("/proc/locks").open())


def test_a_replaced_log_is_not_appended_to(store: SpoolStore) -> None:
    """A producer that waited for the lock of a log the flusher replaced (it was all converted)
    writes to the new log, never to the unlinked one."""
    send(store, b"first")
    convert(store)
    log = Path(store.dir, "intake", "log")
    holder = os.open(log, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # the flusher, about to replace the log
    sent: list[str] = []
    producer = threading.Thread(target=lambda: sent.extend(send(store, b"second")))
    producer.start()
    wait_for(lambda: waiting_for_lock(log), 5, "the producer to wait for the lock")
    fresh = Path(store.dir, "intake", "log.new")
    fresh.write_bytes(intake.fresh_log())
    os.rename(fresh, log)  # what _rotate does once the old log is all converted
    os.close(holder)
    producer.join()
    assert intake.pending(store.dir) == sent
    convert(store)
    assert sorted(files(store).values()) == [b"first", b"second"] and sent[0] in files(store)


@pytest.mark.parametrize("statx", [True, False], ids=["statx", "without statx"])
def test_a_log_renamed_over_has_no_links_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, statx: bool
) -> None:
    """What tells a producer its log was replaced: the open file's link count, read by statx
    asking for nothing else (see sysutil.link_count), or by fstat where statx is missing."""
    from msgd import sysutil

    if not statx:
        monkeypatch.setattr(sysutil, "_statx", lambda *args: None)
    log = tmp_path / "log"
    log.write_bytes(b"old")
    fd = os.open(log, os.O_RDONLY)
    try:
        assert sysutil.link_count(fd) == 1
        os.link(log, tmp_path / "second")
        assert sysutil.link_count(fd) == 2
        (tmp_path / "fresh").write_bytes(b"new")
        os.rename(tmp_path / "fresh", log)
        os.unlink(tmp_path / "second")
        assert sysutil.link_count(fd) == 0
    finally:
        os.close(fd)


def test_a_flushed_log_is_replaced_once_large_with_what_follows(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ROTATE_BYTES, the batch flush replaces the log by a fresh one that starts with the
    records written since the flushed cursor: converted ones (as converted), and the others."""
    monkeypatch.setattr(intake, "ROTATE_BYTES", 1000)
    log = Path(store.dir, "intake", "log")
    send(store, *[b"x" * 100] * 12)
    convert(store)
    later = send(store, b"y", b"z")
    before = log.stat()
    intake.make_durable(store.dir, 0o600)
    after = log.stat()
    assert (after.st_ino, after.st_size) != (before.st_ino, before.st_size)
    assert intake.pending(store.dir) == later and header(store).durable == intake.HEADER.size
    assert convert(store) == 2 and len(files(store)) == 14


def test_two_flushes_at_once_rotate_the_log_once_and_lose_nothing(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flusher and a reload's close may both make a log durable at once. Each one's syncfs
    waits (up to 0.5 s) for the other to get there too, so that without the one-at-a-time lock
    both rotate: the second would read the fresh log with the old log's offsets and lose
    records (a HUP storm under a stream did, before the lock)."""
    monkeypatch.setattr(intake, "ROTATE_BYTES", 1000)
    send(store, *[b"x" * 100] * 12)
    convert(store)
    later = send(store, b"y", b"z")
    both_there = threading.Barrier(2)
    real_syncfs = intake.syncfs

    def syncfs_together(path: str) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            both_there.wait(timeout=0.5)
        real_syncfs(path)

    monkeypatch.setattr(intake, "syncfs", syncfs_together)
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            intake.make_durable(store.dir, 0o600)
        except BaseException as e:
            errors.append(e)

    flushers = [threading.Thread(target=flush) for _ in range(2)]
    for thread in flushers:
        thread.start()
    for thread in flushers:
        thread.join()
    assert not errors
    assert intake.pending(store.dir) == later and header(store).durable == intake.HEADER.size
    assert convert(store) == 2 and len(files(store)) == 14


def test_a_full_log_grows(store: SpoolStore) -> None:
    """No daemon empties it: past SIZE, the log takes more zeros and keeps every record."""
    names = send(store, *[b"z" * 5000] * 60)
    assert Path(store.dir, "intake", "log").stat().st_size > intake.SIZE
    assert convert(store) == 60 and sorted(files(store)) == sorted(names)


def test_a_large_single_send_is_a_file_at_once(store: SpoolStore) -> None:
    """Past intake.LARGEST a body would be written twice for one flush less: it is sent as a
    file, flushed with its name in new/, as a batch is."""
    (mid,) = store.send_many([b"L" * (intake.LARGEST + 1)])
    (small,) = store.send_many([b"s"])
    assert files(store) == {mid: b"L" * (intake.LARGEST + 1)}
    assert intake.pending(store.dir) == [small]


def test_a_log_that_is_not_one_is_one_error_line(daemon: Msgd) -> None:
    """A log whose header is not an intake's (overwritten by something else): msgctl send says
    so in one line and exits 1; nothing is written over it."""
    daemon.store().ensure()
    log = daemon.root / "spool" / "default" / "intake" / "log"
    log.write_bytes(b"not a log" * 100)
    sent = daemon.msgctl("send", input=b"x")
    assert (sent.returncode, sent.stderr) == (1, "msgctl: queue default: intake log: bad header\n")
    assert log.read_bytes() == b"not a log" * 100


PRODUCER = """
import sys, msgd
body = b"x" * 2000  # 4 x 100 of them fill the log past ROTATE_BYTES: it is replaced meanwhile
for i in range(int(sys.argv[2])):
    print(msgd.send(body, config=sys.argv[1]), flush=True)
"""


def producers(daemon: Msgd, count: int, each: int) -> list[subprocess.Popen[str]]:
    argv = [sys.executable, "-c", PRODUCER, str(daemon.config_path), str(each)]
    return [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(count)]


def test_concurrent_producers_each_message_worked_once(daemon: Msgd) -> None:
    daemon.start()
    ids = [mid for p in producers(daemon, 4, 100) for mid in p.communicate(timeout=60)[0].split()]
    assert len(set(ids)) == 400
    daemon.wait_processed(400)
    assert sorted(daemon.succeeded()) == sorted(ids)
    assert daemon.stop() == 0
    assert header(daemon.store()).end < 400 * 2000, "the log was replaced while producers wrote"


def test_a_stream_under_reloads_each_message_worked_once(daemon: Msgd) -> None:
    """Producers send while the daemon reloads again and again, each time with the queue's
    settings changed: the reload closes its old store in the background, which makes the intake
    durable beside the flusher (both rotate the log, which these producers fill). Every message
    sent runs exactly once."""
    daemon.start()
    sending = producers(daemon, 2, 400)
    reloads = 0
    while any(p.poll() is None for p in sending) or reloads < 3:
        daemon.queues["default"]["max_attempts"] = 5 + reloads % 2
        daemon.write_config()
        daemon.kill(signal.SIGHUP)
        reloads += 1
        wait_for(lambda n=reloads: daemon.generation("reload") == n, what=f"reload {reloads}")
    ids = [mid for p in sending for mid in p.communicate(timeout=60)[0].split()]
    assert len(set(ids)) == 800
    daemon.wait_processed(800)
    assert sorted(daemon.succeeded()) == sorted(ids)
    assert daemon.state()["last"]["reload"]["outcome"] == "ok"


def test_a_master_killed_while_converting_makes_each_message_once(daemon: Msgd) -> None:
    """Producers send while the master (converting their records) is killed -9 ten times and
    restarted; the queue is burst-mode, so no handler runs before the end: then each message
    sent runs exactly once."""
    daemon.queues["default"]["mode"] = "burst"
    daemon.write_config()
    daemon.start()
    sending = producers(daemon, 2, 1000)
    for kills in range(10):
        wait_for(lambda k=kills: len(daemon.files("default", "new")) > 150 * (k + 1), 30, "sends")
        daemon.kill(signal.SIGKILL)
        daemon.wait_exit()
        daemon.start()
    ids = [mid for p in sending for mid in p.communicate(timeout=60)[0].split()]
    done = daemon.msgctl("burst", "--wait")
    assert done.returncode == 0, done.stderr
    assert sorted(daemon.succeeded()) == sorted(ids)
    assert daemon.stop() == 0
    flushed = header(daemon.store())
    assert flushed.durable == flushed.end, "a clean stop leaves nothing to replay"


@pytest.fixture
def immutable_new(daemon: Msgd) -> Iterator[Path]:
    """The default queue's new/, to be made immutable (chattr +i, which binds root too): the
    converter's renames into it fail, as if it had been killed just before them."""
    new = daemon.root / "spool" / "default" / "new"
    yield new
    subprocess.run(["chattr", "-i", str(new)], check=False)


def test_a_master_killed_between_its_cursor_and_its_renames_makes_each_once(
    daemon: Msgd, immutable_new: Path
) -> None:
    daemon.start()
    subprocess.run(["chattr", "+i", str(immutable_new)], check=True)
    ids = [daemon.send(b"x") for _ in range(3)]
    store = daemon.store()
    stuck = lambda: len(staged(store)) == 3 and not intake.pending(store.dir)  # noqa: E731
    wait_for(stuck, 10, "the converter to move its cursor and fail at its renames")
    wait_for(lambda: daemon.events("intake failed"), 10, "the failure logged")
    daemon.kill(signal.SIGKILL)
    daemon.wait_exit()
    subprocess.run(["chattr", "-i", str(immutable_new)], check=True)
    daemon.start()
    daemon.wait_processed(3)
    assert daemon.stop() == 0
    assert sorted(daemon.succeeded()) == sorted(ids), "each message ran once"


def test_sends_without_the_daemon_count_as_new_and_run_at_start(daemon: Msgd) -> None:
    ids = [daemon.send(b"x") for _ in range(3)]
    assert daemon.files("default", "new") == []
    queues = daemon.msgctl("queues")
    assert queues.stdout.splitlines()[1].split()[:2] == ["default", "3"]
    daemon.start()
    daemon.wait_processed(3)
    assert sorted(daemon.succeeded()) == sorted(ids)
    assert daemon.stop() == 0


def test_a_burst_waits_for_what_is_still_in_the_intake(daemon: Msgd) -> None:
    daemon.queues["nightly"] = {"handler": "handlers:record", "mode": "burst"}
    daemon.write_config()
    daemon.start()
    ids = [daemon.send(b"n", queue="nightly") for _ in range(5)]
    done = daemon.msgctl("burst", "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "burst done: 5 succeeded, 0 retried, 0 failed"
    assert sorted(daemon.succeeded()) == sorted(ids)
    assert daemon.stop() == 0
