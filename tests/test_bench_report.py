"""The benchmark report computes verdicts, spreads and reasons from the run it is given.

Pure computation on hand-made results (no timing is measured or asserted here): the figures a
reason quotes must be the run's own, a ratio between systems is taken round by round, and the
README's paragraph lists every miss.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))

import report
import targets


def results(
    msgd_sends: list[float], on: list[float], off: list[float], control: list[float] | None = None
) -> dict:
    """A run with the send and counters-off scenarios only, three rounds of each."""
    control = control or [100.0, 101.0, 99.0]  # the counters on again: the noise
    counters_off = {"rounds": 3, "on_runs": on, "off_runs": off, "control_runs": control}
    floors = {"file_two_flushes": 1100.0, "file_one_flush": 1000.0, "append_fdatasync": 6400.0,
              "overwrite_fdatasync": 7500.0}  # fmt: skip
    return {
        "send": {
            "msgd": {"runs": [{"send": {"n": 400, "msgs_per_s": v}} for v in msgd_sends]},
            "huey-sqlite": {"runs": [{"send": {"n": 400, "msgs_per_s": 3000.0}}] * 3},
            "disk": {"runs": [{k: {"msgs_per_s": v} for k, v in floors.items()}] * 3},
        },
        "nocounters": {"msgd": {"runs": [counters_off]}},
    }


def verdict(run: dict, start: str) -> report.Verdict:
    return next(v for v in report.verdicts(run) if v.what.startswith(start))


def test_a_missed_send_target_explains_itself_with_this_runs_figures() -> None:
    run = results([1000.0, 1200.0, 1100.0], on=[100.0] * 3, off=[100.0] * 3)
    v = verdict(run, "single durable sends")
    assert v.met is False
    assert v.found == pytest.approx([1000 / 3000, 1200 / 3000, 1100 / 3000])  # per round
    assert "1,100 durable sends/s" in v.reason and "3,000" in v.reason  # medians of the run
    assert "msgd.send 15%; what separates them" in v.reason  # 1,100 of 7,500/s

    met = verdict(results([3100.0] * 3, on=[100.0] * 3, off=[100.0] * 3), "single durable sends")
    assert met.met is True and met.reason == ""


def test_counters_on_off_is_the_measured_median_of_per_round_ratios_with_its_range() -> None:
    run = results([3100.0] * 3, on=[90.0, 100.0, 95.0], off=[100.0, 100.0, 100.0])
    v = verdict(run, "drain with counters on ÷ off")
    assert v.found == pytest.approx([0.90, 1.00, 0.95])
    assert v.met is False  # median 0.95 < 0.98
    assert report.shown(v) == "0.950x (0.900x - 1.00x)"
    # the control's rounds (100 / 90, 101 / 100, 99 / 95): same-code rounds up to 11.1% apart
    assert "up to 11.1% in a round, the median on ÷ off by 5.3%" in v.reason
    assert v.reason.endswith("the gap is within the noise (more rounds would resolve it).")

    quiet = results([3100.0] * 3, on=[90.0] * 3, off=[100.0] * 3, control=[91.0, 90.0, 90.5])
    assert "beyond the noise and beyond their instructions" in verdict(quiet, "drain with").reason


def test_the_readme_paragraph_lists_every_miss_and_replaces_only_its_own_part() -> None:
    run = results([1000.0] * 3, on=[90.0] * 3, off=[100.0] * 3)
    missed = [v.what for v in report.verdicts(run) if v.met is False]
    assert len(missed) == 2
    paragraph = report.readme_paragraph(run, {"date": "today", "cores": 2, "mode": "full"})
    assert all(what in " ".join(paragraph.split()) for what in missed)

    readme = f"# msgd\n\nbefore\n{report.README_BEGIN}\nold\n{report.README_END}\nafter\n"
    updated = report.update_readme(readme, paragraph)
    assert "old" not in updated and paragraph in updated
    assert updated.startswith("# msgd\n\nbefore\n") and updated.endswith("\nafter\n")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme("# msgd without markers\n", paragraph)


def test_every_target_is_not_run_rather_than_met_when_nothing_was_measured() -> None:
    assert all(v.met is None for v in report.verdicts({}))
    assert len(report.verdicts({})) == len(targets.TARGETS)
