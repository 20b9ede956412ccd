"""What a queue's handler is: a Python callable or an external command, seen the same way.

A handler is called with a `Message`. Returning means success; raising means a failure that is
retried with backoff; raising `Reject` means a permanent failure that goes straight to failed/.
The master never imports handler code: workers import it after fork (so a reload picks up new code),
`msgd --check` and `msgctl reload` in a short-lived forked child, and a reload's first new worker
is its own check (pool.py: it claims nothing until it has loaded).
"""

from __future__ import annotations

import importlib
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable

import msgspec

from msgd.config import Config, ConfigError, QueueConfig
from msgd.signals import TABLE
from msgd.sysutil import set_parent_death_signal

EX_DATAERR = 65  # a command's way of saying Reject (sysexits.h)


class Message(msgspec.Struct, frozen=True):
    """One message as a handler sees it (read-only)."""

    id: str
    queue: str
    body: bytes
    attempt: int  # 1 on the first run
    enqueued_at: float  # epoch seconds


class Reject(Exception):
    """Raise from a handler to fail a message permanently (no more attempts)."""


Handler = Callable[[Message], object]


class CommandFailed(Exception):
    """A command handler exited non-zero; the message is retried."""


def load(name: str, queue: QueueConfig, pythonpath: list[str]) -> Handler:
    """The callable that runs `queue`'s handler, importing Python code if needed."""
    if queue.command:
        return _command_handler(list(queue.command))
    for p in reversed(pythonpath):
        if p not in sys.path:
            sys.path.insert(0, p)
    module_name, _, attr = queue.handler.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except Exception as e:
        raise ConfigError(f"queues.{name}.handler: cannot import {queue.handler}: {e!r}") from None
    if not callable(function):
        raise ConfigError(f"queues.{name}.handler: {queue.handler} is not callable")
    return function


def load_all(config: Config) -> dict[str, Handler]:
    """Every queue's handler; ConfigError (one line) for the first that cannot be had, whatever the
    import raised (SystemExit, KeyboardInterrupt... included)."""
    try:
        return {name: load(name, q, config.daemon.pythonpath) for name, q in config.queues.items()}
    except ConfigError:
        raise
    except BaseException as e:
        raise ConfigError(f"importing handlers: {e!r}") from None


def _command_handler(argv: list[str]) -> Handler:
    """Body on stdin, facts in the environment, argv as configured: nothing is shell-parsed."""

    def run(message: Message) -> None:
        env = dict(
            os.environ,
            MSGD_QUEUE=message.queue,
            MSGD_MESSAGE_ID=message.id,
            MSGD_ATTEMPT=str(message.attempt),
        )
        done = subprocess.run(
            argv,
            input=message.body,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_command_child,
            check=False,
        )
        if done.returncode == 0:
            return
        stderr = done.stderr.decode(errors="replace").strip()[-2000:]
        if done.returncode == EX_DATAERR:
            raise Reject(f"exit status {EX_DATAERR}: {stderr}")
        status = (
            f"killed by signal {-done.returncode}"
            if done.returncode < 0
            else f"exit status {done.returncode}"
        )
        raise CommandFailed(f"{status}: {stderr}" if stderr else status)

    return run


def _command_child() -> None:
    """In the command's process before exec: default signals, and die with the worker."""
    for sig in TABLE:
        signal.signal(sig, signal.SIG_DFL)
    set_parent_death_signal()


def import_too_slow(config: Config) -> str:
    """The error of an import of handlers that outlived `daemon.import_timeout` (a check's or a
    reload's first new worker's)."""
    return f"queues: importing the handlers took over {config.daemon.import_timeout:g}s"


def check_commands(config: Config) -> None:
    for name, q in config.queues.items():
        if q.command and shutil.which(q.command[0]) is None:
            raise ConfigError(f"queues.{name}.command: {q.command[0]}: no such program")


def check(config: Config) -> None:
    """Import every Python handler in a forked child; raise ConfigError with the first failure.

    Forking keeps the caller's sys.modules clean: the master must never hold handler modules, or
    workers forked after a reload would run the old code.
    """
    check_commands(config)
    if not any(q.handler for q in config.queues.values()):
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: import, report, vanish without running any atexit code
        os.close(read_end)
        status = 0
        try:
            load_all(config)
        except ConfigError as e:
            os.write(write_end, str(e).encode()[:4000])
            status = 1
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as r:
        if not select.select([r], [], [], config.daemon.import_timeout)[0]:  # never returns?
            os.kill(pid, signal.SIGKILL)  # must not hang msgctl or a start
            os.waitpid(pid, 0)
            raise ConfigError(import_too_slow(config))
        error = r.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise ConfigError(error or f"handler check died ({status})")
