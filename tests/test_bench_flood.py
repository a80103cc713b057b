"""bench/flood.py's pure logic: the rates it tries (a ladder, bisection, then
unpaced) and the accounting of a step (made = archived + counted drops, kind
by kind). The flood itself is measured by the bench, not here."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import flood  # noqa: E402  (bench/flood.py)
from flood import UNPACED, account, gap_kinds, next_rate  # noqa: E402

PLAN = replace(flood.PROFILES["quick"], start_rate=20_000, max_rate=320_000, bisections=2)


def rates_tried(limit: float, plan=PLAN, reach: float = float("inf")) -> list[int]:
    """The targets next_rate picks when every rate up to `limit` keeps every
    record and the workload reaches at most `reach` opens/s."""
    done: list[tuple[int, bool, float]] = []
    while (rate := next_rate(done, plan)) is not None:
        achieved = reach if rate == UNPACED else min(rate, reach)
        done.append((rate, achieved <= limit, achieved))
        assert len(done) < 30, done
    return [rate for rate, _, _ in done]


def test_the_ladder_doubles_then_bisects_between_complete_and_lossy_then_goes_unpaced():
    assert rates_tried(limit=70_000) == [20_000, 40_000, 80_000, 60_000, 70_000, UNPACED]


def test_bisection_moves_down_from_a_lossy_midpoint():
    assert rates_tried(limit=50_000) == [20_000, 40_000, 80_000, 60_000, 50_000, UNPACED]


def test_bisection_stops_at_the_resolution_and_the_step_budget():
    tried = rates_tried(limit=41_000, plan=replace(PLAN, bisections=10))
    assert tried[:3] == [20_000, 40_000, 80_000]
    paced = tried[3:-1]
    assert tried[-1] == UNPACED and len(paced) < 10   # within 15% before the budget ran out
    assert all(40_000 < r < 80_000 for r in paced)


def test_a_lossy_first_step_halves_the_rate():
    assert rates_tried(limit=6_000) == [20_000, 10_000, 5_000, UNPACED]


def test_the_ladder_stops_at_its_top_and_when_the_workload_falls_short():
    assert rates_tried(limit=float("inf")) == [20_000, 40_000, 80_000, 160_000, 320_000, UNPACED]
    assert rates_tried(limit=float("inf"), reach=100_000) == [20_000, 40_000, 80_000, 160_000, UNPACED]


def test_nothing_after_the_unpaced_step():
    assert next_rate([(20_000, True, 20_000.0), (UNPACED, False, 90_000.0)], PLAN) is None
    assert next_rate([], PLAN) == PLAN.start_rate


def test_gap_details_name_the_kinds():
    assert gap_kinds("ring buffer or in-flight map full: fd=1266, open=1267") == {"fd": 1266, "open": 1267}
    assert gap_kinds("daemon not reading: open=5") == {"open": 5}
    assert gap_kinds("3 batches from probe never arrived (seq 4..6)") == {}


MADE = {"open": 1000, "fd": 1004, "exec": 3, "exit": 7}


def test_the_counts_add_up_when_every_drop_is_counted_for_its_kind():
    result = account(MADE, emitted={"open": 900, "fd": 904, "exec": 3, "exit": 7},
                     dropped={"open": 100, "fd": 100, "exec": 0, "exit": 0},
                     archived={"open": 850, "fd": 904, "exec": 3, "exit": 7},
                     gaps=[{"stage": "kernel", "count": 200, "detail": "full: fd=100, open=100"},
                           {"stage": "probe-backlog", "count": 50, "detail": "daemon not reading: open=50"}])
    assert result["adds_up"] and not result["every_record"]
    assert result["lost"] == 150 + 100
    assert result["gaps_by_stage"] == {"kernel": 200, "probe-backlog": 50}
    assert result["kinds"]["open"] == {"made": 1000, "kernel_emitted": 900, "kernel_dropped": 100,
                                       "later_dropped": 50, "archived": 850, "lost": 150,
                                       "kernel_saw_all": True, "gap_records_match_kernel": True,
                                       "adds_up": True}


def test_an_uncounted_loss_does_not_add_up():
    result = account(MADE, emitted=MADE, dropped={}, archived={**MADE, "exec": 2}, gaps=[])
    assert not result["adds_up"] and result["lost"] == 1
    assert not result["kinds"]["exec"]["adds_up"] and result["kinds"]["open"]["adds_up"]


def test_a_drop_that_names_no_kind_is_unattributed_and_a_mismatched_gap_is_seen():
    result = account(MADE, emitted=MADE, dropped={}, archived={**MADE, "open": 990},
                     gaps=[{"stage": "transport", "count": 10, "detail": "1 batches from probe never arrived"},
                           {"stage": "kernel", "count": 4, "detail": "full: open=4"}])
    assert result["unattributed"] == 10 and not result["adds_up"]
    assert not result["kinds"]["open"]["gap_records_match_kernel"]   # counters say 0 dropped


def test_every_record_arrived():
    result = account(MADE, emitted=MADE, dropped={}, archived=MADE, gaps=[])
    assert result["every_record"] and result["adds_up"] and result["lost"] == 0
