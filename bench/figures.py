"""Reading one run's figures: medians and ranges over repeated runs, per-round ratios, formats.

`results[scenario][system]` is `{"runs": [one dict per repeat]}`, or `{"error": ...}` /
`{"skipped": ...}`. Repeats run in rounds (every system once, then again), so the k-th runs of
two systems ran next to each other: a ratio between systems is taken round by round.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

LABELS = {
    "msgd": "msgd (fsync = true)",
    "msgd-nofsync": "msgd (fsync = false)",
    "bare": "bare claim loop, 2 processes (the ceiling)",
    "bare-1": "bare claim loop, 1 process",
    "mp-queue": "multiprocessing.Queue (in memory)",
    "mp-pool": "multiprocessing.Pool (in memory)",
    "huey-sqlite": "Huey (SQLite, fsync=True)",
    "huey-sqlite-nofsync": "Huey (SQLite, fsync=False)",
    "huey-redis": "Huey (Redis, not flushed)",
    "celery": "Celery (Redis, not flushed)",
}


def runs(results: dict, scenario: str, system: str) -> list[dict]:
    entry = results.get(scenario, {}).get(system) or {}
    return entry.get("runs", []) if isinstance(entry, dict) else []


def values(results: dict, scenario: str, system: str, *keys: str) -> list[float]:
    """The figure at `keys` in each run that has it, in run order."""
    out = []
    for run in runs(results, scenario, system):
        value: object = run
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            out.append(float(value))
    return out


def get(results: dict, scenario: str, system: str, *keys: str) -> float | None:
    """The median over the runs of the figure at `keys` (None when no run has it)."""
    found = values(results, scenario, system, *keys)
    return statistics.median(found) if found else None


def pick(results: dict, scenario: str, system: str, *keys: str) -> dict:
    """The run whose figure at `keys` is the median (for details that cannot be averaged)."""
    found = values(results, scenario, system, *keys)
    if not found:
        return {}
    middle = found.index(statistics.median_low(found))
    return runs(results, scenario, system)[middle]


def per_round(a: list[float], b: list[float], how: Callable[[float, float], float]) -> list[float]:
    """`how(a[k], b[k])` for each round k both lists reached (runs of a round are adjacent)."""
    return [how(x, y) for x, y in zip(a, b, strict=False) if y]


def ratios(results: dict, left: tuple[str, ...], right: tuple[str, ...]) -> list[float]:
    """Per-round ratios of the figure `left` = (scenario, system, *keys) to `right`."""
    return per_round(values(results, *left), values(results, *right), lambda x, y: x / y)


def known(*figures: float | None) -> list[float] | None:
    """The figures, if every one was measured (None otherwise): a sentence needs them all."""
    return None if any(f is None for f in figures) else [f for f in figures if f is not None]


def median(found: list[float]) -> float | None:
    return statistics.median(found) if found else None


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def with_range(found: list[float], digits: int = 0, suffix: str = "") -> str:
    """'median (min-max)' over the runs; the median alone for one run."""
    if not found:
        return "—"
    middle = fmt(statistics.median(found), digits, suffix)
    if len(found) == 1:
        return middle
    return f"{middle} ({fmt(min(found), digits)}-{fmt(max(found), digits)})"


def process_name(process: dict) -> str:
    """A process's title without its arguments (a config path is this machine's, not news)."""
    return process["cmd"].split(" -c")[0][:40]
