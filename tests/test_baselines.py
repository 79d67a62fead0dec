"""Baseline columns: bitsandbytes int8/NF4 of the base model and existing checkpoints, measured beside
the export on the same questions (evaluation only, never gated)."""

from __future__ import annotations

import pytest
import yaml

from quantize_pipeline.errors import RecipeError
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.verdict.record import Report

BASE = {"name": "t", "model": {"source": "builtin:smollm2-135m-instruct"}, "quantization": {"scheme": "int8_per_channel"}}


def _recipe(**extra) -> Recipe:
    return Recipe.model_validate({**BASE, **extra})


def test_a_baseline_is_exactly_one_kind_with_a_unique_name(write_recipe):
    from quantize_pipeline.recipe.schema import load_recipe

    recipe = _recipe(baselines=[{"name": "bnb-int8", "bitsandbytes": "int8"}, {"name": "old", "checkpoint": "/x"}])
    assert [baseline.kind for baseline in recipe.baselines] == ["bitsandbytes int8", "checkpoint /x"]
    for baselines, words in (
        ([{"name": "a", "bitsandbytes": "int8", "checkpoint": "/x"}], "exactly one of bitsandbytes"),
        ([{"name": "a"}], "exactly one of bitsandbytes"),
        ([{"name": "a", "bitsandbytes": "int4"}], "baselines.0.bitsandbytes"),
        ([{"name": "a", "bitsandbytes": "nf4"}, {"name": "a", "bitsandbytes": "int8"}], "unique: a"),
    ):
        path = write_recipe(yaml.safe_dump({**BASE, "baselines": baselines}))
        with pytest.raises(RecipeError, match=words) as caught:
            load_recipe(path)
        assert "\n" not in caught.value.one_line()


def test_a_checkpoint_baseline_must_be_a_model_folder_before_anything_runs(tmp_path):
    from quantize_pipeline.run.runner import check_engine

    recipe = _recipe(baselines=[{"name": "old", "checkpoint": str(tmp_path / "nothing")}])
    with pytest.raises(RecipeError, match=r"recipe\.yaml: baselines\.0\.checkpoint: .*not a model folder"):
        check_engine(recipe, tmp_path / "recipe.yaml")


def test_check_baseline_option_values():
    from quantize_pipeline.evaluate.baselines import from_cli

    assert from_cli(("bnb-int8", "bnb-nf4", "/models/old-awq/")) == [
        {"name": "bnb-int8", "bitsandbytes": "int8"}, {"name": "bnb-nf4", "bitsandbytes": "nf4"},
        {"name": "old-awq", "checkpoint": "/models/old-awq/"},
    ]


def test_baselines_are_an_input_of_evaluate_and_later_stages_only():
    from quantize_pipeline.run.resume import stage_config_sha256

    plain, with_baseline = _recipe(), _recipe(baselines=[{"name": "b", "bitsandbytes": "nf4"}])
    for stage in ("calibrate", "quantize", "verify", "serve"):
        assert stage_config_sha256(plain, stage, "vllm") == stage_config_sha256(with_baseline, stage, "vllm"), stage
    for stage in ("evaluate", "gate", "publish"):
        assert stage_config_sha256(plain, stage, "vllm") != stage_config_sha256(with_baseline, stage, "vllm"), stage


def _report() -> dict:
    paired = {"recovery": 0.98, "recovery_ci_low": 0.93, "recovery_ci_high": 1.03, "questions": 200}
    return {
        "recipe": "t", "scheme": "int8_per_channel", "verdict": "pass", "rules": [],
        "serve": {"engine": "vllm", "tokens_per_s": 187.2, "peak_rss_mb": 2900.0, "load_s": 9.8, "completions": []},
        "evaluation": {
            "tasks": {"arc_easy": {"base": {"acc": 0.5, "samples": 200}, "quantized": {"acc": 0.49, "samples": 200},
                                   "paired": paired}},
            "baselines": {
                "bnb-nf4": {"kind": "bitsandbytes nf4", "engine": "bitsandbytes-nf4",
                            "serve": {"tokens_per_s": 3.1, "peak_rss_mb": 1210.5, "load_s": 40.2},
                            "tasks": {"arc_easy": {"acc": 0.45, "samples": 200, "paired": {**paired, "recovery": 0.9}}}},
                "old": {"kind": "checkpoint /m/old", "engine": "vllm", "error": "[evaluate] StageError: no | safetensors"},
            },
        },
    }


