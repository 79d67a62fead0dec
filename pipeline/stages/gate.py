"""gate: apply the recipe's thresholds to the evaluation figures; write the report.

Fail closed: a rule whose figure is missing (evaluation did not run, a task
crashed, a base accuracy of zero) fails; it never passes by default.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.recipe import Recipe
from pipeline.report import render_markdown

REPORT_SCHEMA_VERSION = 1


def _rule(name: str, figure: float | None, threshold: float, passed: bool, detail: str) -> dict:
    return {
        "rule": name,
        "figure": None if figure is None else round(figure, 6),
        "threshold": threshold,
        "passed": bool(passed and figure is not None),
        "detail": detail if figure is not None else detail + " (figure missing: fails closed)",
    }


def evaluate_rules(recipe: Recipe, evaluation: dict) -> list[dict]:
    gates = recipe.gates
    rules = []
    if gates.min_recovery is not None:
        for task in recipe.evaluation.tasks:
            figures = evaluation.get("tasks", {}).get(task, {})
            base, quantized = figures.get("base", {}).get("acc"), figures.get("quantized", {}).get("acc")
            recovery = quantized / base if base and quantized is not None else None
            rules.append(
                _rule(
                    f"min_recovery[{task}]", recovery, gates.min_recovery,
                    recovery is not None and recovery >= gates.min_recovery,
                    f"acc {quantized} / base {base}",
                )
            )
    if gates.max_perplexity_ratio is not None and recipe.evaluation.perplexity_text is not None:
        figures = evaluation.get("perplexity", {})
        base, quantized = figures.get("base"), figures.get("quantized")
        ratio = quantized / base if base and quantized is not None else None
        rules.append(
            _rule(
                "max_perplexity_ratio", ratio, gates.max_perplexity_ratio,
                ratio is not None and ratio <= gates.max_perplexity_ratio,
                f"word perplexity {quantized} / base {base}",
            )
        )
    return rules


def gate(recipe: Recipe, run_facts: dict, evaluation: dict, out_dir: Path) -> dict:
    """Write report.json and report.md into out_dir; return the report."""
    rules = evaluate_rules(recipe, evaluation)
    passed = bool(rules) and all(rule["passed"] for rule in rules)
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "recipe": recipe.name,
        "scheme": recipe.quantization.scheme,
        "verdict": "pass" if passed else "fail",
        "failed_rules": [rule["rule"] for rule in rules if not rule["passed"]],
        "rules": rules,
        "evaluation": evaluation,
        **run_facts,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    return report
