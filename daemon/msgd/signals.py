"""The signal table, and the path from a Unix signal to an asyncio.Event.

Why not `loop.add_signal_handler`: it carries signal numbers through its wakeup socket and drops
them once the socket is full, so one HUP in a storm of USR1s can vanish. Here the handler only
raises a per-signal flag (a Python-level handler, so it never logs or allocates much), and
`signal.set_wakeup_fd` merely wakes the loop; the reader drains the socket, then turns every raised
flag into its action's Event. A flag cannot overflow, so no signal kind is ever lost; repeats
coalesce, which is what an action wants: one more run after the current one.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where it is used: `import msgd` (producers) must not load asyncio
    import asyncio


class Action(enum.Enum):
    RELOAD = "reload"
    STATS = "stats"
    BURST = "burst"
    STOP = "stop"
    QUIT = "quit"
    SCALE_UP = "scale up"
    SCALE_DOWN = "scale down"


# The contract. The README's signal table mirrors this one.
TABLE: dict[signal.Signals, tuple[Action, str]] = {
    signal.SIGHUP: (
        Action.RELOAD,
        "re-read and validate the config, apply it, reopen the log "
        "file; a bad config is rejected and the old one keeps running",
    ),
    signal.SIGUSR1: (Action.STATS, "log one `stats` event and rewrite the stats file"),
    signal.SIGUSR2: (
        Action.BURST,
        "work everything pending now: burst-mode queues and deferred retries included",
    ),
    signal.SIGTERM: (
        Action.STOP,
        "graceful stop: finish in-flight messages within grace_period, "
        "exit 0; a second TERM/INT means QUIT",
    ),
    signal.SIGINT: (Action.STOP, "same as TERM"),
    signal.SIGQUIT: (Action.QUIT, "stop now: in-flight messages go back to new/ untouched, exit 0"),
    signal.SIGTTIN: (Action.SCALE_UP, "one worker more (until the next reload)"),
    signal.SIGTTOU: (Action.SCALE_DOWN, "one worker fewer (until the next reload)"),
}

SIGNAL_OF = {action: sig for sig, (action, _) in reversed(TABLE.items())}  # TERM for STOP


class SignalWatcher:
    """Installs the table's handlers in this process and exposes one Event per action."""

    def __init__(self) -> None:
        import asyncio

        self.events = {action: asyncio.Event() for action in Action}
        self._raised: set[signal.Signals] = set()
        self._reader, self._writer = socket.socketpair()
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for sock in (self._reader, self._writer):
            sock.setblocking(False)
        loop.add_reader(self._reader.fileno(), self._drain)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for sig in TABLE:
            signal.signal(sig, self._raise)
        os.register_at_fork(after_in_child=self._forget)

    def _raise(self, signum: int, frame: object) -> None:
        self._raised.add(signal.Signals(signum))

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._reader.recv(4096):
                pass
        while self._raised:
            self.events[TABLE[self._raised.pop()][0]].set()

    def _forget(self) -> None:
        """In a forked child: the master's signal plumbing must not wake the master's actions.

        Control signals are ignored (a worker acts on none of them, and a default action would
        kill or suspend it); the worker then chooses its own TERM handling.
        """
        if self._reader.fileno() < 0:
            return
        signal.set_wakeup_fd(-1)
        for sig in TABLE:
            signal.signal(sig, signal.SIG_IGN)
        self._reader.close()
        self._writer.close()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._reader.fileno())
        signal.set_wakeup_fd(-1)
        self._reader.close()
        self._writer.close()
