"""Sequential evaluation: how many questions to evaluate next, and at what confidence to judge each look.

A gate that looks at a growing sample several times and stops as soon as a rule is
decided would, at a fixed 95% per look, err more often than 5%: each look is another
chance for noise to cross the threshold. So the planned looks share the error budget
(Bonferroni: alpha / looks each; valid for any spacing of the rounds, and simple to
state in a report). The schedule grows geometrically-ish (200 -> 500 -> 1,000 -> the
whole split) because an interval shrinks with the square root of the questions.

Pure functions, no I/O: the evaluate stage runs the rounds, the gate judges each look.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Question counts per task the rounds step through after the recipe's first `limit`
# (each ~2x the last: an interval narrows by ~1/sqrt(2.5) per step).
ROUND_LADDER = (200, 500, 1000, 2000, 5000, 10000)
GATE_ALPHA = 0.05  # two-sided 95% intervals when there is one look
# Rules whose sample grows with the questions; the token-level rules use fixed held-out paragraphs.
QUESTION_RULES = ("min_recovery", "max_accuracy_drop")


def moved_by_questions(rule: str) -> bool:
    """Whether evaluating more questions can move this rule ("min_recovery[arc_easy]" -> True)."""
    return rule.split("[", 1)[0] in QUESTION_RULES


@dataclass(frozen=True)
class Look:
    """One planned evaluation round: questions per task (None: the whole split)."""

    index: int
    limit: int | None


def round_schedule(first_limit: int | None, max_limit: int | None, split_size: int | None = None) -> tuple[Look, ...]:
    """The planned rounds: `first_limit`, the ladder's steps above it, then `max_limit`.

    max_limit None means "up to the whole split"; split_size (when known) caps every
    round, so a round that would ask for more questions than exist is the last one.
    first_limit None (the whole split at once) or max_limit <= first_limit: one round.

    >>> [look.limit for look in round_schedule(200, None, split_size=570)]
    [200, 500, 570]
    >>> [look.limit for look in round_schedule(200, 1000)]
    [200, 500, 1000]
    """
    if first_limit is None:
        return (Look(0, None),)
    cap = max_limit
    if split_size is not None:
        cap = split_size if cap is None else min(cap, split_size)
    first = first_limit if cap is None else min(first_limit, cap)
    limits: list[int | None] = [first]
    for step in ROUND_LADDER:
        if step > first and (cap is None or step < cap):
            limits.append(step)
    if cap is None:
        limits.append(None)  # then the whole split, however large
    elif cap > first:
        limits.append(cap)
    return tuple(Look(index, limit) for index, limit in enumerate(limits))


def per_look_alpha(looks: int, alpha: float = GATE_ALPHA) -> float:
    """Bonferroni: each of `looks` planned looks spends alpha / looks (two-sided)."""
    if looks < 1:
        raise ValueError(f"need at least one look, got {looks}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return alpha / looks


def questions_to_decide(figure: float, low: float, high: float, threshold: float, used: int) -> int | None:
    """About how many samples in all would put the whole interval on one side of the threshold.

    Assumes the figure stays where it is and the interval narrows as 1/sqrt(samples),
    so n' = n * (half-width on the threshold's side / distance to the threshold)^2.
    None when the figure sits on the threshold (no sample size decides it).
    """
    distance = abs(figure - threshold)
    if distance == 0.0 or used <= 0:
        return None
    half_width = (figure - low) if figure >= threshold else (high - figure)
    return max(used + 1, math.ceil(used * (half_width / distance) ** 2))


@dataclass(frozen=True)
class Decision:
    stop: bool
    next_limit: int | None  # questions per task for the next round (None with stop, or the whole split)
    reason: str


def next_round(
    schedule: tuple[Look, ...], done: int, states: dict[str, str], *,
    more_questions_help: set[str] | None = None, elapsed_s: float = 0.0, seconds_per_question: float | None = None,
    time_budget_s: float | None = None, questions_done: int | None = None,
) -> Decision:
    """After look `done` (an index into schedule), stop or name the next round's limit.

    states: rule name -> "pass" | "fail" | "inconclusive". more_questions_help: the rules
    whose sample grows with the questions (default: the accuracy rules, see QUESTION_RULES;
    token-level rules use a fixed set of held-out paragraphs, so more questions do not move them).
    Stops when any rule failed (the verdict cannot improve), when no inconclusive rule
    can be helped by more questions, when the schedule is spent, or when the next round
    would overrun time_budget_s at the measured seconds_per_question.
    """
    if any(state == "fail" for state in states.values()):
        return Decision(True, None, "a rule failed")
    undecided = sorted(rule for rule, state in states.items() if state == "inconclusive")
    if not undecided:
        return Decision(True, None, "every rule decided")
    helps = moved_by_questions if more_questions_help is None else more_questions_help.__contains__
    helped = [rule for rule in undecided if helps(rule)]
    if not helped:
        return Decision(True, None, f"more questions cannot decide {', '.join(undecided)}")
    if done + 1 >= len(schedule):
        return Decision(True, None, f"question budget spent ({_limit_text(schedule[done].limit)} per task)")
    upcoming = schedule[done + 1].limit
    if time_budget_s is not None and seconds_per_question is not None and questions_done is not None \
            and upcoming is not None:
        needed = (upcoming - questions_done) * seconds_per_question
        if elapsed_s + needed > time_budget_s:
            return Decision(True, None, f"time budget: the next round needs ~{needed:.0f} s, "
                                        f"{max(time_budget_s - elapsed_s, 0):.0f} s left")
    return Decision(False, upcoming, f"{', '.join(helped)} inconclusive: evaluate {_limit_text(upcoming)} per task")


def _limit_text(limit: int | None) -> str:
    return "the whole split" if limit is None else f"{limit} questions"
