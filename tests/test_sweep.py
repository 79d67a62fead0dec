"""The sweep's plan (names refused before anything runs), its Pareto front and its plot (read back by pixel)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quantize_pipeline.commands.sweep import Variant, plan_sweep, variant_recipe_data
from quantize_pipeline.commands.sweep_report import pareto_front, smallest_passing, write
from quantize_pipeline.errors import RecipeError
from tests.conftest import REPO

DEFAULT_RECIPE = REPO / "recipes" / "smollm2-135m-int8.yaml"


def test_the_plan_is_every_scheme_with_every_algorithm(tmp_path):
    plan = plan_sweep(DEFAULT_RECIPE, tmp_path, schemes="int8_per_channel, int4_wo_64", algorithms="rtn,gptq")
    assert [variant.name for variant in plan.variants] == [
        "int8_per_channel-rtn", "int8_per_channel-gptq", "int4_wo_64-rtn", "int4_wo_64-gptq"]
    assert plan.executor == "local" and plan.sweep_dir == tmp_path.resolve() / "smollm2-135m-int8-sweep"
    data = variant_recipe_data(plan.recipe, Variant("int4_wo_64", "gptq"))
    assert data["quantization"]["scheme"] == "int4_wo_64" and data["quantization"]["algorithm"] == "gptq"
    assert data["publish"] is None and "sweep" not in data and data["name"] == "smollm2-135m-int8--int4_wo_64-gptq"
    assert variant_recipe_data(plan.recipe, Variant("int8_per_tensor", "rtn"))["quantization"]["algorithm"] is None


def test_the_recipes_sweep_section_is_the_default_and_the_options_override_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(DEFAULT_RECIPE.read_text() + "sweep:\n  schemes: [int8_per_tensor, fp8]\n  executor: ray\n")
    plan = plan_sweep(recipe, tmp_path)
    assert [variant.name for variant in plan.variants] == ["int8_per_tensor-rtn", "fp8-rtn"] and plan.executor == "ray"
    plan = plan_sweep(recipe, tmp_path, schemes="int4_wo_128", executor="local")
    assert [variant.name for variant in plan.variants] == ["int4_wo_128-rtn"] and plan.executor == "local"


@pytest.mark.parametrize(("options", "field", "message"), [
    ({"schemes": "int8_per_channel,int9"}, "--schemes", "unknown scheme 'int9'"),
    ({"schemes": "int8_per_channel", "algorithms": "rtn,gptx"}, "--algorithms", "unknown algorithm 'gptx'"),
    ({}, "sweep.schemes", "no schemes to sweep"),
])
def test_unknown_names_are_refused_before_anything_runs(tmp_path, options, field, message):
    with pytest.raises(Exception) as caught:
        plan_sweep(DEFAULT_RECIPE, tmp_path / "out", **options)
    assert caught.value.exit_code == 2 and field in caught.value.one_line() and message in caught.value.one_line()
    assert not (tmp_path / "out").exists()


def test_an_impossible_variant_is_refused_before_anything_runs(tmp_path):
    """GPTQ needs the whole model: a streaming recipe cannot take it (the recipe schema says so)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(DEFAULT_RECIPE.read_text().replace("  exclude: [lm_head]", "  exclude: [lm_head]\n  mode: streaming"))
    with pytest.raises(RecipeError, match="sweep variant int8_per_channel-gptq: .*needs the whole model"):
        plan_sweep(recipe, tmp_path, schemes="int8_per_channel", algorithms="rtn,gptq")


