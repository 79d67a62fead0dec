"""gate: apply the recipe's thresholds to the evaluation figures; write the report.

Every rule measured on a sample (accuracy on questions, perplexity on documents, KL and
top-1 on paragraphs) is judged on the interval of its figure, not on the point figure:
pass when the whole interval is on the good side of the threshold, fail when it is
wholly on the bad side, inconclusive otherwise (more evidence would decide it). The
accuracy rules' intervals are at the per-look confidence of the planned rounds
(quantize_pipeline/verdict/sequential.py). Deterministic rules (no_garbage, size, memory) pass or fail.

Fail closed: a rule whose figure is missing (evaluation did not run, a task
crashed, a base accuracy of zero) fails; it never passes by default.
"""

from __future__ import annotations

import math
from pathlib import Path

from quantize_pipeline.evaluate.record import Divergence, Evaluation, PairedComparison
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.verdict import metrics, sequential
from quantize_pipeline.verdict.evidence import Interval, PerToken, perplexity_ratio_interval
from quantize_pipeline.verdict.plot import write_accuracy_plot
from quantize_pipeline.verdict.record import REPORT_SCHEMA_VERSION, GateRounds, Report, Round, Rule, RuleState, Verdict
from quantize_pipeline.verdict.report import ACCURACY_PLOT, render_markdown
from quantize_pipeline.verdict.run_facts import RunFacts


def _rule(name: str, figure: float | None, threshold: float, passed: bool, detail: str) -> Rule:
    """A deterministic rule (no sampling noise): pass or fail."""
    state = RuleState.PASS if passed and figure is not None else RuleState.FAIL
    return Rule(
        rule=name,
        figure=None if figure is None else round(figure, 6),
        threshold=threshold,
        state=state,
        passed=state == RuleState.PASS,
        interval=None,
        detail=detail if figure is not None else detail + " (figure missing: fails closed)",
    )


def _judged(name: str, interval: Interval | None, threshold: float, good_side: str, confidence: float,
            detail: str, figure: float | None = None) -> Rule:
    """A rule judged on the interval of its figure: pass when the whole interval is on the good
    side of the threshold, fail when it is wholly on the bad side, inconclusive otherwise.
    good_side "above" (min_ rules, the threshold itself is good) or "below" (max_ rules).
    Without an interval (figure or its per-sample evidence missing) it never passes: fail when
    the figure is missing or on the bad side, inconclusive when only the interval is missing."""
    if interval is None:
        bad = figure is None or (figure < threshold if good_side == "above" else figure > threshold)
        rule = _rule(name, figure, threshold, False, detail + ("" if figure is None else " (no per-sample evidence"
                                                                 " for an interval: never passes)"))
        rule.state = RuleState.FAIL if bad else RuleState.INCONCLUSIVE
        return rule
    low, high = interval.low, interval.high
    if good_side == "above":
        state = RuleState.PASS if low >= threshold else RuleState.FAIL if high < threshold else RuleState.INCONCLUSIVE
    else:
        state = RuleState.PASS if high <= threshold else RuleState.FAIL if low > threshold else RuleState.INCONCLUSIVE
    rule = Rule(
        rule=name,
        figure=_round(interval.figure),
        threshold=threshold,
        state=state,
        passed=state == RuleState.PASS,
        interval=(_round(low), _round(high)),
        confidence=round(confidence, 6),
        samples=interval.samples,
        unit=interval.unit,
        detail=detail,
    )
    if state == RuleState.INCONCLUSIVE and all(math.isfinite(value) for value in (interval.figure, low, high)):
        total = sequential.questions_to_decide(interval.figure, low, high, threshold, interval.samples)
        rule.more_samples_to_decide = None if total is None else total - interval.samples
    return rule


def _round(value: float) -> float:
    return round(value, 6) if math.isfinite(value) else value


def accuracy_confidence(recipe: Recipe, evaluation: Evaluation) -> tuple[float, int]:
    """(per-look confidence, planned looks) for the accuracy rules: the planned rounds share alpha."""
    planned = evaluation.sequential.looks_planned if evaluation.sequential else None
    if planned is None:
        spec = recipe.evaluation
        planned = len(sequential.round_schedule(spec.limit, spec.max_limit))
    return 1.0 - sequential.per_look_alpha(planned, recipe.gates.alpha), planned


