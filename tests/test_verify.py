"""verify on real safetensors files written here: dtypes, scale shapes, exclusions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from quantize_pipeline.errors import VerifyFailed
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.recipe.schemes import SCHEMES
from quantize_pipeline.verify import verify

LAYERS = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "lm_head"]
QUARK_INT8_PER_CHANNEL = {
    "quant_method": "quark",
    "global_quant_config": {
        "weight": {"dtype": "int8", "qscheme": "per_channel", "is_dynamic": False},
        "input_tensors": {"dtype": "int8", "qscheme": "per_channel", "is_dynamic": True},
    },
}


def _recipe(scheme: str = "int8_per_channel") -> Recipe:
    return Recipe.model_validate(
        {"name": "t", "model": {"source": "builtin:smollm2-135m-instruct"}, "quantization": {"scheme": scheme}}
    )


def _write_model(folder, tensors: dict, quantization_config: dict | None):
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"model_type": "llama"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def base_dir(tmp_path):
    return _write_model(
        tmp_path / "base",
        {
            "model.layers.0.mlp.up_proj.weight": np.zeros((64, 32), np.float32),
            "model.layers.0.mlp.down_proj.weight": np.zeros((32, 64), np.float32),
            "lm_head.weight": np.zeros((16, 32), np.float32),
        },
        None,
    )


def _int8_export(scale_rows: int = 64, lm_head_dtype=np.float32) -> dict:
    return {
        "model.layers.0.mlp.up_proj.weight": np.zeros((64, 32), np.int8),
        "model.layers.0.mlp.up_proj.weight_scale": np.ones((scale_rows,), np.float32),
        "model.layers.0.mlp.down_proj.weight": np.zeros((32, 64), np.int8),
        "model.layers.0.mlp.down_proj.weight_scale": np.ones((32,), np.float32),
        "lm_head.weight": np.zeros((16, 32), lm_head_dtype),
    }


def test_a_matching_int8_export_passes(tmp_path, base_dir):
    export = _write_model(tmp_path / "export", _int8_export(), QUARK_INT8_PER_CHANNEL)
    summary = verify.verify(_recipe(), base_dir, export, LAYERS, tmp_path)
    assert summary["passed"] and summary["quantized_layers_checked"] == 2
    assert summary["excluded_layers"] == ["lm_head"]
    assert 0 < summary["size_ratio"] < 1


def test_per_tensor_scale_where_per_channel_was_asked_fails(tmp_path, base_dir):
    export = _write_model(tmp_path / "export", _int8_export(scale_rows=1), QUARK_INT8_PER_CHANNEL)
    with pytest.raises(VerifyFailed, match="up_proj: scale shape \\[1\\], expected one scale per output row"):
        verify.verify(_recipe(), base_dir, export, LAYERS, tmp_path)


def test_int8_export_labelled_fp8_fails(tmp_path, base_dir):
    """The field's classic: a checkpoint sold as FP8 whose tensors are really INT8."""
    export = _write_model(tmp_path / "export", _int8_export(), QUARK_INT8_PER_CHANNEL)
    problems = verify.check_config(SCHEMES["ptpc_fp8"], json.loads((export / "config.json").read_text()))
    assert "weight dtype is 'int8', expected 'fp8_e4m3'" in problems
    with pytest.raises(VerifyFailed, match="export does not match scheme ptpc_fp8"):
        verify.verify(_recipe("ptpc_fp8"), base_dir, export, LAYERS, tmp_path)
    recorded = json.loads((tmp_path / "verify.json").read_text())
    assert "model.layers.0.mlp.up_proj: weight stored as I8, expected F8_E4M3 for ptpc_fp8" in recorded["problems"]
    assert recorded["passed"] is False


