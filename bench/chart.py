"""bench/chart.png from bench/out/results.json (run with the bench venv: it has matplotlib).

python bench/chart.py RESULTS_JSON OUTPUT_PNG
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from figures import LABELS, get


def bars(ax, scenario: str, keys: tuple[str, ...], results: dict, title: str, unit: str) -> None:
    systems = [s for s in LABELS if get(results, scenario, s, *keys) is not None]
    values = [get(results, scenario, s, *keys) or 0.0 for s in systems]  # all measured
    colors = ["tab:red" if s == "msgd" else "tab:gray" for s in systems]
    ax.barh([LABELS[s] for s in systems], values, color=colors)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel(unit)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,.0f}" if v >= 10 else f" {v:.2f}", va="center", fontsize=8)


def latency(ax, results: dict) -> None:
    systems = [s for s in LABELS if get(results, "stream", s, "p50_ms") is not None]
    p50 = [get(results, "stream", s, "p50_ms") for s in systems]
    p99 = [get(results, "stream", s, "p99_ms") for s in systems]
    ys = range(len(systems))
    ax.barh([y - 0.2 for y in ys], p50, height=0.4, label="p50", color="tab:blue")
    ax.barh([y + 0.2 for y in ys], p99, height=0.4, label="p99", color="tab:orange")
    ax.set_yticks(list(ys), [LABELS[s] for s in systems])
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_title("Stream at one offered rate: latency, median of runs (lower is better)")
    ax.set_xlabel("ms (log scale)")
    ax.legend(loc="best", fontsize=8)


def main() -> None:
    with open(sys.argv[1]) as f:
        results = json.load(f)["results"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 11), constrained_layout=True)
    bars(
        axes[0],
        "drain",
        ("msgs_per_s",),
        results,
        "Drain: no-op messages/s, median of runs (higher is better)",
        "msgs/s (log scale)",
    )
    bars(
        axes[1],
        "send",
        ("send", "msgs_per_s"),
        results,
        "Sending one message at a time, no consumer (higher is better)",
        "msgs/s (log scale)",
    )
    latency(axes[2], results)
    fig.suptitle("msgd vs peers, 2 workers each (same run)")
    fig.savefig(sys.argv[2], dpi=100)


if __name__ == "__main__":
    main()