def _paired_at(paired: PairedComparison | None, confidence: float) -> PairedComparison | None:
    """The paired comparison redone at this confidence from its counts (sufficient statistics)."""
    if paired is None or paired.questions is None:
        return None
    questions, b, c = paired.questions, paired.b, paired.c
    both_right = paired.both_right
    if both_right is None:  # reports written before both_right was recorded
        both_right = round(paired.base_accuracy * questions) - b
    return PairedComparison.model_validate(
        metrics.paired_comparison_from_counts(both_right, b, c, questions - both_right - b - c, confidence=confidence))


def evaluate_rules(recipe: Recipe, evaluation: Evaluation, facts: RunFacts, evidence_dir: Path | None = None) -> list[Rule]:
    """Every rule of the recipe's gates: the evaluation's, then the export's size and the serving memory."""
    return evaluation_rules(recipe, evaluation, facts.completions, evidence_dir) + resource_rules(recipe, facts)


def evaluation_rules(recipe: Recipe, evaluation: Evaluation, completions: list[str],
                     evidence_dir: Path | None = None) -> list[Rule]:
    """The rules more questions can decide (accuracy) or that evaluate measured (perplexity, divergence),
    and the garbage check of serve's completions: what the gate's sequential rounds look at."""
    gates = recipe.gates
    rules = []
    confidence, _ = accuracy_confidence(recipe, evaluation)
    for task in recipe.evaluation.tasks:
        figures = evaluation.tasks.get(task)
        paired = _paired_at(figures.paired if figures else None, confidence)
        base, quantized = (figures.base.acc, figures.quantized.acc) if figures else (None, None)
        questions = paired.questions if paired else None
        if gates.min_recovery is not None:
            interval = None
            if paired and paired.recovery is not None:
                interval = Interval(paired.recovery, paired.recovery_ci_low, paired.recovery_ci_high,
                                    questions, "questions")
            rules.append(_judged(
                f"min_recovery[{task}]", interval, gates.min_recovery, "above", confidence,
                f"acc {metrics.rounded(quantized)} / base {metrics.rounded(base)}, paired bootstrap over questions",
            ))
        if gates.max_accuracy_drop is not None:
            interval = None
            if paired:
                interval = Interval(paired.accuracy_drop, paired.drop_ci_low, paired.drop_ci_high,
                                    questions, "questions")
            rules.append(_judged(
                f"max_accuracy_drop[{task}]", interval, gates.max_accuracy_drop, "below", confidence,
                f"base acc - quantized acc, paired bootstrap over questions"
                f" (McNemar p {metrics.rounded(paired.mcnemar_p_value) if paired else None})",
            ))
    one_look = 1.0 - gates.alpha  # held-out text is the same in every round: one look
    if gates.max_perplexity_ratio is not None and recipe.evaluation.perplexity_text is not None:
        base, quantized = (evaluation.perplexity.base, evaluation.perplexity.quantized) if evaluation.perplexity else (None, None)
        ratio = quantized / base if base and quantized is not None else None
        interval = None
        if evidence_dir is not None and ratio is not None:
            interval = perplexity_ratio_interval(evidence_dir, recipe.evaluation.perplexity_text, confidence=one_look)
        rules.append(_judged(
            "max_perplexity_ratio", interval, gates.max_perplexity_ratio, "below", one_look,
            f"word perplexity {metrics.rounded(quantized)} / base {metrics.rounded(base)}, bootstrap over documents",
            figure=ratio,
        ))
    if recipe.evaluation.divergence_text is not None:
        per_token = PerToken.load(evidence_dir) if evidence_dir is not None else None
        rules += _divergence_rules(recipe, evaluation.divergence or Divergence(), per_token, one_look)
    if gates.no_garbage:
        rules.append(_garbage_rule(recipe, evaluation, completions))
    return rules


def resource_rules(recipe: Recipe, facts: RunFacts) -> list[Rule]:
    """The export's size and the memory it was served in: settled before evaluate, no round changes them."""
    gates = recipe.gates
    rules = []
    if gates.max_export_size_ratio is not None:
        ratio = facts.export.size_ratio
        rules.append(_rule(
            "max_export_size_ratio", ratio, gates.max_export_size_ratio,
            ratio is not None and ratio <= gates.max_export_size_ratio, "export safetensors / base safetensors",
        ))
    if gates.max_peak_memory_gb is not None:
        peak_mb = facts.serve_peak_rss_mb
        peak_gb = peak_mb / 1024 if peak_mb is not None else None
        rules.append(_rule(
            "max_peak_memory_gb", peak_gb, gates.max_peak_memory_gb,
            peak_gb is not None and peak_gb <= gates.max_peak_memory_gb, "peak RSS of the vLLM process tree while serving",
        ))
    return rules