def test_a_bad_sweep_section_names_its_field(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(DEFAULT_RECIPE.read_text() + "sweep:\n  schemes: [int8_per_channel, nope]\n")
    with pytest.raises(RecipeError) as caught:
        plan_sweep(recipe, tmp_path)
    assert "r.yaml: sweep.schemes: " in caught.value.one_line() and "unknown scheme 'nope'" in caught.value.one_line()


def test_the_cli_refuses_in_one_line_with_exit_2(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "sweep", str(DEFAULT_RECIPE), "--schemes", "int9",
         "--output-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().count("\n") == 0 and "--schemes: unknown scheme 'int9'" in completed.stderr
    assert not any(tmp_path.iterdir())


def _row(name: str, size: int, recovery: float | None, kl: float | None, status: str = "pass") -> dict:
    return {"variant": name, "status": status, "export_size_bytes": size, "recovery": recovery, "mean_kl": kl}


ROWS = [
    _row("big-good", 200 * 2**20, 0.99, 0.01),
    _row("mid-dominated", 210 * 2**20, 0.95, 0.05, "fail"),  # bigger and worse than big-good
    _row("small-worse", 80 * 2**20, 0.90, 0.20, "fail"),
    _row("small-trade-off", 90 * 2**20, 0.97, 0.03),
    {"variant": "crashed", "status": "crashed", "reason": "StageError: boom"},
]


def test_the_pareto_front_and_the_smallest_passing_variant():
    assert pareto_front(ROWS) == ["big-good", "small-worse", "small-trade-off"]
    assert smallest_passing(ROWS) == "small-trade-off"
    # Equal figures do not dominate each other: both stay on the front.
    twins = [_row("a", 10, 0.9, 0.1), _row("b", 10, 0.9, 0.1)]
    assert pareto_front(twins) == ["a", "b"]
    assert smallest_passing([_row("x", 10, 0.5, 1.0, "fail")]) is None


def test_sweep_files_and_the_plot_drawn_where_it_says(tmp_path):
    from types import SimpleNamespace

    import matplotlib.image
    import numpy as np

    rows = [dict(row) for row in ROWS]
    result = write(tmp_path, SimpleNamespace(name="demo"), "r.yaml", "local", rows)
    assert result["pareto_front"] == ["big-good", "small-worse", "small-trade-off"]
    markdown = (tmp_path / "sweep.md").read_text()
    assert "Smallest variant that passes every gate: **small-trade-off**" in markdown
    assert "| crashed | crashed |" in markdown and "StageError: boom" in markdown
    image = matplotlib.image.imread(tmp_path / "sweep.png")
    points = result["plot"]["points"]
    assert len(points) == 8  # four variants with figures, two panels; the crashed one is not drawn
    colors = {True: np.array([0xd6, 0x27, 0x28]) / 255, False: np.array([0x7f, 0x7f, 0x7f]) / 255}
    for point in points:
        column, row = point["pixel"]
        assert 0 <= row < image.shape[0] and 0 <= column < image.shape[1]
        pixel = image[row, column, :3]
        assert np.abs(pixel - colors[point["pareto"]]).max() < 0.05, (point, pixel)
    # Blank canvas elsewhere: the image is a drawing, not one colour.
    assert (image[:, :, :3] > 0.95).all(axis=2).mean() > 0.5


def test_the_report_names_the_sensitive_layers_and_what_auto_exclude_kept(tmp_path):
    """sweep --sensitivity and --auto-exclude: their findings reach sweep.json and sweep.md."""
    from types import SimpleNamespace

    extras = {
        "sensitivity": {"int8_per_tensor": [{"layer": "model.layers.11.mlp.down_proj", "relative_output_error": 0.993}]},
        "auto_exclude": {
            "int8_per_tensor": {"fewest_layers_kept": 2, "keep_estimate": 2, "proved_fewest": True,
                                "kept_layers": ["model.layers.11.mlp.down_proj", "model.layers.2.mlp.gate_proj",
                                                "model.layers.2.mlp.up_proj"],
                                "size_cost_bytes": 3 * 2**20, "recipe_file": "out/x-auto-exclude.yaml",
                                "trials": [{"variant": "keep0", "status": "fail"}, {"variant": "keep2", "status": "pass"},
                                           {"variant": "keep1", "status": "inconclusive"}]},
            "int4_wo_64": {"fewest_layers_kept": None, "kept_layers": None,
                           "trials": [{"variant": "keep0", "status": "fail"}]},
        },
    }
    result = write(tmp_path, SimpleNamespace(name="demo"), "r.yaml", "local", [dict(row) for row in ROWS], extras)
    assert result["auto_exclude"]["int8_per_tensor"]["keep_estimate"] == 2
    markdown = (tmp_path / "sweep.md").read_text()
    assert ("Most sensitive layers under int8_per_tensor (per-token relative output error on the calibration tokens): "
            "model.layers.11.mlp.down_proj 0.993") in markdown
    assert ("Auto-exclude for int8_per_tensor: keeping the 2 most sensitive unit(s) (3 layers with the shards vLLM "
            "fuses with them) in the model dtype passes the gate (model.layers.11.mlp.down_proj, "
            "model.layers.2.mlp.gate_proj, model.layers.2.mlp.up_proj); size cost 3.0 MiB") in markdown
    assert "(trials: keep0: fail; keep2: pass; keep1: inconclusive)" in markdown
    assert "Auto-exclude for int4_wo_64: no trial passed (keep0: fail)." in markdown


def test_auto_exclude_doubles_then_bisects_to_the_fewest_layers():
    from quantize_pipeline.commands.sensitivity import next_keep_count

    def walk(first_passing: int, layers: int = 210, guess: int | None = None) -> list[int]:
        tried: dict[int, bool] = {}
        while (k := next_keep_count(tried, layers, guess)) is not None:
            tried[k] = k >= first_passing
        return list(tried)

    assert walk(0) == [0]
    assert walk(1) == [0, 1]
    assert walk(3) == [0, 1, 2, 4, 3]
    assert walk(6) == [0, 1, 2, 4, 8, 6, 5]
    assert walk(1000, layers=5) == [0, 1, 2, 4, 5]  # never passes: stops after keeping every layer
    # The keep curve's estimate is the second trial: right, then bisected below it; short, then doubled from it.
    assert walk(40, guess=40) == [0, 40, 20, 30, 35, 38, 39]
    assert walk(50, guess=40, layers=60) == [0, 40, 60, 50, 45, 48, 49]
    assert walk(2, guess=0) == [0, 1, 2]  # an estimate of 0 that the real run refuted: from 1 as without one


def test_a_sweeps_failing_variant_is_auto_excludes_first_trial(tmp_path):
    """sweep --auto-exclude: the variant's own run is trial K = 0 (the same recipe), not run a second time."""
    import json

    from quantize_pipeline.commands.auto_exclude import auto_exclude, sensitivity_key
    from quantize_pipeline.recipe.schema import load_recipe

    recipe_path = tmp_path / "int8_per_tensor-rtn.yaml"
    recipe_path.write_text((REPO / "recipes" / "smollm2-135m-int8-per-tensor.yaml").read_text())
    recipe = load_recipe(recipe_path)
    measured = tmp_path / "out" / f"{recipe.name}-sensitivity"
    measured.mkdir(parents=True)
    (measured / "sensitivity.json").write_text(json.dumps({
        "ranking": [{"layer": "model.layers.11.mlp.down_proj", "relative_output_error": 0.99}], "keep_estimate": 1}))
    (measured / "key.json").write_text(json.dumps(sensitivity_key(recipe)))
    as_is = {"variant": "int8_per_tensor-rtn", "status": "fail", "export_size_bytes": 100, "reason": "max_mean_kl"}
    said: list[str] = []
    result = auto_exclude(recipe_path, tmp_path / "out", said.append, max_trials=1, as_is=as_is)
    assert result["trials"] == [{**as_is, "kept_layers": []}] and result["fewest_layers_kept"] is None
    assert said[-1] == "trial 1: keep no layer: fail (the run of int8_per_tensor-rtn, reused)", said
    assert not (tmp_path / "out" / f"{recipe.name}-auto-exclude" / "trials").exists()  # nothing ran


def test_layers_vllm_fuses_are_kept_together():
    from quantize_pipeline.recipe.layers import keep_units

    ranked = ["model.layers.9.mlp.down_proj", "model.layers.29.mlp.up_proj", "model.layers.3.self_attn.k_proj",
              "model.layers.29.mlp.gate_proj", "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.v_proj",
              "model.layers.3.self_attn.o_proj"]
    assert keep_units(ranked) == [
        ["model.layers.9.mlp.down_proj"], ["model.layers.29.mlp.gate_proj", "model.layers.29.mlp.up_proj"],
        ["model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj"],
        ["model.layers.3.self_attn.o_proj"]]


def test_an_exclude_that_splits_a_fused_layer_is_found():
    """`validate` and `run` refuse it before loading (quantize_pipeline/recipe/checks.py): vLLM would refuse the export in serve."""
    from quantize_pipeline.recipe.layers import select, split_fused_groups

    names = [f"model.layers.{i}.{leaf}" for i in range(2) for leaf in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")]
    assert split_fused_groups(select(names, ["model.layers.1.mlp.up_proj"]), names) == [
        ("model.layers.1.mlp.up_proj", ["model.layers.1.mlp.gate_proj"])]
    assert split_fused_groups(select(names, ["re:model\\.layers\\.1\\.mlp\\.(gate|up)_proj", "down_proj", "o_proj"]),
                              names) == []
    assert split_fused_groups(select(names, ["model.layers.0.self_attn.k_proj"]), names) == [
        ("model.layers.0.self_attn.k_proj", ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"])]
