"""The explicit scheme form: validation, the SchemeSpec it builds, and how it flows into
compat, plan, verify and `run`'s refusal (no Quark import here: see test_quark_config.py)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from quantize_pipeline.engines import compat, vllm_serves
from quantize_pipeline.errors import RecipeError
from quantize_pipeline.formats.quark_config import infer_from_quark_config, infer_kv_cache
from quantize_pipeline.recipe import checks, schemes
from quantize_pipeline.recipe.plan import make_plan
from quantize_pipeline.recipe.schema import Recipe, load_recipe
from quantize_pipeline.recipe.schemes import SCHEMES, get_scheme, recipe_value
from quantize_pipeline.verify import verify
from tests.conftest import MINIMAL_RECIPE, REPO

UINT4_ASYM = {"weight": {"dtype": "uint4", "granularity": "per_group", "group_size": 64, "symmetric": False}}
INT8_ASYM_ACT = {
    "weight": {"dtype": "int8", "granularity": "per_channel"},
    "activation": {"dtype": "int8", "granularity": "per_token", "dynamic": True, "symmetric": False},
}
INT8_WEIGHT_ONLY = {"weight": {"dtype": "int8", "granularity": "per_channel"}}


def _recipe(scheme, **quantization) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "model": {"source": "builtin:smollm2-135m-instruct"},
        "quantization": {"scheme": scheme, **quantization},
    })


def _explicit_recipe_text(scheme: dict, **evaluation) -> str:
    data = yaml.safe_load(MINIMAL_RECIPE)
    data["quantization"]["scheme"] = scheme
    if evaluation:
        data["evaluation"] = evaluation
    return yaml.safe_dump(data)


@pytest.mark.parametrize("name", [name for name, spec in SCHEMES.items() if not spec.progressive])
def test_an_explicit_form_spelling_out_a_named_scheme_is_that_scheme(name):
    # The named scheme's fields, written out as a recipe's explicit mapping.
    explicit = recipe_value(dataclasses.replace(SCHEMES[name], name="spelled-out", quark_scheme=None))
    assert isinstance(explicit, dict) and explicit["weight"]["dtype"] == SCHEMES[name].weight_dtype
    recipe = _recipe(explicit)
    assert recipe.scheme is SCHEMES[name]
    assert recipe.scheme.name == name


def test_a_new_explicit_form_gets_a_stable_descriptive_name_that_parses_back():
    spec = _recipe(UINT4_ASYM).scheme
    assert spec.name == "w-uint4-per_group64-asym"
    assert spec.explicit and spec.weight_only and not spec.weight_symmetric and spec.group_size == 64
    assert "UINT4" in spec.description and "asymmetric" in spec.description
    assert get_scheme(spec.name) == spec
    assert _recipe(recipe_value(spec)).scheme == spec
    activations = _recipe(INT8_ASYM_ACT).scheme
    assert activations.name == "w-int8-per_channel-sym+a-int8-per_token-dynamic-asym"
    assert get_scheme(activations.name) == activations
    with pytest.raises(KeyError, match="unknown scheme"):
        get_scheme("w-int9-per_channel-sym")


@pytest.mark.parametrize(
    ("scheme", "field", "words"),
    [
        ({"weight": {"dtype": "int4", "granularity": "per_group"}}, "quantization.scheme.weight",
         "per_group needs group_size"),
        ({"weight": {"dtype": "int8", "granularity": "per_token"}}, "quantization.scheme.weight.granularity",
         "per_token is an activation granularity"),
        ({"weight": {"dtype": "int8", "granularity": "per_channel", "dynamic": True}},
         "quantization.scheme.weight.dynamic", "weights are quantized once, offline"),
        ({"weight": {"dtype": "int8", "granularity": "per_channel", "group_size": 64}}, "quantization.scheme.weight",
         "group_size applies to per_group only"),
        ({"weight": {"dtype": "fp8_e4m3", "granularity": "per_tensor", "symmetric": False}},
         "quantization.scheme.weight", "fp8_e4m3 has no zero point"),
        ({"weight": {"dtype": "int3", "granularity": "per_channel"}}, "quantization.scheme.weight.dtype", "int8"),
        ({"weight": {"dtype": "int8", "granularity": "per_channel", "grup_size": 8}},
         "quantization.scheme.weight.grup_size", "unknown key"),
        ({**INT8_WEIGHT_ONLY, "activation": {"dtype": "int8", "granularity": "per_token", "dynamic": False}},
         "quantization.scheme.activation", "per_token needs dynamic: true"),
        ({**INT8_WEIGHT_ONLY, "activation": {"dtype": "int8", "granularity": "per_channel", "dynamic": True}},
         "quantization.scheme.activation.granularity", "activations are per_tensor, per_token or per_block"),
        ({**INT8_WEIGHT_ONLY, "activation": {"dtype": "int8", "granularity": "per_tensor"}},
         "quantization.scheme.activation.dynamic", "required field is missing"),
        ({"activation": None}, "quantization.scheme.weight", "required field is missing"),
        ({"weight": {"dtype": "int4", "granularity": "per_group", "group_size": 0}},
         "quantization.scheme.weight.group_size", "greater than or equal to 1"),
    ],
)
def test_impossible_explicit_forms_are_refused_in_one_line(write_recipe, scheme, field, words):
    path = write_recipe(_explicit_recipe_text(scheme))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    line = caught.value.one_line()
    assert line.startswith(f"{path}: {field}: "), line
    assert words in line and "\n" not in line
    assert "explicit-scheme" not in line and "named-scheme" not in line


def test_layers_overrides_accept_the_explicit_form(write_recipe):
    data = yaml.safe_load(MINIMAL_RECIPE)
    data["quantization"]["layers"] = {"re:.*mlp.*": UINT4_ASYM, "o_proj": "int4_wo_64"}
    recipe = load_recipe(write_recipe(yaml.safe_dump(data)))
    assert {pattern: spec.name for pattern, spec in recipe.quantization.layer_schemes().items()} == {
        "re:.*mlp.*": "w-uint4-per_group64-asym", "o_proj": "int4_wo_64",
    }
    data["quantization"]["layers"] = {"o_proj": {"weight": {"dtype": "int4", "granularity": "per_group"}}}
    with pytest.raises(RecipeError, match=r"quantization\.layers\.o_proj\.weight: per_group needs group_size"):
        load_recipe(write_recipe(yaml.safe_dump(data)))


def test_resolved_recipe_round_trips(write_recipe):
    recipe = _recipe(UINT4_ASYM, algorithm={"name": "gptq", "options": {"damp_percent": 0.05}})
    again = load_recipe(write_recipe(yaml.safe_dump(recipe.model_dump(mode="json"))))
    assert again == recipe and again.content_hash() == recipe.content_hash()
    assert again.quantization.algorithm_options == {"damp_percent": 0.05}


def test_scheme_is_read_back_from_an_explicit_quark_config():
    config = {"global_quant_config": {
        "weight": {"dtype": "uint4", "qscheme": "per_group", "group_size": 64, "symmetric": False, "is_dynamic": False},
        "input_tensors": None,
    }}
    assert infer_from_quark_config(config) == "w-uint4-per_group64-asym"
    config["global_quant_config"]["weight"]["symmetric"] = True
    config["global_quant_config"]["weight"]["dtype"] = "int4"
    assert infer_from_quark_config(config) == "int4_wo_64"


def test_compat_decides_explicit_forms_from_vllm_loader_rules(monkeypatch):
    monkeypatch.setattr(vllm_serves, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})  # where it was measured
    uint4 = _recipe(UINT4_ASYM).scheme.name
    assert compat.support(uint4, "vllm-cpu") == compat.Support(True, vllm_serves.MEASURED_EXPLICIT_ON_CPU[uint4], compat.MEASURED)
    assert compat.support(uint4, "vllm-cuda").supported
    int8_wo = _recipe(INT8_WEIGHT_ONLY).scheme.name
    for engine in compat.VLLM_ENGINES:
        entry = compat.support(int8_wo, engine)
        assert not entry.supported and "int4/uint4 weight-only only" in entry.reason
    assert compat.support(int8_wo, "transformers").supported
    asym_activations = compat.support(_recipe(INT8_ASYM_ACT).scheme.name, "vllm-cpu")
    assert asym_activations.supported and asym_activations.source == compat.MEASURED
    asym_weights = {"weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": False},
                    "activation": INT8_ASYM_ACT["activation"]}
    assert "symmetric weights only" in compat.support(_recipe(asym_weights).scheme.name, "vllm-cuda").reason
    fp8_dynamic_tensor = {"weight": {"dtype": "fp8_e4m3", "granularity": "per_channel"},
                          "activation": {"dtype": "fp8_e4m3", "granularity": "per_tensor", "dynamic": True}}
    name = _recipe(fp8_dynamic_tensor).scheme.name
    assert compat.support(name, "vllm-cuda").supported and not compat.support(name, "vllm-cpu").supported


def test_recipe_support_and_plan_use_the_explicit_scheme():
    recipe = _recipe(INT8_WEIGHT_ONLY)
    assert not checks.recipe_support(recipe, "vllm-cpu").supported
    plan = make_plan(recipe, REPO / "recipes" / "model-configs" / "llama-3.1-8b-instruct" / "config.json")
    assert plan.counts["w-int8-per_channel-sym"] == 32 * 7
    assert not plan.engines["vllm-cpu"].supported and plan.engines["transformers"].supported
    asym = make_plan(_recipe(UINT4_ASYM), REPO / "recipes" / "model-configs" / "llama-3.1-8b-instruct" / "config.json")
    symmetric = make_plan(_recipe("int4_wo_64"), REPO / "recipes" / "model-configs" / "llama-3.1-8b-instruct" / "config.json")
    assert asym.export_size_bytes > symmetric.export_size_bytes  # zero points cost bytes


def test_run_refuses_an_explicit_scheme_vllm_cannot_serve_before_loading(write_recipe, tmp_path):
    if compat.installed_vllm_engine() is None:
        pytest.skip("needs a vLLM build installed (the refusal names it)")
    path = write_recipe(_explicit_recipe_text(INT8_WEIGHT_ONLY, engine="vllm"))
    done = subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "run", str(path), "--output-dir", str(tmp_path / "exports")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert f"{path}: quantization.scheme: w-int8-per_channel-sym cannot be served by" in done.stderr
    assert "int4/uint4 weight-only only" in done.stderr
    assert not (tmp_path / "exports").exists()


def test_verify_checks_an_explicit_scheme_config():
    spec = _recipe(UINT4_ASYM).scheme
    good = {"quantization_config": {"quant_method": "quark", "global_quant_config": {
        "weight": {"dtype": "uint4", "qscheme": "per_group", "group_size": 64, "symmetric": False}}}}
    assert verify.check_config(spec, good) == []
    bad = {"quantization_config": {"quant_method": "quark", "global_quant_config": {
        "weight": {"dtype": "int4", "qscheme": "per_group", "group_size": 128, "symmetric": True}}}}
    assert verify.check_config(spec, bad) == [
        "weight dtype is 'int4', expected 'uint4'",
        "weight group_size is 128, expected 64",
        "weight symmetric is True, expected False",
    ]
    layer = "model.layers.0.mlp.up_proj"
    exported = {f"{layer}.weight": {"dtype": "I32", "shape": [64, 4]}, f"{layer}.weight_scale": {"dtype": "BF16", "shape": [64, 0]}}
    problems, _, _ = verify.check_tensors(spec, exported, {}, [layer], ())
    assert f"{layer}: asymmetric weights but no weight_zero_point" in problems


def test_verify_checks_the_kv_cache_group():
    layers = ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"]
    group = {"output_tensors": {"dtype": "fp8_e4m3", "qscheme": "per_tensor"}}
    config = {"quantization_config": {"kv_cache_quant_config": {"*k_proj": group, "*v_proj": group}}}
    exported = {f"{layer}.output_scale": {"dtype": "BF16", "shape": []} for layer in layers[:2]}
    assert verify.check_kv_cache("fp8", config, exported, layers) == []
    assert infer_kv_cache(config["quantization_config"]) == "fp8"
    assert verify.check_kv_cache("fp8", {"quantization_config": {}}, {}, layers) == [
        "quantization_config has no kv_cache_quant_config (the recipe asks for kv_cache)",
        "model.layers.0.self_attn.k_proj: no output_scale for the KV cache (+1 more k/v layers)",
    ]
    assert verify.check_kv_cache(None, config, exported, layers) == [
        "kv_cache_quant_config present, but the recipe has no kv_cache"
    ]


def test_kv_cache_fp8_support_is_recorded_per_engine(monkeypatch):
    monkeypatch.setattr(vllm_serves, "cpu_flags", lambda: {"avx512f", "amx_tile"})  # AVX2 refuses it: test_compat
    entry = compat.kv_cache_support("fp8", "vllm-cpu")
    assert entry.supported and entry.source == compat.MEASURED
    recipe = _recipe("int8_per_channel", kv_cache="fp8")
    verdict = checks.recipe_support(recipe, "vllm-cpu")
    assert verdict.supported and "kv_cache fp8" in verdict.reason


@pytest.mark.parametrize("fields, problem", [
    (dict(weight_granularity="per_group"), "per_group weights need a group_size"),
    (dict(weight_granularity="per_channel", group_size=64), "only per_group weights take one"),
    (dict(weight_granularity="per_group", group_size=0), "group_size 0 is not positive"),
    (dict(weight_granularity="per_block", block_size=32), "per_block weights need a block_size and a scale_dtype"),
    (dict(weight_granularity="per_channel", global_scale=True), "only per_block weights take a global scale"),
    (dict(weight_granularity="per_channel", activation_granularity="per_token"), "weight-only: no activation"),
    (dict(weight_granularity="per_channel", activation_dtype="int8", activation_granularity="per_block"),
     "per_block activations share the weights' blocks"),
    (dict(weight_granularity="per_row"), "weight int4 per_row is not one of ours"),
])
def test_a_scheme_in_a_bad_state_cannot_be_built(fields, problem):
    with pytest.raises(ValueError, match=problem):
        schemes.SchemeSpec("bad", "bad", "int4", **fields)
    with pytest.raises(ValueError, match=problem):  # nor made by changing a good one
        dataclasses.replace(SCHEMES["int4_wo_64"], **({"group_size": None} | fields))
