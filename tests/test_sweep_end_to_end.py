"""A real sweep on the tiny model: two variants (int8 per channel with RTN and with GPTQ: CI's only GPTQ run, on
decoder layers 0-3), each quantized, exported, verified, served in vLLM and gated; once one after another (`local`);
int8_per_channel-rtn swept as a task of a local Ray instance (`ray`) and on `local`: the same table. A re-run
reuses every variant. Auto-exclude makes per-tensor INT8 pass by keeping its most sensitive layers (its first
trial is CI's only per-tensor INT8 run, so the sweep does not sweep that scheme too: each variant is a whole
run, ~2-3.5 min on an AVX2-only CPU).

Slow: three sweep runs and two auto-exclude trials at a small evaluation (tests/ci_recipes.py: 20 questions; the
perplexity and divergence sizes of the other slow tests, so the base model's figures come from the cache they fill).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantize_pipeline.formats.safetensors_header import read_folder
from tests.ci_recipes import CALIBRATION_TOKENS, CI_GATES, ci_sized
from tests.conftest import DEFAULT_RECIPE, REPO

pytestmark = pytest.mark.slow

UP = "model.layers.0.mlp.up_proj"  # [1536, 576]
SWEEP_QUESTIONS = 20
# A scheme every CPU's vLLM serves (int4 weight-only would be evaluated in emulation on AVX2-only CPUs: ~4.5 min
# a variant there against ~2 min in vLLM), with both algorithms: the sweep's grid and its table, front and
# smallest-passing logic on real runs; a sweep over schemes is the same code on another axis (tests/test_sweep.py).
VARIANTS = ["int8_per_channel-rtn", "int8_per_channel-gptq"]
# Figures of the export and its evaluation: deterministic for a given export and engine. Timing and
# memory columns (tokens/s, peak RSS) are measurements of the moment and are left out of the comparison.
SAME_IN_BOTH = ("variant", "scheme", "algorithm", "status", "export_size_bytes", "size_ratio", "recovery", "mean_kl",
                "top1_agreement", "perplexity_ratio", "pareto", "calibration_tokens_sha256")


@pytest.fixture(scope="module")
def sweep_recipe(tmp_path_factory) -> Path:
    """The default recipe at CI size (tests/ci_recipes.py: 8 calibration samples, since GPTQ replays them through
    every layer, 123 s of quantize at 32; no base perplexity of each variant's new completions; one prompt for
    8 tokens), `engine: auto`, min_recovery off, the other rules at the CI thresholds: the verdicts come from
    the paragraph rules (perplexity, KL, top-1), so 20 questions give the accuracy columns without deciding any."""
    text = ci_sized(DEFAULT_RECIPE.read_text(), limit=SWEEP_QUESTIONS)
    for default, looser in CI_GATES.items():
        text = text.replace(f"  {default}", f"  {looser}")
    text = text.replace("  min_recovery: 0.5\n", "  min_recovery: null\n")
    # auto, as a sweep over schemes would say: vLLM wherever it serves the scheme (both int8 schemes, here).
    assert "  engine: vllm\n" in text
    text = text.replace("  engine: vllm\n", "  engine: auto\n")
    path = tmp_path_factory.mktemp("sweep-recipe") / "smollm2-135m-int8.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def four_layer_sweep_recipe(sweep_recipe) -> Path:
    """The sweep's own recipe quantizes decoder layers 0-3 only (28 layers; the rest kept): Quark's GPTQ replays
    the calibration through every layer it quantizes, ~100 s for all 30 here against ~15 s for 4, and the sweep's
    grid, table, front, plot, reuse and Ray executor are the same code at any layer count. Auto-exclude's proof
    below needs every layer and starts from sweep_recipe."""
    text = sweep_recipe.read_text()
    assert "  exclude: [lm_head]\n" in text
    path = sweep_recipe.parent / "four-layers" / sweep_recipe.name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text.replace("  exclude: [lm_head]\n",
                                 "  exclude: [lm_head, 're:model\\.layers\\.([4-9]|[12][0-9])\\..*']\n"))
    return path


def _sweep(recipe: Path, output: Path, executor: str, algorithms: str = "rtn,gptq",
           schemes: str = "int8_per_channel") -> tuple[subprocess.CompletedProcess, dict]:
    completed = subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "sweep", str(recipe), "--schemes", schemes,
         "--algorithms", algorithms, "--executor", executor, "--output-dir", str(output)],
        capture_output=True, text=True, cwd=REPO, timeout=3600,
    )
    sweep_json = output / "smollm2-135m-int8-sweep" / "sweep.json"
    assert sweep_json.is_file(), completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed, json.loads(sweep_json.read_text())


@pytest.fixture(scope="module")
def local_sweep(four_layer_sweep_recipe, tmp_path_factory):
    output = tmp_path_factory.mktemp("local")
    return (output, *_sweep(four_layer_sweep_recipe, output, "local"))


def _weight_bytes(row: dict) -> bytes:
    from safetensors import safe_open

    model = Path(row["run_dir"], "model")
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as tensors:
            if f"{UP}.weight" in tensors.keys():
                return tensors.get_tensor(f"{UP}.weight").numpy().tobytes()
    raise AssertionError(f"{UP}.weight not in {model}")


def _comparable(result: dict) -> list[dict]:
    return [{key: row.get(key) for key in SAME_IN_BOTH} for row in result["rows"]]


def test_a_local_sweep_runs_every_variant_and_names_the_front(local_sweep):
    output, completed, result = local_sweep
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == VARIANTS, completed.stderr[-3000:]
    for name, row in rows.items():
        assert row["status"] in ("pass", "fail", "inconclusive"), (name, row)
        assert row["export_size_bytes"] > 0 and 0 < row["mean_kl"] < 5 and 0 < row["recovery"] <= 2, row
        assert Path(row["run_dir"], "report.json").is_file() and not row["reused"]
        recipe = Path(row["run_dir"], "recipe.yaml").read_text()
        assert f"scheme: {row['scheme']}" in recipe and "publish: null" in recipe
    assert rows["int8_per_channel-gptq"]["algorithm"] == "gptq" and rows["int8_per_channel-rtn"]["algorithm"] == "rtn"
    # Same calibration tokens for every variant; an algorithm changes the codes, not the layout: the same tensors,
    # and GPTQ's codes differ from RTN's (it ran, it did not fall back to rounding).
    assert len({row["calibration_tokens_sha256"] for row in rows.values()}) == 1
    rtn, gptq = (read_folder(Path(rows[f"int8_per_channel-{name}"]["run_dir"], "model")) for name in ("rtn", "gptq"))
    assert {name: tensor["shape"] for name, tensor in rtn.items()} == {name: tensor["shape"] for name, tensor in gptq.items()}
    # Where the CPU computes in bf16 natively (AVX-512 BF16, AMX) rounding writes the scales in the model's dtype and
    # Quark's GPTQ keeps its own in float32; on AVX2-only CPUs both are float32. Nothing else may differ.
    differing = {name for name in rtn if rtn[name]["dtype"] != gptq[name]["dtype"]}
    assert all(name.endswith(".weight_scale") for name in differing), differing
    if not differing:
        assert rows["int8_per_channel-rtn"]["export_size_bytes"] == rows["int8_per_channel-gptq"]["export_size_bytes"]
    assert _weight_bytes(rows["int8_per_channel-rtn"]) != _weight_bytes(rows["int8_per_channel-gptq"])
    # The front and the smallest passing variant follow from the rows (recomputed here from the figures).
    for name, row in rows.items():
        dominated = any(other["export_size_bytes"] <= row["export_size_bytes"] and other["recovery"] >= row["recovery"]
                        and other["mean_kl"] <= row["mean_kl"] and (other["export_size_bytes"], -other["recovery"],
                        other["mean_kl"]) != (row["export_size_bytes"], -row["recovery"], row["mean_kl"])
                        for other in rows.values())
        assert row["pareto"] == (not dominated), name
    passing = [row for row in rows.values() if row["status"] == "pass"]
    # Equal sizes (an algorithm does not change the layout) are told apart by the variant's name: sweep_report's rule.
    expected = min(passing, key=lambda row: (row["export_size_bytes"], row["variant"]))["variant"] if passing else None
    assert result["smallest_passing"] == expected
    assert completed.returncode == (0 if expected else 3)
    assert f"smallest variant that passes every gate: {expected or 'none'}" in completed.stdout
    markdown = (output / "smollm2-135m-int8-sweep" / "sweep.md").read_text()
    assert all(f"| {name} | {rows[name]['status']} |" in markdown for name in VARIANTS)


def test_the_sweep_plot_shows_each_variant_where_sweep_json_says(local_sweep):
    import matplotlib.image
    import numpy as np

    output, _, result = local_sweep
    image = matplotlib.image.imread(output / "smollm2-135m-int8-sweep" / "sweep.png")
    points = result["plot"]["points"]
    assert sorted({point["variant"] for point in points}) == sorted(VARIANTS) and len(points) == 2 * len(VARIANTS)
    colors = {True: np.array([0xd6, 0x27, 0x28]) / 255, False: np.array([0x7f, 0x7f, 0x7f]) / 255}
    for point in points:
        column, row = point["pixel"]
        # Points of equal figures overlap; the one drawn on top (the front) shows.
        twins = [other for other in points if other["panel"] == point["panel"] and other is not point
                 and abs(other["pixel"][0] - column) + abs(other["pixel"][1] - row) < 8]
        if twins and not point["pareto"]:
            continue
        assert np.abs(image[row, column, :3] - colors[point["pareto"]]).max() < 0.05, point


def test_a_rerun_reuses_every_finished_variant(local_sweep, four_layer_sweep_recipe):
    output, _, first = local_sweep
    completed, again = _sweep(four_layer_sweep_recipe, output, "local")
    assert [row["reused"] for row in again["rows"]] == [True] * len(VARIANTS), completed.stdout[-2000:]
    assert _comparable(again) == _comparable(first)
    assert "engine start" not in completed.stdout


def test_a_ray_sweep_gives_the_same_table(local_sweep, four_layer_sweep_recipe, tmp_path):
    """int8_per_channel-rtn swept as a Ray task and with `local`: the same table. The local sweep of it reuses
    the run the local executor made for the two-variant sweep (its table is rewritten for one row; the
    tests above read the two-variant one first); the Ray sweep runs it anew. One variant: each more is a
    whole run (~2 min here) through the same executor code."""
    output, _, _ = local_sweep
    completed, on_ray = _sweep(four_layer_sweep_recipe, tmp_path, "ray", algorithms="rtn", schemes="int8_per_channel")
    assert on_ray["executor"] == "ray" and "submitted int8_per_channel-rtn to Ray" in completed.stdout, completed.stderr[-3000:]
    assert not any(row["reused"] for row in on_ray["rows"])
    again, local = _sweep(four_layer_sweep_recipe, output, "local", algorithms="rtn", schemes="int8_per_channel")
    assert [row["reused"] for row in local["rows"]] == [True] and "engine start" not in again.stdout
    assert [row["variant"] for row in local["rows"]] == ["int8_per_channel-rtn"]
    assert _comparable(on_ray) == _comparable(local)
    assert on_ray["smallest_passing"] == local["smallest_passing"] and on_ray["pareto_front"] == local["pareto_front"]


def test_auto_exclude_makes_per_tensor_int8_pass_by_keeping_its_most_sensitive_layers(sweep_recipe, tmp_path):
    """The proof: per-tensor INT8 fails the default thresholds (KL, top-1) on the tiny model; auto-exclude
    keeps its most sensitive layers in the model's dtype until the gate passes, and says which and what
    it cost. Two trials: the scheme as is (fails), the keep curve's estimate (passes here: the curve,
    Quark's fake quantization in bf16, is stricter than vLLM's kernels). The bisection after a pass and the
    doubling after a fall-short are the same code at other K (tests/test_sweep.py checks that search)."""
    from safetensors import safe_open

    recipe = tmp_path / "per-tensor.yaml"
    text = sweep_recipe.read_text().replace("scheme: int8_per_channel", "scheme: int8_per_tensor")
    for default, looser in CI_GATES.items():  # back to the default thresholds
        text = text.replace(f"  {looser}", f"  {default}")
    # The shipped calibration length: the static per-tensor scales, and so the trials' verdicts, depend on it.
    text = text.replace(f"  max_seq_len: {CALIBRATION_TOKENS}\n", "  max_seq_len: 512\n")
    assert "  max_seq_len: 512\n" in text
    recipe.write_text(text.replace("name: smollm2-135m-int8\n", "name: per-tensor\n"))
    completed = subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "auto-exclude", str(recipe), "--max-trials", "2",
         "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=3600,
    )
    result = json.loads((tmp_path / "out" / "per-tensor-auto-exclude" / "auto-exclude.json").read_text())
    sensitivity = json.loads((tmp_path / "out" / "per-tensor-sensitivity" / "sensitivity.json").read_text())
    ranking = sensitivity["ranking"]
    assert len(ranking) == 210 and "lm_head" not in {row["layer"] for row in ranking}  # 30 layers x 7, lm_head kept
    assert ranking[0]["relative_output_error"] >= ranking[-1]["relative_output_error"] > 0
    assert ranking[0]["layer"].endswith("mlp.down_proj")  # the MLP output: the per-tensor scale's outliers

    # The keep curve: the fake-quantized model moves toward the base as layers are kept, and its estimate
    # is the fewest kept that meets the gate's KL and top-1 thresholds on the curve's tokens.
    curve = {point["keep"]: point for point in sensitivity["keep_curve"]}
    estimate = sensitivity["keep_estimate"]
    assert curve[0]["mean_kl"] > 0.05 and not curve[0]["meets"], curve[0]
    assert curve[estimate]["meets"] and curve[estimate]["mean_kl"] <= 0.05 and curve[estimate]["top1_agreement"] >= 0.85
    assert not curve[estimate - 1]["meets"], curve  # bisected to the fewest
    assert curve[estimate]["mean_kl"] < curve[0]["mean_kl"] / 5

    trials = result["trials"]
    assert len(trials) == 2 and trials[0]["variant"] == "keep0", completed.stdout[-3000:] + completed.stderr[-2000:]
    # Trial 0 is the scheme as is: the field's known failure, and this CI's only run of it. Per-tensor INT8
    # runs in vLLM and its output degrades; ARC accuracy alone cannot tell (a recovery of 1.02 was measured),
    # the token-level rules can.
    assert trials[0]["status"] == "fail" and {"max_mean_kl", "min_top1_agreement"} <= set(trials[0]["reason"].split(", "))
    as_is = read_folder(Path(trials[0]["run_dir"], "model"))
    assert as_is[f"{UP}.weight"]["dtype"] == "I8" and as_is[f"{UP}.weight_scale"]["shape"] in ([], [1])
    assert f"{UP}.input_scale" in as_is  # static activation scale
    as_is_report = json.loads(Path(trials[0]["run_dir"], "report.json").read_text())
    assert as_is_report["verdict"] == "fail" and as_is_report["engine"]["name"] == "vllm"
    assert f"keep{estimate}" in {trial["variant"] for trial in trials}  # the second trial starts at the estimate

    # The proof: a trial passes, the command says how many were kept, and the export really keeps them.
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-2000:]
    fewest = result["fewest_layers_kept"]
    chosen = next(trial for trial in trials if trial["variant"] == f"keep{fewest}")
    assert chosen["status"] == "pass" and all(trial["status"] != "pass" for trial in trials
                                              if int(trial["variant"][4:]) < fewest)
    kept = result["kept_layers"]
    assert ranking[0]["layer"] in kept and f"fewest layers kept: {fewest}" in completed.stdout
    with safe_open(Path(chosen["run_dir"], "model", "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        for layer in kept:
            assert handle.get_slice(f"{layer}.weight").get_dtype() in ("BF16", "F32") and f"{layer}.weight_scale" not in names
        quantized = next(row["layer"] for row in ranking if row["layer"] not in kept)
        assert handle.get_slice(f"{quantized}.weight").get_dtype() == "I8" and f"{quantized}.weight_scale" in names
    # What it cost: the size the report states is the passing export's over the scheme as is.
    assert result["size_cost_bytes"] == chosen["export_size_bytes"] - trials[0]["export_size_bytes"] > 0
    assert "size cost:" in completed.stdout
    written = Path(result["recipe_file"]).read_text()
    assert all(layer in written for layer in kept) and "publish:" in written
