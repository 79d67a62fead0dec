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


def _evaluation(base_acc=0.50, quant_acc=0.49, base_ppl=20.0, quant_ppl=21.0, completion_ppl=(3.0,), paired=None,
                mean_kl=0.02, top1=0.93) -> dict:
    return {
        "tasks": {"arc_easy": {"base": {"acc": base_acc, "samples": 200}, "quantized": {"acc": quant_acc, "samples": 200},
                               "paired": paired}},
        "perplexity": {"base": base_ppl, "quantized": quant_ppl},
        "divergence": {"tokens": 5000, "mean_kl": mean_kl, "p99_kl": 0.3, "max_kl": 1.2, "top1_agreement": top1},
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
                     max_accuracy_drop=0.02, max_mean_kl=0.01, min_top1_agreement=0.95)
    paired = {"accuracy_drop": 0.01, "drop_ci_high": 0.05, "mcnemar_p_value": 0.6}
    report = gate.gate(recipe, _facts(), _evaluation(paired=paired), tmp_path)
    assert report["verdict"] == "fail"
    assert report["failed_rules"] == [
        "min_recovery[arc_easy]", "max_accuracy_drop[arc_easy]", "max_perplexity_ratio",
        "max_mean_kl", "min_top1_agreement", "max_export_size_ratio", "max_peak_memory_gb",
    ]


def test_divergence_rules_report_figure_threshold_and_fail_closed(tmp_path):
    report = gate.gate(_recipe(), _facts(), _evaluation(mean_kl=0.5, top1=0.6), tmp_path)
    kl = next(rule for rule in report["rules"] if rule["rule"] == "max_mean_kl")
    assert (kl["figure"], kl["threshold"], kl["passed"]) == (0.5, 0.05, False)
    assert "5000 held-out tokens" in kl["detail"] and "p99 0.3" in kl["detail"]
    assert report["failed_rules"] == ["max_mean_kl", "min_top1_agreement"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| max_mean_kl | 0.5 | 0.05 | **FAIL** |" in markdown
    assert "## Token divergence from the base (5000 held-out tokens)" in markdown

    evaluation = _evaluation()
    evaluation["divergence"] = {"tokens": 5000, "mean_kl": None, "top1_agreement": None}  # infinite KL -> None
    missing = gate.gate(_recipe(), _facts(), evaluation, tmp_path)
    assert missing["failed_rules"] == ["max_mean_kl", "min_top1_agreement"]


def test_divergence_rules_follow_the_recipe(tmp_path):
    no_text = Recipe.model_validate({
        "name": "t", "model": {"source": "builtin:smollm2-135m-instruct"},
        "quantization": {"scheme": "int8_per_channel"}, "evaluation": {"divergence_text": None},
    })
    evaluation = _evaluation()
    del evaluation["divergence"]
    rules = [rule["rule"] for rule in gate.gate(no_text, _facts(), evaluation, tmp_path)["rules"]]
    assert "max_mean_kl" not in rules and "min_top1_agreement" not in rules
    switched_off = _recipe(max_mean_kl=None, min_top1_agreement=None)
    assert gate.gate(switched_off, _facts(), evaluation, tmp_path)["verdict"] == "pass"


def test_gate_writes_the_accuracy_plot(tmp_path):
    gate.gate(_recipe(), _facts(), _evaluation(), tmp_path)
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "![per-task accuracy" in (tmp_path / "report.md").read_text()


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
    assert set(report["failed_rules"]) == {
        "min_recovery[arc_easy]", "max_perplexity_ratio", "max_mean_kl", "min_top1_agreement", "no_garbage",
    }
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
    recipe = _recipe(min_recovery=None, max_perplexity_ratio=None, no_garbage=False, max_mean_kl=None,
                     min_top1_agreement=None)
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
    (runs[0] / "accuracy.png").unlink()
    rendered = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", str(runs[0])],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
    assert rendered.returncode == 0 and (runs[0] / "report.md").read_text() == rendered.stdout
    assert (runs[0] / "accuracy.png").is_file()  # re-rendered too
    assert "| min_recovery[arc_easy] | 0.98 | 0.97 | pass |" in rendered.stdout
    compared = subprocess.run([sys.executable, "-m", "pipeline.cli", "compare", *map(str, runs)],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
    assert compared.returncode == 0
    assert "| verdict | pass | fail |" in compared.stdout
    assert "| min_recovery[arc_easy] | 0.98 pass | 0.6 **FAIL** |" in compared.stdout
    assert report["verdict"] == "fail"
