"""Gate rules on hand-made figures; fail closed when a figure is missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantize_pipeline.evaluate.record import Evaluation
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.verdict import gate
from quantize_pipeline.verdict.record import Report
from quantize_pipeline.verdict.run_facts import EngineLabel, ExportSize, RunFacts

SANE = [{"prompt": "The capital of France is", "completion": " Paris. It is also the largest city in France."}]
SALAD = [{"prompt": "The capital of France is", "completion": " isrytyusa Tracebackussippi Tracebackussippi"}]
LOOP = [{"prompt": "The capital of France is", "completion": " the the the the the the the the the the the the the"}]


def _recipe(**gates) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "model": {"source": "builtin:smollm2-135m-instruct"},
        "quantization": {"scheme": "int8_per_channel"}, "gates": gates,
    })


def _paired(questions=1000, base_acc=0.50, quant_acc=0.49, flips=20) -> dict:
    """Paired counts as the evaluate stage records them: `flips` discordant questions around the net change."""
    base_right, quant_right = round(base_acc * questions), round(quant_acc * questions)
    flips = max(flips, abs(base_right - quant_right))
    b = (flips + base_right - quant_right) // 2  # base right, quantized wrong
    c = b - (base_right - quant_right)
    return {"questions": questions, "b": b, "c": c, "both_right": base_right - b, "base_accuracy": base_right / questions}


def _evaluation(base_acc=0.50, quant_acc=0.49, base_ppl=20.0, quant_ppl=21.0, completion_ppl=(3.0,), paired="auto",
                mean_kl=0.02, top1=0.93) -> dict:
    if paired == "auto":
        paired = _paired(base_acc=base_acc, quant_acc=quant_acc) if base_acc > 0 else None
    return {
        "tasks": {"arc_easy": {"base": {"acc": base_acc, "samples": 200}, "quantized": {"acc": quant_acc, "samples": 200},
                               "paired": paired}},
        "perplexity": {"base": base_ppl, "quantized": quant_ppl},
        "divergence": {"tokens": 5000, "mean_kl": mean_kl, "p99_kl": 0.3, "max_kl": 1.2, "top1_agreement": top1},
        "completion_perplexities_under_base": list(completion_ppl),
    }


def _evidence(folder: Path, *, ppl_ratio=1.05, mean_kl=0.02, top1=0.93, paragraphs=32, tokens=160, spread=0.2) -> Path:
    """An evaluate/ folder: per-document [loglik, words] of both models and per-token KL / top-1 flags,
    with paragraph-to-paragraph spread like the real held-out text's."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"base": [], "quantized": []}
    for doc in range(40):
        words = int(rng.integers(80, 200))
        base_ll = -3.0 * words * (1 + spread * rng.standard_normal() / 4)
        shift = np.log(ppl_ratio) * words * (1 + spread * rng.standard_normal())
        rows["base"].append({"task": "wikipedia-heldout", "doc_id": doc, "value": [base_ll, words]})
        rows["quantized"].append({"task": "wikipedia-heldout", "doc_id": doc, "value": [base_ll - shift, words]})
    for role, lines in rows.items():
        (folder / f"{role}-samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))
    kl, agree = [], []
    for _ in range(paragraphs):
        level = mean_kl * max(0.0, 1 + spread * rng.standard_normal())
        kl += rng.exponential(level, tokens).tolist() if level > 0 else [0.0] * tokens
        agree += (rng.random(tokens) < min(1.0, top1 + spread * 0.1 * rng.standard_normal())).astype(int).tolist()
    (folder / "divergence-per-token.json").write_text(json.dumps(
        {"kl": kl, "top1_agree": agree, "positions_per_text": [tokens] * paragraphs}))
    return folder


def _judge(recipe, facts, evaluation: dict, out: Path, evidence_dir: Path | None = None) -> Report:
    """The gate on hand-made evaluation figures (evaluate.json's form)."""
    return gate.gate(recipe, facts, Evaluation.model_validate(evaluation), out, evidence_dir=evidence_dir)


def _gate(recipe, facts, evaluation, tmp_path, **evidence) -> Report:
    out = tmp_path / "gate"
    out.mkdir(exist_ok=True)
    return _judge(recipe, facts, evaluation, out, evidence_dir=_evidence(tmp_path / "evaluate", **evidence))


def _facts(completions=SANE, size_ratio=0.6, peak_mb=4096.0) -> RunFacts:
    return RunFacts(run_dir="run", base_model={"source": "builtin:smollm2-135m-instruct", "path": "base", "sha256": "0"},
                    export=ExportSize(int(size_ratio * 1000), 1000, size_ratio),
                    serve={"completions": completions, "peak_rss_mb": peak_mb},
                    engine=EngineLabel("vllm", "vllm"), packages={})


def test_good_figures_pass_and_reports_are_written(tmp_path):
    report = _gate(_recipe(min_recovery=0.90, max_perplexity_ratio=1.10), _facts(), _evaluation(), tmp_path)
    assert report.verdict == "pass" and report.failed_rules == [] and report.inconclusive_rules == []
    recovery = next(rule for rule in report.rules if rule.rule == "min_recovery[arc_easy]")
    assert recovery.figure == 0.98 and recovery.samples == 1000 and recovery.unit == "questions"
    assert 0.90 <= recovery.interval[0] < 0.98 < recovery.interval[1]
    assert json.loads((tmp_path / "gate" / "report.json").read_text())["verdict"] == "pass"
    assert "| min_recovery[arc_easy] | 0.98 | [" in (tmp_path / "gate" / "report.md").read_text()


def test_each_rule_can_fail(tmp_path):
    recipe = _recipe(min_recovery=0.99, max_perplexity_ratio=1.02, max_export_size_ratio=0.5, max_peak_memory_gb=2,
                     max_accuracy_drop=0.005, max_mean_kl=0.01, min_top1_agreement=0.97)
    evaluation = _evaluation(base_acc=0.50, quant_acc=0.45, mean_kl=0.05, top1=0.80)
    report = _gate(recipe, _facts(), evaluation, tmp_path, ppl_ratio=1.3, mean_kl=0.05, top1=0.80)
    assert report.verdict == "fail"
    assert report.failed_rules == [
        "min_recovery[arc_easy]", "max_accuracy_drop[arc_easy]", "max_perplexity_ratio",
        "max_mean_kl", "min_top1_agreement", "max_export_size_ratio", "max_peak_memory_gb",
    ]


def test_a_threshold_inside_the_interval_is_inconclusive_with_a_sample_estimate(tmp_path):
    # recovery 0.98 on 1000 questions, 20 discordant: the interval holds 0.97, so neither pass nor fail.
    report = _gate(_recipe(min_recovery=0.97), _facts(), _evaluation(), tmp_path)
    assert report.verdict == "inconclusive" and report.inconclusive_rules == ["min_recovery[arc_easy]"]
    rule = report.rules[0]
    assert rule.state == "inconclusive" and not rule.passed
    assert rule.interval[0] < 0.97 < rule.interval[1]
    assert rule.more_samples_to_decide > 0
    assert "INCONCLUSIVE" in (tmp_path / "gate" / "report.md").read_text()


def test_more_rounds_narrow_the_accuracy_interval(tmp_path):
    """The planned looks share alpha: more planned rounds, wider interval per look (Bonferroni)."""
    one_look = _recipe(min_recovery=0.9)
    one_look = one_look.model_copy(update={"evaluation": one_look.evaluation.model_copy(update={"max_limit": 200})})
    widths = []
    for recipe in (one_look, _recipe(min_recovery=0.9)):
        rule = _gate(recipe, _facts(), _evaluation(), tmp_path).rules[0]
        widths.append((rule.interval[1] - rule.interval[0], rule.confidence))
    assert widths[0][1] == 0.95 and widths[1][1] == pytest.approx(1 - 0.05 / 3)
    assert widths[0][0] < widths[1][0]


def test_divergence_rules_report_interval_threshold_and_fail_closed(tmp_path):
    report = _gate(_recipe(), _facts(), _evaluation(mean_kl=0.5, top1=0.6), tmp_path, mean_kl=0.5, top1=0.6)
    kl = next(rule for rule in report.rules if rule.rule == "max_mean_kl")
    assert (kl.threshold, kl.state, kl.samples, kl.unit) == (0.05, "fail", 32, "paragraphs")
    assert 0.05 < kl.interval[0] <= kl.figure <= kl.interval[1]
    assert "5000 held-out tokens" in kl.detail and "p99 0.3" in kl.detail
    assert report.failed_rules == ["max_mean_kl", "min_top1_agreement"]
    markdown = (tmp_path / "gate" / "report.md").read_text()
    assert "| max_mean_kl | " in markdown and "**FAIL**" in markdown
    assert "## Token divergence from the base (5000 held-out tokens)" in markdown

    evaluation = _evaluation()
    evaluation["divergence"] = {"tokens": 5000, "mean_kl": None, "top1_agreement": None}  # infinite KL -> None
    missing = _judge(_recipe(), _facts(), evaluation, tmp_path / "gate", evidence_dir=tmp_path / "nothing")
    assert missing.failed_rules == ["max_mean_kl", "min_top1_agreement"]


def test_an_infinite_token_kl_fails_the_kl_rule(tmp_path):
    folder = _evidence(tmp_path / "evaluate")
    per_token = json.loads((folder / "divergence-per-token.json").read_text())
    per_token["kl"][7] = None  # the quantized model gave a base token no mass
    (folder / "divergence-per-token.json").write_text(json.dumps(per_token))
    report = _judge(_recipe(), _facts(), _evaluation(), tmp_path, evidence_dir=folder)
    assert "max_mean_kl" in report.failed_rules


def test_a_figure_without_its_evidence_never_passes(tmp_path):
    """Point figures on the good side but no per-sample files: inconclusive, not pass."""
    report = _judge(_recipe(min_recovery=0.9), _facts(), _evaluation(), tmp_path, evidence_dir=tmp_path / "none")
    assert report.verdict == "inconclusive"
    assert set(report.inconclusive_rules) == {"max_perplexity_ratio", "max_mean_kl", "min_top1_agreement"}


def test_divergence_rules_follow_the_recipe(tmp_path):
    no_text = Recipe.model_validate({
        "name": "t", "model": {"source": "builtin:smollm2-135m-instruct"},
        "quantization": {"scheme": "int8_per_channel"}, "evaluation": {"divergence_text": None},
    })
    evaluation = _evaluation()
    del evaluation["divergence"]
    rules = [rule.rule for rule in _gate(no_text, _facts(), evaluation, tmp_path).rules]
    assert "max_mean_kl" not in rules and "min_top1_agreement" not in rules
    switched_off = _recipe(min_recovery=0.9, max_mean_kl=None, min_top1_agreement=None)
    assert _gate(switched_off, _facts(), evaluation, tmp_path).verdict == "pass"


def test_gate_writes_the_accuracy_plot(tmp_path):
    _gate(_recipe(), _facts(), _evaluation(), tmp_path)
    assert (tmp_path / "gate" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "![per-task accuracy" in (tmp_path / "gate" / "report.md").read_text()


def test_word_salad_is_garbage_by_the_base_models_perplexity(tmp_path):
    report = _gate(_recipe(), _facts(SALAD), _evaluation(completion_ppl=(5000.0,)), tmp_path)
    rule = next(rule for rule in report.rules if rule.rule == "no_garbage")
    assert report.verdict == "fail" and rule.verdict == "garbage"
    assert "Tracebackussippi" in rule.worst_sample["text"]
    assert "perplexity" in rule.detail


def test_repetition_loop_is_garbage(tmp_path):
    report = _gate(_recipe(), _facts(LOOP), _evaluation(completion_ppl=(2.0,)), tmp_path)
    assert "no_garbage" in report.failed_rules


def test_missing_figures_fail_closed(tmp_path):
    report = _judge(_recipe(), _facts(completions=[]), {}, tmp_path)
    assert report.verdict == "fail"
    assert set(report.failed_rules) == {
        "min_recovery[arc_easy]", "max_perplexity_ratio", "max_mean_kl", "min_top1_agreement", "no_garbage",
    }
    numeric = [rule for rule in report.rules if rule.rule != "no_garbage"]
    assert all("fails closed" in rule.detail for rule in numeric)


def test_missing_completion_perplexities_fail_closed(tmp_path):
    evaluation = _evaluation()
    evaluation["completion_perplexities_under_base"] = None
    report = _gate(_recipe(min_recovery=0.9), _facts(), evaluation, tmp_path)
    assert report.failed_rules == ["no_garbage"]


def test_zero_base_accuracy_cannot_pass(tmp_path):
    report = _gate(_recipe(), _facts(), _evaluation(base_acc=0.0, quant_acc=0.0), tmp_path)
    assert "min_recovery[arc_easy]" in report.failed_rules


def test_no_rules_is_not_a_pass(tmp_path):
    recipe = _recipe(min_recovery=None, max_perplexity_ratio=None, no_garbage=False, max_mean_kl=None,
                     min_top1_agreement=None)
    report = _gate(recipe, _facts(), _evaluation(), tmp_path)
    assert report.verdict == "fail"


def test_report_and_compare_commands(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    runs = []
    for name, quant_acc in (("good", 0.49), ("bad", 0.30)):
        run_dir = tmp_path / "exports" / name / "run1"
        run_dir.mkdir(parents=True)
        report = _judge(_recipe(min_recovery=0.9), _facts(), _evaluation(quant_acc=quant_acc), run_dir,
                           evidence_dir=_evidence(tmp_path / "evaluate"))
        (run_dir / "report.md").write_text("stale")
        runs.append(run_dir)
    (runs[0] / "accuracy.png").unlink()
    rendered = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "report", str(runs[0])],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
    assert rendered.returncode == 0 and (runs[0] / "report.md").read_text() == rendered.stdout
    assert (runs[0] / "accuracy.png").is_file()  # re-rendered too
    assert "| min_recovery[arc_easy] | 0.98 | [" in rendered.stdout and "| 0.9 | pass | 1000 questions |" in rendered.stdout
    compared = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "compare", *map(str, runs)],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
    assert compared.returncode == 0
    assert "| verdict | pass | fail |" in compared.stdout
    assert "| min_recovery[arc_easy] | 0.98 pass | 0.6 **FAIL** |" in compared.stdout
    assert report.verdict == "fail"


def test_compare_labels_tokens_per_s_and_refuses_figures_measured_otherwise():
    from quantize_pipeline.verdict.report import render_comparison

    base = {"verdict": "pass", "scheme": "int8_per_channel", "rules": [], "export": {}}
    measured = {**base, "serve": {"tokens_per_s": 187.25, "definitions": {"tokens_per_s": "one generate call"}}}
    older = {**base, "serve": {"tokens_per_s": 15.6}}  # a run from before the serving figures: import time included
    table = render_comparison([("new", Report.model_validate(measured)), ("old", Report.model_validate(older))])
    row = next(line for line in table.splitlines() if line.startswith("| tokens/s"))
    assert "after a warm-up" in row and "| 187.2 |" in row
    assert "not comparable: 15.6 measured with import and load" in row


def test_report_text_rounds_to_four_significant_digits():
    from quantize_pipeline.verdict import metrics

    assert metrics.rounded(138.50551389075744) == 138.5 and metrics.rounded(0.0324561) == 0.03246
    assert metrics.rounded(None) is None


def test_run_facts_missing_a_field_fail_where_they_are_built():
    """Typed facts: a recorded run without the serve figures the gate reads is an error when read, not
    a rule that quietly fails closed on a misspelled key."""
    facts = _facts().to_json()
    assert RunFacts.from_json(facts) == _facts()
    with pytest.raises(KeyError, match="packages"):
        RunFacts.from_json({key: value for key, value in facts.items() if key != "packages"})
    with pytest.raises(KeyError, match="peak_rss_mb"):
        RunFacts.from_json({**facts, "serve": {"completions": []}})
    with pytest.raises(TypeError):
        RunFacts.from_json({**facts, "export": {"size_ratio": 0.6}})


def test_quantize_warnings_reach_report_json_and_md_and_older_reports_still_load(tmp_path):
    import dataclasses

    warning = "3 MoE expert layers received no calibration token (...): their static input scale is ..."
    facts = dataclasses.replace(_facts(), quantize_warnings=(warning,))
    report = _gate(_recipe(min_recovery=0.90, max_perplexity_ratio=1.10), facts, _evaluation(), tmp_path)
    assert report.quantize_warnings == [warning] and report.verdict == "pass"  # flagged, not a gate rule
    markdown = (tmp_path / "gate" / "report.md").read_text()
    assert f"**WARNING (quantize)**: {warning}" in markdown
    assert markdown.index("WARNING (quantize)") < markdown.index("## Gate")
    assert RunFacts.from_json(report.to_json()) == facts
    schema_2 = {key: value for key, value in _facts().to_json().items() if key != "quantize_warnings"}
    assert RunFacts.from_json(schema_2).quantize_warnings == ()
    (tmp_path / "plain").mkdir()
    assert _gate(_recipe(), _facts(), _evaluation(), tmp_path / "plain").quantize_warnings == []
    assert "WARNING" not in (tmp_path / "plain" / "gate" / "report.md").read_text()
