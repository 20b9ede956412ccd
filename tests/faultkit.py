"""Shared pieces of the fault-injection and security suites: tallies, process look-ups, mounts.

Every fault test ends with `Tally.check()`: each id sent is accounted for exactly once as a
success (the `record`/`by_body` handlers append the id) or as an expected dead letter in failed/,
nothing is left in cur/, new/ or defer/, and the duplicates are counted. Set MSGD_FAULT_REPORT to a
file path to collect one JSON line per fault (the issue's report table is built from it).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import Msgd, wait_for

FAST_DEATH = 1.0  # msgd.pool.FAST_DEATH: kill only workers older than this (no respawn backoff)


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def age(pid: int) -> float:
    """Seconds since `pid` started (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return 0.0
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def msgd_processes(d: Msgd) -> list[int]:
    """Every live process of one daemon under test: master, workers, handler children.

    Found by the log file they all hold open (setproctitle overwrites /proc/PID/environ, and a
    worker whose master died is no longer its child), so orphans are found too.
    """
    log = str(d.root / "msgd.log")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[0] == "Z":
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == log:
                    pids.append(int(entry))
                    break
            except OSError:
                pass
    return pids


def uid_of(pid: int) -> tuple[int, int, str]:
    """(effective uid, effective gid, supplementary groups) of a process."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return (
        int(status["Uid"].split()[1]),
        int(status["Gid"].split()[1]),
        status["Groups"].strip(),
    )


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[bool]:
    """Mount a tmpfs at `path` for the block; yields False when mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def world_dir() -> Path:
    """A fresh directory that an unprivileged user can reach (pytest's tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="msgd-sec-"))
    d.chmod(0o755)
    return d


@dataclass
class Tally:
    """What became of the messages one fault test sent."""

    daemon: Msgd
    queue: str = "default"
    sent: list[str] = field(default_factory=list)
    expect_failed: set[str] = field(default_factory=set)

    def add(self, ids: Iterable[str], fail: bool = False) -> list[str]:
        ids = list(ids)
        self.sent += ids
        if fail:
            self.expect_failed.update(ids)
        return ids

    def failed(self) -> set[str]:
        return {n for n in self.daemon.files(self.queue, "failed") if not n.endswith(".error.json")}

    def succeeded(self) -> Counter[str]:
        return Counter(self.daemon.succeeded())

    def settled(self) -> bool:
        done = set(self.succeeded()) | self.failed()
        return done >= set(self.sent)

    def in_queue(self) -> dict[str, list[str]]:
        """What is still in cur/, new/ or defer/: messages that may run (again)."""
        return {s: f for s in ("cur", "new", "defer") if (f := self.daemon.files(self.queue, s))}

    def check(self, fault: str, injected: int, restarts: int = 0, max_dups: int = 0) -> int:
        """Assert nothing was lost or misplaced; return (and report) the duplicate count.

        Counted only once the queue has settled: a message run again (a retry due in a second,
        a recovery) is in cur/, new/ or defer/ until its second success is recorded.
        """
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not self.in_queue(), 15, "the queue to settle")
        assert not self.in_queue(), f"left in the queue: {self.in_queue()}"
        ok, failed = self.succeeded(), self.failed()
        sent = set(self.sent)
        assert len(sent) == len(self.sent), "ids are unique"
        lost = sent - set(ok) - failed
        assert not lost, f"{len(lost)} lost: {sorted(lost)[:5]}"
        assert failed == self.expect_failed, (
            f"unexpected dead letters {sorted(failed - self.expect_failed)[:5]}, "
            f"missing {sorted(self.expect_failed - failed)[:5]}"
        )
        assert not (set(ok) & failed), "a message both succeeded and failed"
        assert set(ok) <= sent, "successes of ids never sent"
        dups = sum(n - 1 for n in ok.values())
        report(fault, injected, len(sent), len(lost), dups, restarts)
        assert dups <= max_dups, f"{dups} duplicate successes (at most {max_dups} unavoidable)"
        return dups


def report(fault: str, injected: int, sent: int, lost: int, dups: int, restarts: int) -> None:
    line = {
        "fault": fault,
        "injected": injected,
        "sent": sent,
        "lost": lost,
        "duplicated": dups,
        "restarts": restarts,
    }
    print(f"\nFAULT {json.dumps(line)}")
    path = os.environ.get("MSGD_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