def test_report_md_has_a_column_per_baseline_and_says_why_one_could_not_run():
    from quantize_pipeline.verdict.report import render_markdown

    text = render_markdown(Report.model_validate(_report()))
    section = text[text.index("## Baselines (evaluation only, not gated)"):]
    assert "| | export | bnb-nf4 | old |" in section
    assert "| arc_easy acc (base 0.5) | 0.49 (recovery 0.98 [0.93, 1.03], 200 q) | 0.45 (recovery 0.9 [0.93, 1.03], 200 q) | — |" in section
    assert "| peak RSS while generating, MiB | 2900 | 1210 | — |" in section
    assert "| could not run here | — | — | [evaluate] StageError: no \\| safetensors |" in section


def test_the_plot_draws_the_baseline_bars(tmp_path):
    import matplotlib.image
    import numpy as np

    from quantize_pipeline.verdict.plot import accuracy_rows, write_accuracy_plot

    report = Report.model_validate(_report())
    [row] = accuracy_rows(report)
    assert set(row["baselines"]) == {"bnb-nf4"} and row["baselines"]["bnb-nf4"][0] == 0.45
    path = tmp_path / "accuracy.png"
    assert write_accuracy_plot(report, path)
    pixels = matplotlib.image.imread(path)[..., :3]
    orange = np.array([0xE6, 0x7E, 0x22]) / 255  # the first baseline's colour
    assert (np.abs(pixels - orange).max(axis=-1) < 0.02).sum() > 500  # a bar, not a legend swatch alone
    report.evaluation.baselines = None
    write_accuracy_plot(report, path)
    pixels = matplotlib.image.imread(path)[..., :3]
    assert (np.abs(pixels - orange).max(axis=-1) < 0.02).sum() == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_bitsandbytes_baseline_runs_here_with_memory_while_generating(kind, tmp_path):
    """Real bitsandbytes (its CPU backend) through transformers on the tiny model: quantized linear
    layers, generations, per-question answers, and memory sampled while generating."""
    from quantize_pipeline.evaluate import baselines
    from quantize_pipeline.run.runner import resolve_base_model
    from quantize_pipeline.run.worker import call_isolated

    recipe = _recipe(baselines=[{"name": f"bnb-{kind}", "bitsandbytes": kind}])
    model_dir = resolve_base_model(recipe, tmp_path / "prepare.log", lambda line: None)
    options = baselines.baseline_options(recipe, recipe.baselines[0], "vllm", "cpu")
    assert options.engine == f"bitsandbytes-{kind}"
    result, _ = call_isolated(
        "quantize_pipeline.evaluate.baselines:baseline_job",
        {"model_dir": str(model_dir), "engine_options": options.to_json(), "prompts": ["The capital of France is"],
         "max_new_tokens": 8, "tasks": {"arc_easy": 8}},
        log_path=tmp_path / "baseline.log", stage="evaluate",
    )
    serve = result["serve"]
    assert serve["engine"] == f"bitsandbytes-{kind}" and serve["generated_tokens"] > 0 and serve["tokens_per_s"] > 0
    assert 300 < serve["peak_rss_mb"] < 8000 and serve["device_peak_mb"] is None
    assert len(result["tasks"]["arc_easy"]["per_doc"]) == 8
    assert result["engine_start"]["role"] == "baseline"
    assert serve["bitsandbytes_linear_layers"] == 30 * 7  # every decoder linear; lm_head stays (transformers' rule)


@pytest.mark.slow
def test_a_baseline_that_cannot_load_is_a_column_with_its_error(tmp_path):
    from quantize_pipeline.evaluate import baselines

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    recipe = _recipe(baselines=[{"name": "broken", "checkpoint": str(broken)}])
    columns = baselines.evaluate_baselines(recipe, {}, tmp_path, tmp_path / "logs", engine_name="transformers", device="cpu")
    column = columns["broken"]
    assert column["kind"] == f"checkpoint {broken}" and column["engine"] == "transformers"
    assert column["error"].startswith("[evaluate] ") and "tasks" not in column
    assert (tmp_path / "logs" / "baseline-broken.log").is_file() and column["seconds"] > 0


def test_mlflow_figures_carry_the_baseline_columns():
    from quantize_pipeline.verdict.mlflow_report import figures

    values = figures(Report.model_validate(_report()))
    assert values["baseline.bnb-nf4.arc_easy.acc"] == 0.45 and values["baseline.bnb-nf4.arc_easy.recovery"] == 0.9
    assert values["baseline.bnb-nf4.peak_rss_mb"] == 1210.5 and not any(key.startswith("baseline.old.") for key in values)
