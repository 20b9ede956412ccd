"""Poison messages and corrupt spool entries: each ends in failed/ with its reason, the rest flows.

A poison message kills its worker (abort, segfault, exit), hangs (killed at its timeout), fails on
every attempt, or leaks memory (the worker is recycled past max_rss_mb, the message succeeds). A
corrupt entry (not a regular file, a symlink, a stray directory, a name msgd did not write) is
quarantined with a log line; no crash loop, no stalled queue.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import Msgd, wait_for
from faultkit import Tally


def error_record(d: Msgd, mid: str, queue: str = "default") -> dict:
    return json.loads((d.root / "spool" / queue / "failed" / f"{mid}.error.json").read_text())


def attempts_of(d: Msgd, mid: str) -> int:
    try:
        lines = (d.out / "started").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(line.split()[0] == mid for line in lines)


def test_poison_messages_end_in_failed_and_the_rest_flows(daemon: Msgd) -> None:
    daemon.daemon["workers"] = 3
    daemon.daemon["max_rss_mb"] = 150
    daemon.queues["default"] = {
        "handler": "handlers:poison",
        "max_attempts": 3,
        "backoff": [0.0],
        "timeout": 1.0,
    }
    daemon.write_config()
    daemon.start()
    tally = Tally(daemon)
    poison = {
        b"segv": "WorkerDied",
        b"abort": "WorkerDied",
        b"exit:3": "WorkerDied",
        b"hang": "Timeout",
        b"fail": "RuntimeError",
    }
    ids = {body: tally.add([daemon.send(body)], fail=True)[0] for body in poison}
    rejected = tally.add([daemon.send(b"reject")], fail=True)[0]
    leak = tally.add([daemon.send(b"touch:200")])[0]
    for _ in range(4):
        tally.add(daemon.send_many([b"sleep:0.002"] * 50))
    wait_for(tally.settled, 60, "poison dead-lettered and the rest worked")
    for body, kind in poison.items():
        record = error_record(daemon, ids[body])
        assert record["error_type"] == kind, (body, record)
        assert record["attempts"] == 3
        assert attempts_of(daemon, ids[body]) == 3, body
    assert "exit status 3" in error_record(daemon, ids[b"exit:3"])["error"]
    assert "SIGSEGV" in error_record(daemon, ids[b"segv"])["error"]
    assert "SIGABRT" in error_record(daemon, ids[b"abort"])["error"]
    assert "in by_body" in error_record(daemon, ids[b"hang"])["traceback"]  # the dump
    assert error_record(daemon, rejected)["error_type"] == "Reject"
    assert attempts_of(daemon, rejected) == 1
    assert leak in daemon.succeeded()
    recycled = wait_for(lambda: daemon.events("worker recycled"), what="the recycle logged")
    assert len(recycled) == 1 and recycled[0]["reason"] == "max_rss_mb exceeded"
    assert recycled[0]["worker"] in range(3)  # a worker's lines name its slot
    assert daemon.proc.poll() is None
    wait_for(lambda: len(daemon.workers()) == 3, 15, "the pool back at 3 workers")
    tally.check("poison messages", len(poison) * 3 + 2)


def plant(d: Msgd, name: str, queue: str = "default") -> Path:
    return d.root / "spool" / queue / "new" / name


def test_corrupt_spool_entries_are_quarantined(daemon: Msgd, tmp_path: Path) -> None:
    daemon.daemon["workers"] = 2
    daemon.queues["default"] = {"handler": "handlers:record", "max_attempts": 2, "backoff": [0.0]}
    daemon.write_config()
    daemon.start()
    tally = Tally(daemon)
    secret = tmp_path / "secret"
    secret.write_text("not for handlers")
    os.mkfifo(plant(daemon, "fifo0000000000000000001"))
    plant(daemon, "link0000000000000000002").symlink_to(secret)
    tmp = daemon.root / "spool/default/tmp"  # built there, then moved in whole, as producers do
    stray = tmp / "dir00000000000000000003"
    stray.mkdir()
    (stray / "inside").write_text("x")
    stray.rename(plant(daemon, stray.name))
    tally.add(["fifo0000000000000000001", "link0000000000000000002"], fail=True)
    tally.add(["dir00000000000000000003"], fail=True)
    # Names msgd did not write: an attempts suffix that is not a number, an empty one, several.
    for name in ("odd@name", "trailing@", "a@b@c", "at@@x"):
        plant(daemon, name).write_bytes(b"foreign producer")
        tally.add([name])
    # A truncated message and an empty one are still messages: the handler gets what is there.
    half = tmp / "half00000000000000000004"
    half.write_bytes(b"0123456789" * 100)
    os.truncate(half, 500)
    half.rename(plant(daemon, half.name))
    plant(daemon, "empty0000000000000000005").write_bytes(b"")
    tally.add(["half00000000000000000004", "empty0000000000000000005"])
    # A file the worker may not open (as root: an O_NOFOLLOW'd symlink loop stands in).
    plant(daemon, "loop00000000000000000006").symlink_to("loop00000000000000000006")
    tally.add(["loop00000000000000000006"], fail=True)
    tally.add(daemon.send_many([b"after"] * 20))
    wait_for(tally.settled, 20, "the corrupt entries quarantined and the rest worked")
    for mid in ("fifo0000000000000000001", "dir00000000000000000003"):
        assert "not a regular file" in error_record(daemon, mid)["error"]
    for mid in ("link0000000000000000002", "loop00000000000000000006"):
        assert error_record(daemon, mid)["error_type"] in ("OSError",)
    assert secret.read_text() == "not for handlers"
    # The worker logs each failure just after moving the file: wait for the lines.
    wait_for(lambda: len(daemon.events("message failed")) == 4, what="4 failures logged")
    assert not daemon.events("worker exited"), "no worker died over a corrupt entry"
    assert daemon.proc.poll() is None
    tally.check("corrupt spool entries", 10)
