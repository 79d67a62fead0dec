"""The block formats of 2026 (OCP MXFP4/MXFP6, NVFP4): recipe names and explicit form, how Quark's
config is read back, what verify demands of the tensors, plan's sizes and who serves them. Fast:
real Quark configs recorded from exports of the tiny model (tests/fixtures/quark-block-configs) and
safetensors files written here; the slow end-to-end runs are in test_schemes_end_to_end.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from quantize_pipeline.engines import compat
from quantize_pipeline.errors import RecipeError, VerifyFailed
from quantize_pipeline.formats.quark_config import infer_from_quark_config
from quantize_pipeline.recipe.schema import Recipe, load_recipe
from quantize_pipeline.recipe.schemes import SCHEMES, get_scheme
from quantize_pipeline.verify import verify
from tests.conftest import REPO

CONFIGS = Path(__file__).parent / "fixtures" / "quark-block-configs"
BLOCK_SCHEMES = ["mxfp4", "mxfp4_weight_only", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_mxfp6_e2m3", "mxfp4_fp8", "nvfp4"]
UP = "model.layers.0.mlp.up_proj"  # [64, 32] here
LAYERS = [UP, "lm_head"]


def _config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", BLOCK_SCHEMES)
def test_each_quark_block_export_config_reads_back_as_its_scheme(name):
    assert infer_from_quark_config(_config(name)) == name
    assert verify.check_config(SCHEMES[name], {"quantization_config": _config(name)}) == []


def test_mxfp4_and_nvfp4_configs_are_told_apart():
    problems = verify.check_config(SCHEMES["nvfp4"], {"quantization_config": _config("mxfp4")})
    assert "weight block (group_size) is 32, expected 16" in problems
    assert "weight has e8m0 block scales, expected fp8_e4m3 block scales under a per-tensor scale" in problems
    problems = verify.check_config(SCHEMES["mxfp4"], {"quantization_config": _config("mxfp6_e2m3")})
    assert "weight dtype is 'fp6_e2m3', expected 'fp4'" in problems


def _recipe_with(scheme, tmp_path: Path) -> Path:
    recipe = yaml.safe_load((REPO / "recipes" / "smollm2-135m-int8.yaml").read_text())
    recipe["quantization"]["scheme"] = scheme
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_explicit_form_spells_out_block_schemes(tmp_path):
    nvfp4 = {"weight": {"dtype": "fp4_e2m1", "granularity": "per_block", "block_size": 16, "scale_dtype": "fp8_e4m3",
                        "global_scale": True},
             "activation": {"dtype": "fp4_e2m1", "granularity": "per_block", "dynamic": True}}
    assert load_recipe(_recipe_with(nvfp4, tmp_path)).scheme.name == "nvfp4"  # an explicit named scheme is that scheme
    mxfp6_weights = {"weight": {"dtype": "fp6_e3m2", "granularity": "per_block", "block_size": 32, "scale_dtype": "e8m0"}}
    spec = load_recipe(_recipe_with(mxfp6_weights, tmp_path)).scheme
    assert spec.name == "w-fp6_e3m2-per_block32-scale_e8m0-sym" and spec.weight_only
    assert get_scheme(spec.name) == spec  # names parse back to the same scheme


@pytest.mark.parametrize("weight, activation, message", [
    ({"dtype": "fp4_e2m1", "granularity": "per_group", "group_size": 32}, None,
     "quantization.scheme.weight: fp4_e2m1 elements share one scale per block: granularity must be per_block"),
    ({"dtype": "fp4_e2m1", "granularity": "per_block", "block_size": 16, "scale_dtype": "e8m0"}, None,
     "e8m0 block scales come one per 32 elements: block_size must be 32"),
    ({"dtype": "fp4_e2m1", "granularity": "per_block", "block_size": 32}, None, "per_block needs scale_dtype"),
    ({"dtype": "fp4_e2m1", "granularity": "per_block", "block_size": 16, "scale_dtype": "fp8_e4m3"}, None,
     "global_scale: true goes with fp8_e4m3 block scales"),
    ({"dtype": "fp6_e3m2", "granularity": "per_block", "block_size": 16, "scale_dtype": "fp8_e4m3", "global_scale": True},
     None, "fp8_e4m3 block scales are NVFP4's: dtype must be fp4_e2m1"),
    ({"dtype": "int8", "granularity": "per_block", "block_size": 32, "scale_dtype": "e8m0"}, None,
     "per_block takes fp4_e2m1, fp6_e3m2, fp6_e2m3 elements, not int8"),
    ({"dtype": "fp8_e4m3", "granularity": "per_block", "block_size": 32, "scale_dtype": "e8m0"}, None,
     "OCP MXFP8: Quark 0.13 cannot export it"),
    ({"dtype": "fp4_e2m1", "granularity": "per_block", "block_size": 32, "scale_dtype": "e8m0", "symmetric": False},
     None, "fp4_e2m1 has no zero point"),
    ({"dtype": "int8", "granularity": "per_channel", "block_size": 32}, None, "block_size applies to per_block only"),
    ({"dtype": "int8", "granularity": "per_channel"}, {"dtype": "fp4_e2m1", "granularity": "per_block", "dynamic": True},
     "quantization.scheme: per_block activations use the weight's blocks"),
    ({"dtype": "fp4_e2m1", "granularity": "per_block", "block_size": 32, "scale_dtype": "e8m0"},
     {"dtype": "fp4_e2m1", "granularity": "per_block", "dynamic": False}, "per_block needs dynamic: true"),
    ({"dtype": "fp4_e2m1", "granularity": "per_block", "block_size": 32, "scale_dtype": "e8m0"},
     {"dtype": "fp6_e2m3", "granularity": "per_token", "dynamic": True}, "granularity must be per_block"),
])
def test_impossible_block_combinations_are_refused_in_one_line(tmp_path, weight, activation, message):
    scheme = {"weight": weight, **({"activation": activation} if activation else {})}
    with pytest.raises(RecipeError) as refused:
        load_recipe(_recipe_with(scheme, tmp_path))
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert str(tmp_path / "recipe.yaml") in str(refused.value)


# ---- verify: packed codes, block-scale shapes and dtypes, NVFP4's tensor scales -----------

def _write(folder: Path, tensors: dict, quantization_config: dict | None) -> Path:
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"model_type": "llama", **({"quantization_config": quantization_config} if quantization_config else {})}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def base_dir(tmp_path):
    return _write(tmp_path / "base", {f"{UP}.weight": np.zeros((64, 32), np.float32),
                                      "lm_head.weight": np.zeros((16, 32), np.float32)}, None)


def _mxfp4_tensors() -> dict:
    return {f"{UP}.weight": np.zeros((64, 16), np.uint8),  # two FP4 codes per byte
            f"{UP}.weight_scale": np.full((64, 1), 127, np.uint8),  # one e8m0 exponent per 32
            "lm_head.weight": np.zeros((16, 32), np.float32)}


def _nvfp4_tensors() -> dict:
    return {f"{UP}.weight": np.zeros((64, 16), np.uint8),
            f"{UP}.weight_scale": np.ones((64, 2), np.float32),  # stands in for F8_E4M3 (numpy has no fp8)
            f"{UP}.weight_scale_2": np.ones((), np.float32), f"{UP}.input_scale_2": np.ones((), np.float32),
            "lm_head.weight": np.zeros((16, 32), np.float32)}


def _recipe(scheme: str) -> Recipe:
    return Recipe.model_validate({"name": "t", "model": {"source": "builtin:smollm2-135m-instruct"},
                                  "quantization": {"scheme": scheme}})


def _verify_problems(tmp_path: Path, base_dir: Path, tensors: dict, claimed: str, scheme: str) -> list[str]:
    """Verify an export of `tensors` whose config is the recorded Quark config of `claimed`, against
    `scheme`: it must fail; its recorded problems."""
    export = _write(tmp_path / "export", tensors, _config(claimed))
    with pytest.raises(VerifyFailed, match=f"export does not match scheme {scheme}"):
        verify.verify(_recipe(scheme), base_dir, export, LAYERS, tmp_path)
    return json.loads((tmp_path / "verify.json").read_text())["problems"]


def test_a_matching_mxfp4_export_passes(tmp_path, base_dir):
    export = _write(tmp_path / "export", _mxfp4_tensors(), _config("mxfp4"))
    summary = verify.verify(_recipe("mxfp4"), base_dir, export, LAYERS, tmp_path)
    assert summary["passed"] and summary["quantized_layers_checked"] == 1


def test_an_int8_export_labelled_mxfp4_fails(tmp_path, base_dir):
    """A hand-mislabelled MXFP4 export: the config says mxfp4, the tensors are INT8 per channel."""
    tensors = {f"{UP}.weight": np.zeros((64, 32), np.int8), f"{UP}.weight_scale": np.ones((64,), np.float32),
               "lm_head.weight": np.zeros((16, 32), np.float32)}
    problems = _verify_problems(tmp_path, base_dir, tensors, "mxfp4", "mxfp4")
    assert f"{UP}: weight stored as I8, expected U8 for mxfp4" in problems
    assert f"{UP}: scale shape [64], expected 64x1 e8m0 block scales" in problems


def test_unpacked_codes_or_wrong_blocks_fail(tmp_path, base_dir):
    tensors = _mxfp4_tensors() | {f"{UP}.weight": np.zeros((64, 32), np.uint8),  # one code per byte: not FP4
                                  f"{UP}.weight_scale": np.full((64, 2), 127, np.uint8)}  # blocks of 16
    problems = _verify_problems(tmp_path, base_dir, tensors, "mxfp4", "mxfp4")
    assert f"{UP}: weight shape [64, 32], expected [64, 16] for mxfp4" in problems
    assert f"{UP}: scale shape [64, 2], expected 64x1 e8m0 block scales" in problems


def test_nvfp4_needs_fp8_block_scales_and_its_tensor_scales(tmp_path, base_dir):
    tensors = _nvfp4_tensors()
    del tensors[f"{UP}.weight_scale_2"]
    problems = _verify_problems(tmp_path, base_dir, tensors, "nvfp4", "nvfp4")
    assert f"{UP}: weight_scale stored as F32, expected F8_E4M3 for nvfp4" in problems
    assert f"{UP}: no weight_scale_2" in problems


def test_an_mxfp4_export_labelled_nvfp4_fails_on_its_tensors(tmp_path, base_dir):
    problems = _verify_problems(tmp_path, base_dir, _mxfp4_tensors(), "nvfp4", "nvfp4")
    assert f"{UP}: scale shape [64, 1], expected 64x2 fp8_e4m3 block scales" in problems
    assert f"{UP}: weight_scale stored as U8, expected F8_E4M3 for nvfp4" in problems


# ---- plan and who serves them --------------------------------------------------------------

def test_plan_of_the_70b_mxfp4_recipe_from_the_shipped_config():
    from quantize_pipeline.recipe.plan import make_plan

    recipe = load_recipe(REPO / "recipes" / "llama70b-mxfp4.yaml")
    plan = make_plan(recipe, REPO / "recipes" / "model-configs" / "llama-3.1-70b-instruct" / "config.json")
    assert plan.counts["mxfp4"] == 80 * 7 and plan.layer_schemes["lm_head"] is None
    # 4.25 bits per quantized weight (FP4 + one e8m0 byte per 32) against 16; embeddings and lm_head stay bf16
    assert 0.27 < plan.export_size_bytes / plan.base_size_bytes < 0.32
    assert plan.engines["vllm-rocm"].supported and "MI350" in plan.engines["vllm-rocm"].reason
    assert not plan.engines["vllm-cpu"].supported


def test_nvfp4_costs_more_than_mxfp4_per_weight():
    from quantize_pipeline.recipe.plan import _quantized_bytes

    shape = (8192, 8192)
    mxfp4, nvfp4 = _quantized_bytes(SCHEMES["mxfp4"], shape), _quantized_bytes(SCHEMES["nvfp4"], shape)
    assert mxfp4 == 8192 * 8192 // 2 + 8192 * 8192 // 32
    assert nvfp4 == 8192 * 8192 // 2 + 8192 * 8192 // 16 + 8
    assert _quantized_bytes(SCHEMES["mxfp6_e3m2"], shape) == 8192 * 8192 * 6 // 8 + 8192 * 8192 // 32


@pytest.mark.parametrize("name", BLOCK_SCHEMES)
def test_block_schemes_are_refused_on_vllm_cpu_and_evaluated_in_transformers(name):
    assert not compat.support(name, "vllm-cpu").supported
    assert compat.support(name, "transformers").supported
    assert compat.support(name, "vllm-cuda").supported and compat.support(name, "vllm-rocm").supported


def test_nvfp4_weights_without_nvfp4_activations_have_no_vllm_loader():
    weights_only = get_scheme("w-fp4_e2m1-per_block16-scale_fp8_e4m3-global-sym")
    for engine in compat.VLLM_ENGINES:
        support = compat.support(weights_only.name, engine)
        assert not support.supported and "_is_nvfp4" in support.reason
    assert compat.support("w-fp6_e3m2-per_block32-scale_e8m0-sym", "vllm-cuda").reason.startswith("QuarkOCP_MX")
