"""How the master's work runs: blocking calls off the loop with a deadline, failures logged once.

The master's loop must turn within milliseconds of a signal, so a call that may wait on a disk,
a broker or an import runs in a thread (`off_loop`); past its deadline it counts as failed and the
loop goes on. A store call that only touches this machine's files and has been cheap runs on the
loop instead (`Placement`): the thread's two wake-ups would cost more. Recurring duties (timeouts,
retries, the stats file) must survive their errors: a full /run or a spool gone read-only is
logged once while it lasts (`Duties`), never raised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 - asyncio.to_thread's, loaded before dropping root
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import structlog

DEADLINE = 10.0  # seconds a call off the loop may take before it counts as failed
CHEAP = 0.002  # seconds of CPU: a local call this cheap may run on the loop (Placement)
BLOCKED = 0.02  # seconds: a local call that took this long waited on its disk
RECENT = 10.0  # seconds a local call stays in a thread after a run that was not cheap
T = TypeVar("T")


async def off_loop(call: Callable[..., T], *args: Any, deadline: float = DEADLINE) -> T:
    """Run a call that may block in a thread; TimeoutError after `deadline` seconds."""
    return await asyncio.wait_for(asyncio.to_thread(call, *args), deadline)


class Placement:
    """Where one recurring call of the master runs: on the loop, or in a thread with the deadline.

    A thread's two wake-ups cost ~0.3 ms on an idle machine and milliseconds once the workers
    keep the cores busy, more than listing a small directory. So a `local` call (this machine's
    files, never a network) runs on the loop, unless its first run or any in the last RECENT
    seconds used over CHEAP of CPU (a large directory; a slow run that recurs, like a sweep once
    a second, keeps it in the thread) or took over BLOCKED (it waited on its disk). CPU, not the
    time taken: with the workers saturating the cores, a cheap call is preempted for
    milliseconds, and would go to the thread exactly when its wake-ups cost most. Any other
    call always runs in a thread.
    """

    def __init__(self) -> None:
        self.slow_until = math.inf  # in a thread until a first run shows it cheap

    async def run(self, local: bool, call: Callable[..., T], *args: Any) -> T:
        if local and time.monotonic() >= self.slow_until:
            return self._timed(call, *args)
        return await off_loop(self._timed, call, *args)

    def _timed(self, call: Callable[..., T], *args: Any) -> T:
        began, cpu = time.monotonic(), time.thread_time()
        try:
            return call(*args)
        finally:
            now = time.monotonic()
            if time.thread_time() - cpu > CHEAP or now - began > BLOCKED:
                self.slow_until = now + RECENT
            elif self.slow_until == math.inf:
                self.slow_until = now


class Duties:
    """The recurring duties' errors: each logged once, with its traceback, while it lasts."""

    def __init__(self) -> None:
        self.failing: dict[str, str] = {}
        self.log = structlog.get_logger()

    @contextlib.contextmanager
    def duty(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            if self.failing.get(what) != str(e):
                self.failing[what] = str(e)
                self.log.exception("periodic duty failed", duty=what)
        else:
            if self.failing.pop(what, None) is not None:
                self.log.info("periodic duty recovered", duty=what)
