"""msgd's handlers for the benchmark (module:function specs point here via `pythonpath`)."""

from __future__ import annotations

import tasks


def job(message) -> None:
    """Every benchmark message: no-op, latency probe or CPU work, as its body says."""
    tasks.run_body(message.body)
