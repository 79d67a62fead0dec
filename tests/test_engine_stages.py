"""serve and evaluate come from one child (the export's engine load): resume keeps both or neither."""

from __future__ import annotations

from quantize_pipeline.recipe.schema import load_recipe
from quantize_pipeline.run.resume import STAGES, reusable_stages, stage_config_sha256
from tests.conftest import DEFAULT_RECIPE


def _manifest(recipe, done: tuple[str, ...]) -> dict:
    return {"stages": {stage: {"status": "done", "outputs": {}, "summary": {},
                               "config_sha256": stage_config_sha256(recipe, stage, "vllm")} for stage in done}}


def test_serve_without_evaluate_is_not_kept(tmp_path):
    recipe = load_recipe(DEFAULT_RECIPE)
    upto_serve = STAGES[:STAGES.index("serve") + 1]
    kept = reusable_stages(_manifest(recipe, upto_serve), recipe, "vllm", tmp_path, None)
    assert list(kept) == list(STAGES[:STAGES.index("serve")])


def test_from_stage_evaluate_reruns_serve_too(tmp_path):
    recipe = load_recipe(DEFAULT_RECIPE)
    kept = reusable_stages(_manifest(recipe, STAGES), recipe, "vllm", tmp_path, "evaluate")
    assert "serve" not in kept and "verify" in kept


def test_serve_and_evaluate_done_are_both_kept(tmp_path):
    recipe = load_recipe(DEFAULT_RECIPE)
    kept = reusable_stages(_manifest(recipe, STAGES[:STAGES.index("gate")]), recipe, "vllm", tmp_path, None)
    assert {"serve", "evaluate"} <= set(kept) and "gate" not in kept
