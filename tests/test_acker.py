"""Where a spool worker's unlinks run (spool_inbox.Acker): at once while they are fast, on
background threads while they wait on the device, back at once when a probe is fast.

The files and the ack log are real. The device's wait is not: an unlink that waits ~60 µs for an
online discard cannot be had here (a loop device discards in the background), so the slow
durations are given to `judge`, the one place the Acker learns how long an unlink took.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from msgd.spool_inbox import PROBE_EVERY, SLOW_UNLINK_NS, Acker

SLOW = 3 * SLOW_UNLINK_NS  # as an online discard makes them (~60 µs)


@pytest.fixture
def acker(tmp_path: Path) -> Iterator[Acker]:
    a = Acker.of(str(tmp_path), 0)
    yield a
    a.close()


def finished(acker: Acker, directory: Path, name: str) -> Path:
    """A message file whose handler succeeded, handed to the acker."""
    path = directory / name
    path.write_bytes(b"body")
    acker.done("default", name, str(path))
    return path


def test_fast_unlinks_are_done_at_once_without_threads(acker: Acker, tmp_path: Path) -> None:
    for i in range(50):
        path = finished(acker, tmp_path, f"m{i}")
        assert not path.exists()  # gone when done() returns
    assert acker.threads == [] and not acker.on_threads
    assert acker.acklog.entries("default") == set()


def test_slow_unlinks_go_to_threads_and_a_fast_probe_brings_them_back(
    acker: Acker, tmp_path: Path
) -> None:
    for _ in range(8):
        acker.judge(SLOW)
    assert acker.on_threads and len(acker.threads) > 0
    paths = [finished(acker, tmp_path, f"m{i}") for i in range(20)]
    wait_for(lambda: not any(p.exists() for p in paths), what="the threads' unlinks")
    wait_for(lambda: not acker.acklog.entries("default"), what="their records cleared")
    # After PROBE_EVERY, one unlink is done at once; this disk's is fast: back at once for good.
    n = iter(range(10**6))
    wait_for(
        lambda: not finished(acker, tmp_path, f"p{next(n)}").exists() and not acker.on_threads,
        PROBE_EVERY + 10,
        "a fast probe",
    )
    assert not finished(acker, tmp_path, "after").exists()


def test_a_lone_slow_unlink_does_not_send_fast_ones_to_threads(acker: Acker) -> None:
    """A journal commit or a preemption makes one unlink in ~1,000 take 0.5 ms."""
    for _ in range(100):
        acker.judge(5_000)
    acker.judge(555_000)
    assert not acker.on_threads
    for _ in range(6):
        acker.judge(SLOW)
    assert acker.on_threads  # slow ones in a row do


def test_a_probe_alone_decides(acker: Acker, tmp_path: Path) -> None:
    for _ in range(8):
        acker.judge(SLOW)
    acker.judge(SLOW)  # the probe
    assert acker.on_threads
    path = finished(acker, tmp_path, "m")  # within PROBE_EVERY of the slow probe: a thread's
    wait_for(lambda: not path.exists(), what="the thread's unlink")
    assert os.listdir(tmp_path) == [".msgd"]
    acker.judge(5_000)  # the next probe is fast: it counts alone, however slow the ones before
    assert not acker.on_threads
