"""gate: apply the recipe's thresholds to the evaluation figures; write the report.

Fail closed: a rule whose figure is missing (evaluation did not run, a task
crashed, a base accuracy of zero) fails; it never passes by default.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import metrics
from pipeline.recipe import Recipe
from pipeline.plot import write_accuracy_plot
from pipeline.report import ACCURACY_PLOT, render_markdown

REPORT_SCHEMA_VERSION = 1


def _rule(name: str, figure: float | None, threshold: float, passed: bool, detail: str) -> dict:
    return {
        "rule": name,
        "figure": None if figure is None else round(figure, 6),
        "threshold": threshold,
        "passed": bool(passed and figure is not None),
        "detail": detail if figure is not None else detail + " (figure missing: fails closed)",
    }


def evaluate_rules(recipe: Recipe, evaluation: dict, run_facts: dict | None = None) -> list[dict]:
    gates = recipe.gates
    run_facts = run_facts or {}
    rules = []
    for task in recipe.evaluation.tasks:
        figures = evaluation.get("tasks", {}).get(task, {})
        base, quantized = figures.get("base", {}).get("acc"), figures.get("quantized", {}).get("acc")
        if gates.min_recovery is not None:
            recovery = quantized / base if base and quantized is not None else None
            rules.append(_rule(
                f"min_recovery[{task}]", recovery, gates.min_recovery,
                recovery is not None and recovery >= gates.min_recovery, f"acc {quantized} / base {base}",
            ))
        if gates.max_accuracy_drop is not None:
            paired = figures.get("paired") or {}
            upper = paired.get("drop_ci_high")
            rules.append(_rule(
                f"max_accuracy_drop[{task}]", upper, gates.max_accuracy_drop,
                upper is not None and upper <= gates.max_accuracy_drop,
                f"drop {paired.get('accuracy_drop')}, 95% paired interval upper bound (McNemar p {paired.get('mcnemar_p_value')})",
            ))
    if gates.max_perplexity_ratio is not None and recipe.evaluation.perplexity_text is not None:
        figures = evaluation.get("perplexity", {})
        base, quantized = figures.get("base"), figures.get("quantized")
        ratio = quantized / base if base and quantized is not None else None
        rules.append(_rule(
            "max_perplexity_ratio", ratio, gates.max_perplexity_ratio,
            ratio is not None and ratio <= gates.max_perplexity_ratio, f"word perplexity {quantized} / base {base}",
        ))
    if recipe.evaluation.divergence_text is not None:
        rules += _divergence_rules(recipe, evaluation.get("divergence") or {})
    if gates.no_garbage:
        rules.append(_garbage_rule(recipe, evaluation, run_facts))
    if gates.max_export_size_ratio is not None:
        ratio = run_facts.get("export", {}).get("size_ratio")
        rules.append(_rule(
            "max_export_size_ratio", ratio, gates.max_export_size_ratio,
            ratio is not None and ratio <= gates.max_export_size_ratio, "export safetensors / base safetensors",
        ))
    if gates.max_peak_memory_gb is not None:
        peak_mb = run_facts.get("serve", {}).get("peak_rss_mb")
        peak_gb = peak_mb / 1024 if peak_mb is not None else None
        rules.append(_rule(
            "max_peak_memory_gb", peak_gb, gates.max_peak_memory_gb,
            peak_gb is not None and peak_gb <= gates.max_peak_memory_gb, "peak RSS of the vLLM process tree while serving",
        ))
    return rules


def _divergence_rules(recipe: Recipe, figures: dict) -> list[dict]:
    gates = recipe.gates
    where = f"over {figures.get('tokens')} held-out tokens"
    rules = []
    if gates.max_mean_kl is not None:
        mean_kl = figures.get("mean_kl")
        rules.append(_rule(
            "max_mean_kl", mean_kl, gates.max_mean_kl, mean_kl is not None and mean_kl <= gates.max_mean_kl,
            f"mean KL(base || quantized) of next-token distributions, nats, {where} "
            f"(p99 {metrics.rounded(figures.get('p99_kl'))}, max {metrics.rounded(figures.get('max_kl'))})",
        ))
    if gates.min_top1_agreement is not None:
        agreement = figures.get("top1_agreement")
        rules.append(_rule(
            "min_top1_agreement", agreement, gates.min_top1_agreement,
            agreement is not None and agreement >= gates.min_top1_agreement,
            f"share of next tokens whose most likely value is unchanged, {where}",
        ))
    return rules


def _garbage_rule(recipe: Recipe, evaluation: dict, run_facts: dict) -> dict:
    """Generation sanity: one garbage completion fails the gate; the report shows the worst one."""
    gates = recipe.gates
    completions = [item["completion"] for item in run_facts.get("serve", {}).get("completions", [])]
    perplexities = evaluation.get("completion_perplexities_under_base")
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
    rule["verdict"] = "garbage" if verdict["garbage"] else "sane"
    rule["worst_sample"] = worst
    return rule


def gate(recipe: Recipe, run_facts: dict, evaluation: dict, out_dir: Path) -> dict:
    """Write report.json and report.md into out_dir; return the report."""
    rules = evaluate_rules(recipe, evaluation, run_facts)
    passed = bool(rules) and all(rule["passed"] for rule in rules)
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "recipe": recipe.name,
        "scheme": recipe.scheme.name,
        "verdict": "pass" if passed else "fail",
        "failed_rules": [rule["rule"] for rule in rules if not rule["passed"]],
        "rules": rules,
        "evaluation": evaluation,
        **run_facts,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    write_accuracy_plot(report, out_dir / ACCURACY_PLOT)
    return report
