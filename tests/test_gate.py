"""Gate rules on hand-made figures; fail closed when a figure is missing."""

from __future__ import annotations

import json

from pipeline.recipe import Recipe
from pipeline.stages import gate


def _recipe(**gates) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "model": {"source": "builtin:smollm2-135m-instruct"},
        "quantization": {"scheme": "int8_per_channel"}, "gates": gates,
    })


def _evaluation(base_acc=0.50, quant_acc=0.49, base_ppl=20.0, quant_ppl=21.0) -> dict:
    return {
        "tasks": {"arc_easy": {"base": {"acc": base_acc}, "quantized": {"acc": quant_acc}}},
        "perplexity": {"base": base_ppl, "quantized": quant_ppl},
    }


def test_good_figures_pass_and_reports_are_written(tmp_path):
    report = gate.gate(_recipe(min_recovery=0.97, max_perplexity_ratio=1.10), {}, _evaluation(), tmp_path)
    assert report["verdict"] == "pass" and report["failed_rules"] == []
    recovery = next(rule for rule in report["rules"] if rule["rule"] == "min_recovery[arc_easy]")
    assert recovery["figure"] == 0.98
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] == "pass"
    assert "| min_recovery[arc_easy] | 0.98 | 0.97 | pass |" in (tmp_path / "report.md").read_text()


def test_each_rule_can_fail(tmp_path):
    report = gate.gate(_recipe(min_recovery=0.99, max_perplexity_ratio=1.02), {}, _evaluation(), tmp_path)
    assert report["verdict"] == "fail"
    assert report["failed_rules"] == ["min_recovery[arc_easy]", "max_perplexity_ratio"]


def test_missing_figures_fail_closed(tmp_path):
    report = gate.gate(_recipe(), {}, {}, tmp_path)
    assert report["verdict"] == "fail"
    assert all("fails closed" in rule["detail"] for rule in report["rules"])


def test_zero_base_accuracy_cannot_pass(tmp_path):
    report = gate.gate(_recipe(), {}, _evaluation(base_acc=0.0, quant_acc=0.0), tmp_path)
    assert "min_recovery[arc_easy]" in report["failed_rules"]


def test_no_rules_is_not_a_pass(tmp_path):
    report = gate.gate(_recipe(min_recovery=None, max_perplexity_ratio=None), {}, _evaluation(), tmp_path)
    assert report["verdict"] == "fail"
