"""Power loss: a message whose producer got its id survives a power cut, byte for byte.

The spool lives on tests/powercut.py's disk, which keeps only what was flushed. Producers send
through msgd's public ways in and write each id down (off that disk) only once the call returned;
then the power is cut, and a fresh msgd started on what the disk held works every message,
keeping each body. Every id acknowledged before the cut must come back with its exact body, and
no message may come back torn. The checks go through msgd itself, not the spool's files, so they
hold whatever the spool's layout.

The same check catches a producer that skips its flushes (`daemon.fsync = false`): that test
keeps the rig honest.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import random
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

import acked
import powercut
import pytest
from conftest import Msgd, alive, wait_for
from msgd import intake

WHY_NOT = powercut.unavailable()
pytestmark = [
    pytest.mark.skipif(WHY_NOT is not None, reason=f"power-cut disk: {WHY_NOT}"),
    pytest.mark.xdist_group("mounts"),  # one worker: see pyproject's addopts
]

TESTS = Path(__file__).parent
BLOCK = powercut.BLOCK


@pytest.fixture(autouse=True)
def nothing_left_mounted(tmp_path: Path) -> Iterator[None]:
    """Every mount a test made is gone once its fixtures are torn down, whatever happened."""
    yield
    mounts = (line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines())
    left = [m for m in mounts if m.startswith(f"{tmp_path}/")]
    assert not left, f"left mounted: {left}"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[powercut.PowerCutDisk]:
    with powercut.PowerCutDisk(tmp_path / "disk") as d:
        yield d


def on_disk(root: Path, disk: powercut.PowerCutDisk, fsync: bool = True) -> Msgd:
    """An msgd (not started) whose spool is on the disk; its pidfile, log and handler's output
    are off it. Producers use its config."""
    root.mkdir()
    d = Msgd(root)
    d.daemon.update(spool=str(disk.fs / "spool"), fsync=fsync)
    d.queues = {"default": {"handler": "handlers:keep"}}
    d.write_config()
    return d


def kept(daemon: Msgd) -> dict[str, bytes]:
    """The bodies the daemon's handlers:keep received, by id."""
    path = daemon.out / "bodies"
    return {p.name: p.read_bytes() for p in path.glob("[!.]*")}


@dataclass
class Verdict:
    """What became of the acknowledged messages at one instant of power loss."""

    acked: int  # acknowledged before the cut
    lost: list[str] = field(default_factory=list)  # of those, not delivered with their body
    torn: list[str] = field(default_factory=list)  # delivered, but not a whole body
    delivered: int = 0  # after the cut, or handled before it
    handled: int = 0  # of those, by an msgd at work before the cut
    moment: str = ""  # when the power was cut

    def __str__(self) -> str:
        before = f" ({self.handled} handled before the cut)" if self.handled else ""
        return (
            f"{self.moment}: {len(self.lost)} of {self.acked} acknowledged messages lost, "
            f"{len(self.torn)} torn, {self.delivered} delivered{before}"
        )


def judge(
    acks: dict[str, acked.Ack], before_ns: int, moment: str, *deliveries: dict[str, bytes]
) -> Verdict:
    """Judge deliveries (id -> body) against what was acknowledged before the instant
    `before_ns`: each such message delivered whole at least once, no delivery torn."""
    bodies = {
        (mid, hashlib.sha256(data).hexdigest()) for d in deliveries for mid, data in d.items()
    }
    due = {mid: ack for mid, ack in acks.items() if ack.at_ns < before_ns}
    lost = [mid for mid, ack in due.items() if (mid, ack.sha256) not in bodies]
    torn = [mid for d in deliveries for mid, data in d.items() if not acked.whole(data)]
    delivered = len({mid for mid, _ in bodies})
    return Verdict(len(due), sorted(lost), sorted(torn), delivered, moment=moment)


def delivered(image: Path, work: Path) -> dict[str, bytes]:
    """What msgd delivers from a disk image after the reboot: mounted (which replays the ext4
    journal, and changes the image), worked by a fresh msgd to the last message, body by body."""
    work.mkdir()
    daemon = Msgd(work)
    with powercut.mounted(image, work / "fs") as fs:
        daemon.daemon.update(spool=str(fs / "spool"), workers=1)
        daemon.queues = {"default": {"handler": "handlers:keep"}}
        daemon.write_config()
        try:
            daemon.start()
            done = daemon.msgctl("--timeout", "20", "burst", "--wait")
            assert done.returncode == 0, done.stderr
            assert daemon.stop() == 0
        finally:
            daemon.cleanup()
    return kept(daemon)


