"""The round schedule, the per-look alpha and the stop / next-round decision."""

from __future__ import annotations

import doctest

import pytest

from quantize_pipeline.verdict import sequential
from quantize_pipeline.verdict.sequential import next_round, per_look_alpha, questions_to_decide, round_schedule

ACCURACY = {"min_recovery[arc_easy]"}


def _limits(schedule) -> list:
    return [look.limit for look in schedule]


def test_docstring_examples():
    assert doctest.testmod(sequential).failed == 0


def test_schedule_steps_up_the_ladder_to_the_cap():
    assert _limits(round_schedule(200, 1000)) == [200, 500, 1000]
    assert _limits(round_schedule(200, 2500)) == [200, 500, 1000, 2000, 2500]
    assert _limits(round_schedule(300, 1000)) == [300, 500, 1000]
    assert _limits(round_schedule(200, 200)) == [200]  # no further rounds
    assert _limits(round_schedule(None, 1000)) == [None]  # the whole split at once


def test_schedule_without_a_cap_ends_on_the_whole_split_and_a_known_split_caps_it():
    assert _limits(round_schedule(200, None))[-1] is None
    assert _limits(round_schedule(200, None, split_size=570)) == [200, 500, 570]
    assert _limits(round_schedule(200, 1000, split_size=570)) == [200, 500, 570]
    assert _limits(round_schedule(800, 1000, split_size=570)) == [570]  # the split is smaller than the first round


def test_bonferroni_per_look_alpha():
    assert per_look_alpha(1) == 0.05
    assert per_look_alpha(4) == pytest.approx(0.0125)
    assert per_look_alpha(2, alpha=0.1) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        per_look_alpha(0)


def test_questions_to_decide_scales_with_the_square_of_the_width_to_distance_ratio():
    # figure 0.98, lower bound 0.94 (half-width 0.04), threshold 0.96 (distance 0.02): 4x the questions.
    assert questions_to_decide(0.98, 0.94, 1.02, 0.96, 200) == 800
    # on the bad side: the upper half-width counts.
    assert questions_to_decide(0.90, 0.85, 0.93, 0.92, 100) == pytest.approx(225, abs=1)
    assert questions_to_decide(0.97, 0.9, 1.0, 0.97, 200) is None  # on the threshold: nothing decides it


def test_next_round_continues_while_an_accuracy_rule_is_inconclusive():
    schedule = round_schedule(200, 1000)
    decision = next_round(schedule, 0, {"min_recovery[arc_easy]": "inconclusive", "max_mean_kl": "pass"},
                          more_questions_help=ACCURACY)
    assert (decision.stop, decision.next_limit) == (False, 500)
    last = next_round(schedule, 2, {"min_recovery[arc_easy]": "inconclusive"}, more_questions_help=ACCURACY)
    assert last.stop and "budget spent" in last.reason


def test_next_round_stops_on_a_failure_a_decision_or_what_questions_cannot_help():
    schedule = round_schedule(200, 1000)
    assert next_round(schedule, 0, {"min_recovery[arc_easy]": "inconclusive", "max_mean_kl": "fail"},
                      more_questions_help=ACCURACY).stop
    assert next_round(schedule, 0, {"min_recovery[arc_easy]": "pass"}, more_questions_help=ACCURACY).reason == \
        "every rule decided"
    kl_only = next_round(schedule, 0, {"min_recovery[arc_easy]": "pass", "max_mean_kl": "inconclusive"},
                         more_questions_help=ACCURACY)
    assert kl_only.stop and "max_mean_kl" in kl_only.reason


def test_next_round_respects_the_time_budget():
    schedule = round_schedule(200, 1000)
    states = {"min_recovery[arc_easy]": "inconclusive"}
    # 300 more questions at 0.2 s each = 60 s; 50 s left of the budget.
    over = next_round(schedule, 0, states, more_questions_help=ACCURACY, elapsed_s=250, seconds_per_question=0.2,
                      time_budget_s=300, questions_done=200)
    assert over.stop and "time budget" in over.reason
    within = next_round(schedule, 0, states, more_questions_help=ACCURACY, elapsed_s=100, seconds_per_question=0.2,
                        time_budget_s=300, questions_done=200)
    assert not within.stop and within.next_limit == 500


def test_by_default_only_accuracy_rules_are_moved_by_more_questions():
    assert sequential.moved_by_questions("min_recovery[piqa]") and sequential.moved_by_questions("max_accuracy_drop[boolq]")
    assert not sequential.moved_by_questions("max_mean_kl")
    schedule = round_schedule(200, 1000)
    assert next_round(schedule, 0, {"max_accuracy_drop[arc_easy]": "inconclusive"}).next_limit == 500
    assert next_round(schedule, 0, {"min_top1_agreement": "inconclusive"}).stop
