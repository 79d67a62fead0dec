"""Gate rules on hand-made figures; fail closed when a figure is missing."""

from __future__ import annotations

import json

from pipeline.recipe import Recipe
from pipeline.stages import gate

SANE = [{"prompt": "The capital of France is", "completion": " Paris. It is also the largest city in France."}]
SALAD = [{"prompt": "The capital of France is", "completion": " isrytyusa Tracebackussippi Tracebackussippi"}]
LOOP = [{"prompt": "The capital of France is", "completion": " the the the the the the the the the the the the the"}]


def _recipe(**gates) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "model": {"source": "builtin:smollm2-135m-instruct"},
        "quantization": {"scheme": "int8_per_channel"}, "gates": gates,
    })


def _evaluation(base_acc=0.50, quant_acc=0.49, base_ppl=20.0, quant_ppl=21.0, completion_ppl=(3.0,), paired=None) -> dict:
    return {
        "tasks": {"arc_easy": {"base": {"acc": base_acc}, "quantized": {"acc": quant_acc}, "paired": paired}},
        "perplexity": {"base": base_ppl, "quantized": quant_ppl},
        "completion_perplexities_under_base": list(completion_ppl),
    }


def _facts(completions=SANE, size_ratio=0.6, peak_mb=4096.0) -> dict:
    return {"serve": {"completions": completions, "peak_rss_mb": peak_mb}, "export": {"size_ratio": size_ratio}}


def test_good_figures_pass_and_reports_are_written(tmp_path):
    report = gate.gate(_recipe(min_recovery=0.97, max_perplexity_ratio=1.10), _facts(), _evaluation(), tmp_path)
    assert report["verdict"] == "pass" and report["failed_rules"] == []
    recovery = next(rule for rule in report["rules"] if rule["rule"] == "min_recovery[arc_easy]")
    assert recovery["figure"] == 0.98
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] == "pass"
    assert "| min_recovery[arc_easy] | 0.98 | 0.97 | pass |" in (tmp_path / "report.md").read_text()


def test_each_rule_can_fail(tmp_path):
    recipe = _recipe(min_recovery=0.99, max_perplexity_ratio=1.02, max_export_size_ratio=0.5, max_peak_memory_gb=2,
                     max_accuracy_drop=0.02)
    paired = {"accuracy_drop": 0.01, "drop_ci_high": 0.05, "mcnemar_p_value": 0.6}
    report = gate.gate(recipe, _facts(), _evaluation(paired=paired), tmp_path)
    assert report["verdict"] == "fail"
    assert report["failed_rules"] == [
        "min_recovery[arc_easy]", "max_accuracy_drop[arc_easy]", "max_perplexity_ratio",
        "max_export_size_ratio", "max_peak_memory_gb",
    ]


def test_word_salad_is_garbage_by_the_base_models_perplexity(tmp_path):
    report = gate.gate(_recipe(), _facts(SALAD), _evaluation(completion_ppl=(5000.0,)), tmp_path)
    rule = next(rule for rule in report["rules"] if rule["rule"] == "no_garbage")
    assert report["verdict"] == "fail" and rule["verdict"] == "garbage"
    assert "Tracebackussippi" in rule["worst_sample"]["text"]
    assert "perplexity" in rule["detail"]


def test_repetition_loop_is_garbage(tmp_path):
    report = gate.gate(_recipe(), _facts(LOOP), _evaluation(completion_ppl=(2.0,)), tmp_path)
    assert "no_garbage" in report["failed_rules"]


def test_missing_figures_fail_closed(tmp_path):
    report = gate.gate(_recipe(), {}, {}, tmp_path)
    assert report["verdict"] == "fail"
    assert set(report["failed_rules"]) == {"min_recovery[arc_easy]", "max_perplexity_ratio", "no_garbage"}
    numeric = [rule for rule in report["rules"] if rule["rule"] != "no_garbage"]
    assert all("fails closed" in rule["detail"] for rule in numeric)


def test_missing_completion_perplexities_fail_closed(tmp_path):
    evaluation = _evaluation()
    evaluation["completion_perplexities_under_base"] = None
    report = gate.gate(_recipe(), _facts(), evaluation, tmp_path)
    assert report["failed_rules"] == ["no_garbage"]


def test_zero_base_accuracy_cannot_pass(tmp_path):
    report = gate.gate(_recipe(), _facts(), _evaluation(base_acc=0.0, quant_acc=0.0), tmp_path)
    assert "min_recovery[arc_easy]" in report["failed_rules"]


def test_no_rules_is_not_a_pass(tmp_path):
    recipe = _recipe(min_recovery=None, max_perplexity_ratio=None, no_garbage=False)
    report = gate.gate(recipe, _facts(), _evaluation(), tmp_path)
    assert report["verdict"] == "fail"


def test_report_and_compare_commands(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    runs = []
    for name, quant_acc in (("good", 0.49), ("bad", 0.30)):
        run_dir = tmp_path / "exports" / name / "run1"
        run_dir.mkdir(parents=True)
        report = gate.gate(_recipe(), _facts(), _evaluation(quant_acc=quant_acc), run_dir)
        (run_dir / "report.md").write_text("stale")
        runs.append(run_dir)
    rendered = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", str(runs[0])],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
    assert rendered.returncode == 0 and (runs[0] / "report.md").read_text() == rendered.stdout
    assert "| min_recovery[arc_easy] | 0.98 | 0.97 | pass |" in rendered.stdout
    compared = subprocess.run([sys.executable, "-m", "pipeline.cli", "compare", *map(str, runs)],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
    assert compared.returncode == 0
    assert "| verdict | pass | fail |" in compared.stdout
    assert "| min_recovery[arc_easy] | 0.98 pass | 0.6 **FAIL** |" in compared.stdout
    assert report["verdict"] == "fail"
