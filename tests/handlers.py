"""Handlers the tests configure. They report through files under $MSGD_TEST_OUT.

Each line is written with one O_APPEND write, so lines from several workers never interleave.
"""

from __future__ import annotations

import ctypes
import os
import time

import msgd

OUT = os.environ.get("MSGD_TEST_OUT", "/tmp")


def _append(name: str, line: str) -> None:
    fd = os.open(os.path.join(OUT, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def record(message: msgd.Message) -> None:
    """Succeed, and say so: one line with the id per success."""
    _append("succeeded", message.id)


def noop(message: msgd.Message) -> None:
    pass


def by_body(message: msgd.Message) -> None:
    """The body says what to do: b"ok", b"fail", b"fail-once", b"reject", b"sleep:<s>",
    b"abort", b"exit:<n>", b"hang", b"leak:<mb>", b"segv", b"until:<path>" (wait for a file)."""
    body = message.body
    _append("started", f"{message.id} {message.attempt}")
    if body == b"fail" or (body == b"fail-once" and message.attempt == 1):
        raise RuntimeError(f"failing attempt {message.attempt}")
    if body == b"reject":
        raise msgd.Reject("not acceptable")
    if body.startswith(b"sleep:"):
        time.sleep(float(body[6:]))
    while body.startswith(b"until:") and not os.path.exists(body[6:]):
        time.sleep(0.005)
    if body == b"abort":
        os.abort()
    if body == b"segv":
        ctypes.string_at(0)
    if body.startswith(b"exit:"):
        os._exit(int(body[5:]))
    if body == b"hang":
        while True:
            time.sleep(1)
    if body.startswith(b"leak:"):
        _LEAK.append(bytearray(int(body[5:]) * 1024 * 1024))
    _append("succeeded", message.id)


_LEAK: list[bytearray] = []


def attempts(message: msgd.Message) -> None:
    """Record every attempt, then fail: for retry/backoff tests."""
    _append("attempts", f"{message.id} {message.attempt} {time.time()}")
    raise RuntimeError(f"attempt {message.attempt} failed")


def version(message: msgd.Message) -> None:
    """Record the handler code's version: reload tests rewrite this module's sibling."""
    import handler_version

    _append("succeeded", message.id)
    _append("versions", f"{message.id} {handler_version.VERSION}")


def record_body(message: msgd.Message) -> None:
    """Record the body's length and a checksum: for binary, empty and large bodies."""
    import hashlib

    _append(
        "bodies", f"{message.id} {len(message.body)} {hashlib.sha256(message.body).hexdigest()}"
    )
    _append("succeeded", message.id)


def poison(message: msgd.Message) -> None:
    """Like `by_body`, and b"touch:<mb>" grows the worker's RSS by that much (pages written)."""
    if message.body.startswith(b"touch:"):
        _append("started", f"{message.id} {message.attempt}")
        _LEAK.append(bytearray(b"\1" * (int(message.body[6:]) * 1024 * 1024)))
        _append("succeeded", message.id)
        return
    by_body(message)


def format_bait(message: msgd.Message) -> None:
    """Fail with the body as the exception text: it must be recorded, never interpreted."""
    raise RuntimeError(message.body.decode(errors="replace"))


def record_slowly(message: msgd.Message) -> None:
    """Succeed after a few ms, so that a stream always has messages in flight to interrupt."""
    time.sleep(0.003)
    _append("succeeded", message.id)


def pid_after_a_while(message: msgd.Message) -> None:
    """Take 0.2 s and say which worker process did it."""
    time.sleep(0.2)
    _append("pids", f"{message.id} {os.getpid()}")
    _append("succeeded", message.id)


def keep(message: msgd.Message) -> None:
    """Succeed, keeping the body as bodies/<id> (the power-loss tests compare it byte for byte).
    Written aside and renamed: a worker stopped mid-write leaves no partial body behind."""
    path = os.path.join(OUT, "bodies")
    os.makedirs(path, exist_ok=True)
    aside = os.path.join(path, f".{message.id}.{os.getpid()}")
    with open(aside, "wb") as f:
        f.write(message.body)
    os.replace(aside, os.path.join(path, message.id))


def keep_slowly(message: msgd.Message) -> None:
    """`keep`, after 10 ms of work: a message stays claimed long enough to be caught claimed."""
    time.sleep(0.01)
    keep(message)


def together(message: msgd.Message) -> None:
    """Succeed only once int(body) runs have arrived here at the same time (10 s at most): a
    queue's `threads` running side by side in one worker."""
    _append("arrived", message.id)
    deadline = time.monotonic() + 10
    path = os.path.join(OUT, "arrived")
    while time.monotonic() < deadline:
        with open(path) as f:
            if len(f.read().split()) >= int(message.body):
                _append("succeeded", message.id)
                return
        time.sleep(0.01)
    raise RuntimeError("ran alone")


def tls(message: msgd.Message) -> None:
    """Needs the real ssl module (which the master runs without), then succeeds."""
    import ssl

    ssl.create_default_context()
    _append("succeeded", message.id)