def after_the_cut(disk: powercut.PowerCutDisk, work: Path) -> dict[str, bytes]:
    """Delivered from what the disk held once its power was cut (call after `disk.close()`)."""
    image = work / "after-the-cut.img"
    shutil.copyfile(disk.durable, image)  # keep the durable image as it was
    return delivered(image, work / "after-the-cut")


# -- the rig itself ------------------------------------------------------------------------------


def write(path: Path, data: bytes, flush: bool) -> None:
    """Create a file; with `flush`, make it and its name durable (fsync the file, its directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        if flush:
            os.fsync(fd)
    finally:
        os.close(fd)
    if flush:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)


def overwrite_on_disk(path: Path, data: bytes) -> None:
    """Overwrite a file's blocks in place with O_DIRECT: the data goes to the disk at once, and
    nothing asks the disk to flush it (nor the filesystem to journal anything)."""
    buf = mmap.mmap(-1, len(data))  # O_DIRECT wants an aligned buffer: a page is
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.write(fd, buf) == len(data)
    finally:
        os.close(fd)
        buf.close()


def test_the_disk_keeps_flushed_writes_and_drops_the_rest(
    disk: powercut.PowerCutDisk, tmp_path: Path
) -> None:
    """A known-bad writer (no fsync) loses its file; a good one keeps it, its fsync reaching the
    server as a flush; a block that reached the disk unflushed is lost too (the disk has a
    volatile cache); nothing written after the cut lands; the journal replays to the image."""
    flushes = disk.status()["flushes"]
    write(disk.fs / "flushed", b"kept" * 1000, flush=True)
    assert disk.status()["flushes"] > flushes
    write(disk.fs / "overwritten", b"A" * BLOCK, flush=True)
    before = disk.status()
    overwrite_on_disk(disk.fs / "overwritten", b"B" * BLOCK)
    after = disk.status()
    assert after["writes"] > before["writes"] and after["flushes"] == before["flushes"]
    write(disk.fs / "unflushed", b"lost" * 1000, flush=False)
    disk.cut()
    write(disk.fs / "after-cut", b"late" * 1000, flush=True)
    assert (disk.fs / "unflushed").read_bytes() == b"lost" * 1000  # the kernel carries on
    disk.close()
    survived = tmp_path / "survived.img"
    shutil.copyfile(disk.durable, survived)  # mounting changes an image
    with powercut.mounted(survived, tmp_path / "after") as fs:
        assert sorted(os.listdir(fs)) == ["flushed", "lost+found", "overwritten"]
        assert (fs / "flushed").read_bytes() == b"kept" * 1000
        assert (fs / "overwritten").read_bytes() == b"A" * BLOCK
    last = b""
    for _, image in powercut.flush_points(disk.base, disk.journal):
        last = bytes(image)
    assert last == disk.durable.read_bytes()


# -- one producer after another, the power cut after every flush ---------------------------------


def test_every_flush_point_keeps_what_was_acknowledged(
    disk: powercut.PowerCutDisk, tmp_path: Path
) -> None:
    """msgd.send, send_many and msgctl send in turn, then the power cut right after the last
    acknowledgement (a producer that skipped its last flush would lose that message), and also
    at every flush of the run: each of those disks must hold what was acknowledged before it."""
    config = str(on_disk(tmp_path / "producer", disk).config_path)
    acks_file = tmp_path / "acks"
    for how, count in (("send", 2), ("send_many", 6), ("msgctl", 1), ("send", 1)):
        acked.produce(how, config, acks_file, how, count)
    judge_every_flush(disk, tmp_path, disk.cut(), 10)


def judge_every_flush(
    disk: powercut.PowerCutDisk, work: Path, cut_ns: int, count: int, every: int = 1
) -> None:
    """The `count` acknowledgements in work/acks, judged after the cut and at the flushes."""
    disk.close()
    acks = acked.acks(work / "acks")
    assert len(acks) == count
    assert every_flush_point_keeps(acks, cut_ns, disk, work, every) > len(acks)


def every_flush_point_keeps(
    acks: dict[str, acked.Ack], cut_ns: int, disk: powercut.PowerCutDisk, work: Path, every: int = 1
) -> int:
    """What the disk held after the cut, and at every flush of the run (every `every`th), holds
    what was acknowledged before it, whole. Returns how many flushes the run made."""
    verdict = judge(acks, cut_ns, "after the last ack", after_the_cut(disk, work))
    assert not verdict.lost and not verdict.torn, str(verdict)
    image = work / "point.img"
    points = 0
    for points, (flushed_ns, data) in enumerate(powercut.flush_points(disk.base, disk.journal), 1):
        if points % every == 0:
            image.write_bytes(data)
            got = delivered(image, work / f"point{points}")
            verdict = judge(acks, flushed_ns, f"at flush {points}", got)
            assert not verdict.lost and not verdict.torn, str(verdict)
    return points


# -- producers at once, the power cut at a random moment -----------------------------------------

WAYS = ("send", "send_many", "msgctl", "send")


def cut_while_producing(
    disk: powercut.PowerCutDisk, work: Path, fsync: bool = True, worked: bool = False
) -> Verdict:
    """Producer processes, one per way in WAYS, sending at once (`worked`: while an msgd works
    the queue); the power cut after a random number of acknowledgements; judged on what msgd
    delivers after it, and what the working msgd had handled before it."""
    daemon = on_disk(work / "producer", disk, fsync)
    records = work / "acks"
    records.mkdir()
    target = random.randrange(20, 300)
    with contextlib.ExitStack() as stack:
        if worked:
            daemon.queues["default"]["handler"] = "handlers:keep_slowly"
            daemon.write_config()
            stack.enter_context(running(daemon))
        procs = stack.enter_context(producers(str(daemon.config_path), records, work))
        wait_for(lambda: _acknowledged(records, procs) >= target, 30, f"{target} acks")
        if worked:
            # under load the first runs may lag the producers: cut once some have been handled
            wait_for(lambda: kept(daemon), 30, "the working msgd to handle a message")
            stop_dead(daemon)
        cut_ns = disk.cut()
    disk.close()
    acks = acked.acks(*records.iterdir())
    handled = kept(daemon)
    verdict = judge(acks, cut_ns, f"cut after {target} acks", handled, after_the_cut(disk, work))
    verdict.handled = len(handled)
    print(verdict)
    return verdict


@contextlib.contextmanager
def producers(config: str, records: Path, work: Path) -> Iterator[dict[str, Popen[bytes]]]:
    """One producer process per way in WAYS, each recording into `records`, until the block
    ends (then SIGTERM: what they acknowledge after the cut does not count)."""
    procs: dict[str, Popen[bytes]] = {}
    try:
        for n, how in enumerate(WAYS):
            name = f"{how}{n}"
            argv = [sys.executable, str(TESTS / "acked.py"), how, config, str(records / name), name]
            with open(work / f"{name}.log", "wb") as log:
                procs[name] = Popen(argv, stdout=log, stderr=log)
        yield procs
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(10)


def _acknowledged(records: Path, procs: dict[str, Popen[bytes]]) -> int:
    for name, proc in procs.items():
        if proc.poll() is not None:
            raise AssertionError(f"producer {name} exited {proc.returncode}")
    return sum(p.read_bytes().count(b"\n") for p in records.iterdir())


@contextlib.contextmanager
def running(daemon: Msgd) -> Iterator[Msgd]:
    """The daemon working its spool on the disk; killed, workers and all, when the block ends."""
    daemon.start()
    try:
        yield daemon
    finally:
        pids = family(daemon.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        daemon.cleanup()
        wait_for(lambda: not any(alive(pid) for pid in pids), 10, "msgd's processes to end")


def stop_dead(daemon: Msgd) -> None:
    """Freeze the master, then its workers, as the power cut would: nothing they do after it
    counts (they are killed afterwards)."""
    for pid in family(daemon.pid):
        os.kill(pid, signal.SIGSTOP)


def family(pid: int) -> list[int]:
    """`pid` and its descendants, parents first (children of every thread: the master may
    start a worker from any of its threads)."""
    pids = [pid]
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for child in children.read_text().split():
                pids += family(int(child))
    return pids


@pytest.mark.parametrize("run", [1, 2, 3])
def test_producers_at_once_lose_nothing_acknowledged(
    disk: powercut.PowerCutDisk, tmp_path: Path, run: int
) -> None:
    """Four producers (send, send_many, msgctl send, send) at once; the power cut at random."""
    verdict = cut_while_producing(disk, tmp_path)
    assert verdict.acked > 0
    assert not verdict.lost and not verdict.torn, str(verdict)


def test_nothing_acknowledged_is_lost_while_msgd_works_the_queue(
    disk: powercut.PowerCutDisk, tmp_path: Path
) -> None:
    """The same, with msgd claiming and working the messages as they come: each acknowledged
    message was handled before the cut or is delivered after it (perhaps both)."""
    verdict = cut_while_producing(disk, tmp_path, worked=True)
    assert verdict.acked > 0 and verdict.handled > 0
    assert not verdict.lost and not verdict.torn, str(verdict)


def test_producers_that_skip_flushes_lose_acknowledged_messages(
    disk: powercut.PowerCutDisk, tmp_path: Path
) -> None:
    """The same test with `daemon.fsync = false` (a producer that skips its flushes) must fail:
    otherwise the rig could not catch a broken producer."""
    verdict = cut_while_producing(disk, tmp_path, fsync=False)
    assert verdict.lost, f"a producer without flushes lost nothing: {verdict}"


def test_websocket_sends_survive_the_cut(disk: powercut.PowerCutDisk, tmp_path: Path) -> None:
    """The WebSocket send frame (issue 13's listener) promises what msgd.send does: a `sent`
    reply is an acknowledgement. 40 sends over /ws to a burst-mode queue (nothing is worked
    before the cut), the power cut right after the last reply: every one comes back whole."""
    pytest.importorskip("websockets", reason="websockets missing (pip install -e '.[http]')")
    import base64
    import json

    from httpkit import TOKEN, client, configure, next_frame

    daemon = on_disk(tmp_path / "listener", disk)
    daemon.queues["default"]["mode"] = "burst"
    configure(daemon)
    acks_file = tmp_path / "acks"
    rng = random.Random("ws")
    with running(daemon), client(daemon, token=TOKEN) as ws:
        for seq in range(40):
            data = acked.body("ws", seq, rng)
            request = {"op": "send", "queue": "default", "ref": seq}
            ws.send(json.dumps({**request, "body_b64": base64.b64encode(data).decode()}))
            reply = next_frame(ws, lambda f, seq=seq: f.get("ref") == seq, 30)
            assert reply["op"] == "sent", reply
            acked.record(acks_file, [reply["id"]], [data])
        stop_dead(daemon)
        cut_ns = disk.cut()
    disk.close()
    acks = acked.acks(acks_file)
    verdict = judge(acks, cut_ns, "after the last WebSocket ack", after_the_cut(disk, tmp_path))
    assert verdict.acked == 40 and not verdict.lost and not verdict.torn, str(verdict)


# -- the intake: single sends converted by a running msgd, the power cut after every flush -------


def intake_flushed(log: Path, below: int = 1 << 62) -> bool:
    """Whether the running msgd flushed all it converted of this intake log (durable = end),
    and the log holds fewer than `below` bytes (after 200 KB sent: it was replaced)."""
    with open(log, "rb") as f:
        _, durable, end, _, _ = intake.HEADER.unpack(f.read(intake.HEADER.size))
    return bool(durable == end < below)


def converting(disk: powercut.PowerCutDisk, work: Path) -> Msgd:
    """An msgd on the disk that makes single sends' records files and runs nothing (burst)."""
    daemon = on_disk(work / "daemon", disk)
    daemon.queues["default"]["mode"] = "burst"
    daemon.write_config()
    return daemon


def test_every_flush_point_while_msgd_converts_single_sends(
    disk: powercut.PowerCutDisk, tmp_path: Path
) -> None:
    """msgd.send one at a time while msgd turns the records into files, waiting now and then
    for its batch flush; the power cut at every flush: between a producer's flush and the
    conversion, between the conversion and the batch flush, after it."""
    daemon, acks_file = converting(disk, tmp_path), tmp_path / "acks"
    log = disk.fs / "spool" / "default" / "intake" / "log"
    with running(daemon):
        for seq in range(3):
            acked.produce("send", str(daemon.config_path), acks_file, f"send{seq}", 3)
            wait_for(lambda: intake_flushed(log), 10, "the batch flush")
        acked.produce("send", str(daemon.config_path), acks_file, "last", 2)
        stop_dead(daemon)
        cut_ns = disk.cut()
    judge_every_flush(disk, tmp_path, cut_ns, 11)


def test_a_log_replaced_under_load_keeps_what_was_acknowledged(
    disk: powercut.PowerCutDisk, tmp_path: Path
) -> None:
    """Enough single sends (~1.5 KB each) for the running msgd to replace its intake log, more
    after that, then the power cut; judged after the cut and at every 10th flush of the run."""
    daemon, acks_file = converting(disk, tmp_path), tmp_path / "acks"
    log = disk.fs / "spool" / "default" / "intake" / "log"
    with running(daemon):
        acked.produce("send", str(daemon.config_path), acks_file, "before", 150)
        wait_for(lambda: intake_flushed(log, below=intake.ROTATE_BYTES), 10, "a fresh log")
        acked.produce("send", str(daemon.config_path), acks_file, "after", 20)
        stop_dead(daemon)
        cut_ns = disk.cut()
    judge_every_flush(disk, tmp_path, cut_ns, 170, every=10)
