"""The gate on real recorded figures of the default INT8 run (tests/fixtures/int8-default-run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from quantize_pipeline.evaluate.record import Evaluation
from quantize_pipeline.recipe.schema import GatesSpec, load_recipe
from quantize_pipeline.verdict import gate
from quantize_pipeline.verdict.record import Report
from quantize_pipeline.verdict.run_facts import RunFacts

FIXTURE = Path(__file__).parent / "fixtures" / "int8-default-run"
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m-int8.yaml"


def _gate(tmp_path: Path, **gates) -> Report:
    recipe = load_recipe(DEFAULT_RECIPE)
    recipe = recipe.model_copy(update={"gates": recipe.gates.model_copy(update=gates)})
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "evaluate", run_dir / "evaluate")
    (run_dir / "gate").mkdir()
    evaluation = json.loads((FIXTURE / "evaluate" / "evaluate.json").read_text())
    facts = RunFacts.from_json(json.loads((FIXTURE / "run_facts.json").read_text())["run_facts"])
    return gate.gate(recipe, facts, Evaluation.model_validate(evaluation), run_dir / "gate")  # evidence: run/evaluate, as in a run


def test_the_shipped_tiny_recipes_use_the_gatesspec_defaults():
    """One set of defaults: the default recipe, the other tiny recipes and `check` without a recipe
    (which builds GatesSpec()) agree; the 4-bit recipes are looser on purpose (the explicit one's docs/schemes.md
    note; the W4A4 block formats' thresholds are measured on the tiny model, said in each recipe)."""
    looser_on_purpose = {"smollm2-135m-uint4-wo-64-asym.yaml", "smollm2-135m-mxfp4.yaml", "smollm2-135m-nvfp4.yaml"}
    recipes = sorted(DEFAULT_RECIPE.parent.glob("smollm2-135m-*.yaml"))
    assert len(recipes) >= 10
    for path in recipes:
        if path.name not in looser_on_purpose:
            assert load_recipe(path).gates == GatesSpec(), path.name


def test_the_good_int8_export_passes_the_defaults_on_every_rule(tmp_path):
    report = _gate(tmp_path)
    assert report.verdict == "pass", [(rule.rule, rule.state) for rule in report.rules]
    rules = {rule.rule: rule for rule in report.rules}
    recovery = rules["min_recovery[arc_easy]"]
    assert recovery.samples == 200 and recovery.interval[0] > 0.9 and recovery.confidence < 0.99
    kl = rules["max_mean_kl"]
    assert kl.samples == 32 and kl.interval[0] < 0.0323 < kl.interval[1] < 0.05


def test_thresholds_inside_and_beyond_the_real_intervals(tmp_path):
    """0.99 is inside the real recovery interval: inconclusive, with an estimate; a KL limit of 0.02 is
    below the whole real interval: fail; 0.033 is inside it: inconclusive."""
    report = _gate(tmp_path, min_recovery=0.99, max_mean_kl=0.02)
    states = {rule.rule: rule.state for rule in report.rules}
    assert states["min_recovery[arc_easy]"] == "inconclusive" and states["max_mean_kl"] == "fail"
    assert report.verdict == "fail"
    recovery = next(rule for rule in report.rules if rule.rule == "min_recovery[arc_easy]")
    assert recovery.more_samples_to_decide > 0
    undecided = _gate(tmp_path / "again", max_mean_kl=0.033)
    assert undecided.verdict == "inconclusive" and undecided.inconclusive_rules == ["max_mean_kl"]
