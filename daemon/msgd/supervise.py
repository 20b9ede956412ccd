"""How the master's work runs: blocking calls off the loop with a deadline, failures logged once.

The master's loop must turn within milliseconds of a signal, so a call that may wait on a disk,
a broker or an import runs in a thread (`off_loop`); past its deadline it counts as failed and the
loop goes on. Recurring duties (timeouts, retries, the stats file) must survive their errors: a
full /run or a spool gone read-only is logged once while it lasts (`Duties`), never raised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 - asyncio.to_thread's, loaded before dropping root
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import structlog

DEADLINE = 10.0  # seconds a call off the loop may take before it counts as failed
T = TypeVar("T")


async def off_loop(call: Callable[..., T], *args: Any, deadline: float = DEADLINE) -> T:
    """Run a call that may block in a thread; TimeoutError after `deadline` seconds."""
    return await asyncio.wait_for(asyncio.to_thread(call, *args), deadline)


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
