"""Handlers for tests/test_time.py: they record when each message started, on CLOCK_MONOTONIC
(shared by every process, and the clock of the rate limiter) and on the wall clock (the clock
of delays, `at` and TTLs)."""

from __future__ import annotations

import os
import threading
import time

import msgd

OUT = os.environ.get("MSGD_TEST_OUT", "/tmp")


def stamp(message: msgd.Message) -> None:
    """One line per start: id, body, wall time, monotonic time, pid, thread. A body
    `sleep:<s>` then takes that long."""
    line = (
        f"{message.id} {message.body.decode(errors='replace') or '-'} {time.time():.6f} "
        f"{time.monotonic():.6f} {os.getpid()} {threading.get_ident()}\n"
    )
    fd = os.open(os.path.join(OUT, "starts"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())  # one O_APPEND write: lines never interleave
    finally:
        os.close(fd)
    if message.body.startswith(b"sleep:"):
        time.sleep(float(message.body[6:]))