def test_quantized_excluded_layer_fails(tmp_path, base_dir):
    export = _write_model(tmp_path / "export", _int8_export(lm_head_dtype=np.int8), QUARK_INT8_PER_CHANNEL)
    with pytest.raises(VerifyFailed, match="lm_head: excluded by the recipe but stored as I8"):
        verify.verify(_recipe(), base_dir, export, LAYERS, tmp_path)


def _moe_export(experts_dtype=np.float32) -> dict:
    """The int8 export plus what transformers 5 saves for a Mixtral-style MoE block: experts as fused 3-D
    parameters (no nn.Linear per expert, so Quark never quantizes them), the router a Linear, an embedding."""
    return {
        **_int8_export(),
        "model.embed_tokens.weight": np.zeros((16, 32), np.float32),
        "model.layers.0.mlp.experts.gate_up_proj": np.zeros((4, 128, 32), experts_dtype),
        "model.layers.0.mlp.experts.down_proj": np.zeros((4, 32, 64), experts_dtype),
    }


def test_experts_left_in_the_model_dtype_fail_naming_them(tmp_path, base_dir):
    """Measured on a tiny Mixtral (issue #25): Quark skipped the fused experts, the export kept them in BF16,
    and verify passed on the attention layers alone. Every weight the scheme covers must be quantized."""
    export = _write_model(tmp_path / "export", _moe_export(), QUARK_INT8_PER_CHANNEL)
    with pytest.raises(VerifyFailed, match=r"model.layers.0.mlp.experts.down_proj: F32 \[4x32x64\] left in the model dtype"):
        verify.verify(_recipe(), base_dir, export, LAYERS, tmp_path)
    problems = json.loads((tmp_path / "verify.json").read_text())["problems"]
    assert sorted(problem.split(":")[0] for problem in problems) == [
        "model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]  # not the embedding


def test_experts_the_recipe_excludes_may_stay_in_the_model_dtype(tmp_path, base_dir):
    export = _write_model(tmp_path / "export", _moe_export(), QUARK_INT8_PER_CHANNEL)
    recipe = Recipe.model_validate({"name": "t", "model": {"source": "builtin:smollm2-135m-instruct"},
                                    "quantization": {"scheme": "int8_per_channel", "exclude": ["lm_head", "re:.*experts"]}})
    assert verify.verify(recipe, base_dir, export, LAYERS, tmp_path)["passed"]


def test_missing_quantization_config_fails(tmp_path, base_dir):
    export = _write_model(tmp_path / "export", _int8_export(), None)
    with pytest.raises(VerifyFailed, match="no quantization_config"):
        verify.verify(_recipe(), base_dir, export, LAYERS, tmp_path)


def test_static_activation_scheme_needs_input_scales():
    problems = verify.check_config(
        SCHEMES["int8_per_tensor"],
        {"quantization_config": {**QUARK_INT8_PER_CHANNEL, "global_quant_config": {
            "weight": {"dtype": "int8", "qscheme": "per_tensor"},
            "input_tensors": {"dtype": "int8", "qscheme": "per_tensor", "is_dynamic": True},
        }}},
    )
    assert problems == ["activation quantization is not static"]


def test_scheme_is_read_back_from_a_quark_config():
    from quantize_pipeline.formats.quark_config import infer_from_quark_config

    assert infer_from_quark_config(QUARK_INT8_PER_CHANNEL) == "int8_per_channel"
    fp8 = {"global_quant_config": {
        "weight": {"dtype": "fp8_e4m3", "qscheme": "per_channel", "is_dynamic": False},
        "input_tensors": {"dtype": "fp8_e4m3", "qscheme": "per_channel", "is_dynamic": True},
    }}
    assert infer_from_quark_config(fp8) == "ptpc_fp8"
    int4 = {"global_quant_config": {"weight": {"dtype": "int4", "qscheme": "per_group", "group_size": 64}, "input_tensors": None}}
    assert infer_from_quark_config(int4) == "int4_wo_64"
    assert infer_from_quark_config({"global_quant_config": {"weight": {"dtype": "mxfp4"}}}) is None