def _divergence_rules(recipe: Recipe, figures: Divergence, per_token: PerToken | None, confidence: float) -> list[Rule]:
    gates = recipe.gates
    where = f"over {figures.tokens} held-out tokens, bootstrap over paragraphs (their tokens are correlated)"
    rules = []
    if gates.max_mean_kl is not None:
        mean_kl = figures.mean_kl
        interval = per_token.mean_kl_interval(confidence=confidence) if per_token is not None else None
        rules.append(_judged(
            "max_mean_kl", interval, gates.max_mean_kl, "below", confidence,
            f"mean KL(base || quantized) of next-token distributions, nats, {where} "
            f"(p99 {metrics.rounded(figures.p99_kl)}, max {metrics.rounded(figures.max_kl)})",
            figure=mean_kl,
        ))
    if gates.min_top1_agreement is not None:
        agreement = figures.top1_agreement
        interval = per_token.top1_interval(confidence=confidence) if per_token is not None else None
        rules.append(_judged(
            "min_top1_agreement", interval, gates.min_top1_agreement, "above", confidence,
            f"share of next tokens whose most likely value is unchanged, {where}", figure=agreement,
        ))
    return rules


def _garbage_rule(recipe: Recipe, evaluation: Evaluation, completions: list[str]) -> Rule:
    """Generation sanity: one garbage completion fails the gate; the report shows the worst one."""
    gates = recipe.gates
    perplexities = evaluation.completion_perplexities_under_base
    use_perplexity = gates.garbage_max_completion_perplexity is not None and perplexities is not None
    verdict = metrics.garbage_verdict(
        completions,
        base_perplexity_of_completions=perplexities if use_perplexity else None,
        max_repetition_rate=gates.garbage_max_repetition_rate,
        max_non_printable_share=gates.garbage_max_non_printable_share,
        max_completion_perplexity=gates.garbage_max_completion_perplexity if use_perplexity else None,
    )
    worst = verdict["worst_sample"] or {}
    detail = "; ".join(verdict["reasons"][:3]) or "all completions sane"
    if worst:
        detail += f"; worst sample: {worst['text'][:80]!r}"
    if gates.garbage_max_completion_perplexity is not None and perplexities is None:
        verdict["garbage"] = True  # fail closed: the perplexity check was asked for and did not run
        detail = "base-model perplexity of the completions missing; " + detail
    rule = _rule("no_garbage", 0.0 if verdict["garbage"] else 1.0, 1.0, not verdict["garbage"], detail)
    rule.verdict = "garbage" if verdict["garbage"] else "sane"
    rule.worst_sample = worst
    return rule


def verdict_of(rules: list[Rule]) -> Verdict:
    """fail if any rule failed; inconclusive if any is undecided; pass only when every rule passed (and there is one)."""
    states = {rule.state for rule in rules}
    if not rules or RuleState.FAIL in states:
        return Verdict.FAIL
    return Verdict.INCONCLUSIVE if RuleState.INCONCLUSIVE in states else Verdict.PASS


def gate(recipe: Recipe, facts: RunFacts, evaluation: Evaluation, out_dir: Path,
         evidence_dir: Path | None = None) -> Report:
    """Write report.json and report.md into out_dir; return the report.

    evidence_dir: the evaluate stage's folder (per-question and per-token files the
    intervals are drawn from); default: the run directory's evaluate/ beside out_dir.
    """
    if evidence_dir is None:
        evidence_dir = out_dir.parent / "evaluate"
    rules = evaluate_rules(recipe, evaluation, facts, evidence_dir)
    confidence, looks = accuracy_confidence(recipe, evaluation)
    rounds = evaluation.sequential.rounds if evaluation.sequential else [Round(limit=evaluation.limits)]
    report = Report(
        schema_version=REPORT_SCHEMA_VERSION,
        recipe=recipe.name,
        scheme=recipe.scheme.name,
        verdict=verdict_of(rules),
        failed_rules=[rule.rule for rule in rules if rule.state == RuleState.FAIL],
        inconclusive_rules=[rule.rule for rule in rules if rule.state == RuleState.INCONCLUSIVE],
        rules=rules,
        sequential=GateRounds(looks_planned=looks, alpha=recipe.gates.alpha,
                              accuracy_confidence_per_look=round(confidence, 6), rounds=rounds),
        evaluation=evaluation,
        **facts.to_json(),
    )
    report.write(out_dir / "report.json")
    (out_dir / "report.md").write_text(render_markdown(report))
    write_accuracy_plot(report, out_dir / ACCURACY_PLOT)
    return report
