"""Producers that write down what msgd acknowledged, for the power-loss tests.

A producer sends self-checking bodies through one of msgd's public ways in (`msgd.send`,
`msgd.send_many`, `msgctl send`) and, only once the call has returned an id, appends a line
`<id> <sha256 of the body> <CLOCK_MONOTONIC ns>` to its record file, which lives off the disk
whose power is cut. An id recorded before the cut is a promise msgd made: the message must come
back, byte for byte.

Run as a script (`acked.py HOW CONFIG RECORD NAME`) it produces until SIGTERM.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import msgd

DIGEST = 32


class Ack(NamedTuple):
    sha256: str
    at_ns: int  # CLOCK_MONOTONIC when the producer had the id back


def body(name: str, seq: int, rng: random.Random) -> bytes:
    """A unique body of random length that carries its own digest, so a torn one shows."""
    head = f"{name} {seq} ".encode() + rng.randbytes(rng.randrange(0, 3000))
    return head + hashlib.sha256(head).digest()


def whole(data: bytes) -> bool:
    return len(data) > DIGEST and hashlib.sha256(data[:-DIGEST]).digest() == data[-DIGEST:]


def record(path: Path, ids: list[str], bodies: list[bytes]) -> None:
    """Write down acknowledged ids, in one append (lines of several producers never mix)."""
    now = time.monotonic_ns()
    shas = [hashlib.sha256(b).hexdigest() for b in bodies]
    lines = "".join(f"{i} {sha} {now}\n" for i, sha in zip(ids, shas, strict=True))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, lines.encode())
    finally:
        os.close(fd)


def acks(*paths: Path) -> dict[str, Ack]:
    found: dict[str, Ack] = {}
    for path in paths:
        if not path.exists():  # a producer that had nothing acknowledged yet
            continue
        for line in path.read_text().splitlines():
            mid, sha, at = line.split()
            found[mid] = Ack(sha, int(at))
    return found


Sender = Callable[[list[bytes]], list[str]]


def sender(how: str, config: str) -> Sender:
    """One public way of sending: a batch in, its ids out."""
    if how == "send":
        return lambda bodies: [msgd.send(b, config=config) for b in bodies]
    if how == "send_many":
        return lambda bodies: msgd.send_many(bodies, config=config)
    if how == "msgctl":
        msgctl = str(Path(sys.executable).parent / "msgctl")

        def by_msgctl(bodies: list[bytes]) -> list[str]:
            return [_msgctl_send(msgctl, config, b) for b in bodies]

        return by_msgctl
    raise ValueError(f"unknown way of sending: {how}")


def _msgctl_send(msgctl: str, config: str, data: bytes) -> str:
    done = subprocess.run(
        [msgctl, "-c", config, "send"], input=data, capture_output=True, check=True
    )
    return done.stdout.decode().strip()


def produce(how: str, config: str, path: Path, name: str, count: int | None = None) -> None:
    """Send (batches of 1 to 20 for send_many) and record, `count` messages or until killed."""
    send = sender(how, config)
    rng = random.Random(name)
    seq = 0
    while count is None or seq < count:
        size = rng.randrange(1, 21) if how == "send_many" else 1
        if count is not None:
            size = min(size, count - seq)
        bodies = [body(name, seq + k, rng) for k in range(size)]
        record(path, send(bodies), bodies)
        seq += size


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    how, config, path, name = sys.argv[1:]
    produce(how, config, Path(path), name)
