"""A handler module (`slow_count:record`) whose import slows the worker's counting: each outcome
is counted 0.3 s after the store was told (a worker preempted between acknowledging a message and
counting it, made long). Imported only by the workers of the test that configures it."""

import time

from handlers import record  # noqa: F401 - the handler
from msgd import counters

_finish = counters.SlotWriter.finish


def _finish_late(self: counters.SlotWriter, *args: object, **kwargs: object) -> None:
    time.sleep(0.3)  # the injected fault: the count comes late
    _finish(self, *args, **kwargs)  # type: ignore[arg-type]


counters.SlotWriter.finish = _finish_late  # type: ignore[method-assign]
