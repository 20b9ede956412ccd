"""What this disk charges for a durable write, measured in the same run as the sends it explains.

    python bench/disk.py floors --samples N --workdir D --out F

Four ways to make 100 bytes durable, each `--samples` times in D (on the spools' filesystem):
a new file flushed and renamed into place with its directory flushed too (two flushes), the same
with the file's flush only, an append to one open file + fdatasync (no new file, but the size
changes), and an overwrite in place in a file written before + fdatasync (no metadata at all:
what a write-ahead log that reuses its file pays, SQLite's WAL among them). The first is the
floor of any one-file-per-message send, the last the floor of a durable write. Beside them, what
taking a message's file away costs: an unlink of a flushed file (on a filesystem mounted with
online `discard` it waits for the device), as a spool worker pays once per message.
Standard library only: the bench venv and msgd's venv both run it.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenario
from common import write_result

BODY = b"x" * 100


def new_file(directory: str, name: str, flush_dir: bool) -> str:
    """One message as its own file: write tmp/NAME, fsync it, rename into new/ (fsync new/)."""
    tmp, new = os.path.join(directory, "tmp", name), os.path.join(directory, "new", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, BODY)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, new)
    if flush_dir:
        dfd = os.open(os.path.dirname(new), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return new


class Appender:
    """An open file in `directory`; each call appends 100 bytes, fdatasyncs and returns the time
    that took (seconds): one flush of a durable write that creates no metadata."""

    def __init__(self, directory: str) -> None:
        path = os.path.join(directory, "flush-probe.log")
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def __call__(self) -> float:
        t = time.perf_counter()
        os.write(self.fd, BODY)
        os.fdatasync(self.fd)
        return time.perf_counter() - t

    def __enter__(self) -> Appender:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        os.close(self.fd)


def overwrite(fd: int, n: int) -> None:
    """`n` durable writes of 100 bytes in place, over a file that already holds them."""
    for i in range(n):
        os.pwrite(fd, BODY, i * len(BODY))
        os.fdatasync(fd)


def in_place(directory: str, n: int) -> dict:
    """The overwrite floor: the file is written and flushed once first, then timed."""
    fd = os.open(
        os.path.join(directory, "in-place.log"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        os.write(fd, BODY * n)
        os.fsync(fd)
        return scenario.timed(lambda: overwrite(fd, n), n)
    finally:
        os.close(fd)


def floors(directory: str, n: int) -> dict:
    """msgs/s for each way of making a message durable, one after the other, `n` times each."""
    for sub in ("tmp", "new"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    with Appender(directory) as append:
        append()  # the file exists and is allocated before timing
        return {
            "file_two_flushes": scenario.timed(
                lambda: [new_file(directory, f"a{i}", True) for i in range(n)], n
            ),
            "file_one_flush": scenario.timed(
                lambda: [new_file(directory, f"b{i}", False) for i in range(n)], n
            ),
            "append_fdatasync": scenario.timed(lambda: [append() for _ in range(n)], n),
            "overwrite_fdatasync": in_place(directory, n),
            "unlink_flushed": scenario.timed(  # the first way's files: flushed, and their names
                lambda: [os.unlink(os.path.join(directory, "new", f"a{i}")) for i in range(n)], n
            ),
        }


def main() -> None:
    args = scenario.parse(["floors"])
    write_result(args.out, floors(os.path.join(args.workdir, "disk"), args.samples))


if __name__ == "__main__":
    main()
