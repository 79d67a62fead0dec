"""The Quark config a recipe builds: explicit schemes from Quark's own spec classes, algorithm
options over the template defaults. Real Quark objects (no model loaded); marked slow only because
importing Quark takes tens of seconds on a busy 2-core machine."""

from __future__ import annotations

import dataclasses

import pytest

from quantize_pipeline.formats import quark_config
from quantize_pipeline.quantize import quantize
from quantize_pipeline.recipe.schema import ALGORITHMS, Recipe
from quantize_pipeline.recipe.schemes import SCHEMES

pytestmark = pytest.mark.slow

EXCLUDED = ["lm_head"]


def _recipe(scheme, **quantization) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "model": {"source": "builtin:smollm2-135m-instruct"},
        "quantization": {"scheme": scheme, **quantization},
    })


def _config(recipe: Recipe):
    return quark_config.build_quark_config(recipe, "llama", EXCLUDED, {})


@pytest.mark.parametrize("name", [name for name, spec in SCHEMES.items() if spec.quark_scheme and not spec.progressive])
def test_our_layer_config_equals_quarks_template_scheme(name):
    """The builder that serves explicit forms rebuilds Quark's own named schemes exactly."""
    from quark.torch import LLMTemplate

    ours = quark_config.layer_config(SCHEMES[name]).to_dict()
    quarks = LLMTemplate._SCHEME_COLLECTION.get_scheme(SCHEMES[name].quark_scheme).config.to_dict()
    assert ours == quarks


def test_an_explicit_form_of_a_named_scheme_builds_the_same_quark_config():
    explicit = {
        "weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": True},
        "activation": {"dtype": "int8", "granularity": "per_token", "dynamic": True, "symmetric": True},
    }
    assert str(_config(_recipe(explicit))) == str(_config(_recipe("int8_per_channel")))
    int4 = {"weight": {"dtype": "int4", "granularity": "per_group", "group_size": 64}}
    assert str(_config(_recipe(int4))) == str(_config(_recipe("int4_wo_64")))


def test_an_explicit_form_reaches_quark_field_by_field():
    recipe = _recipe({
        "weight": {"dtype": "uint4", "granularity": "per_group", "group_size": 64, "symmetric": False},
    }, layers={"o_proj": {
        "weight": {"dtype": "int8", "granularity": "per_channel"},
        "activation": {"dtype": "uint8", "granularity": "per_tensor", "dynamic": False, "symmetric": False},
    }})
    names = ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.up_proj"]
    overrides = quantize.layer_overrides(recipe, names, excluded=["model.layers.1.self_attn.o_proj"])
    # The scheme objects come from the recipe, not parsed back from their names.
    assert list(overrides) == ["model.layers.0.self_attn.o_proj"]
    assert overrides["model.layers.0.self_attn.o_proj"] == recipe.quantization.layer_schemes()["o_proj"]
    assert overrides["model.layers.0.self_attn.o_proj"].name == "w-int8-per_channel-sym+a-uint8-per_tensor-static-asym"
    config = quark_config.build_quark_config(recipe, "llama", EXCLUDED, overrides).to_dict()
    weight = config["global_quant_config"]["weight"]
    assert (weight["dtype"], weight["qscheme"], weight["group_size"], weight["symmetric"]) == ("uint4", "per_group", 64, False)
    assert config["global_quant_config"]["input_tensors"] is None
    layer = config["layer_quant_config"]["model.layers.0.self_attn.o_proj"]
    assert (layer["weight"]["dtype"], layer["weight"]["qscheme"], layer["weight"]["ch_axis"]) == ("int8", "per_channel", 0)
    assert (layer["input_tensors"]["dtype"], layer["input_tensors"]["is_dynamic"], layer["input_tensors"]["symmetric"]) == (
        "uint8", False, False)


def test_algorithm_options_reach_the_quark_config_over_the_template_defaults():
    plain = _config(_recipe("int4_wo_64", algorithm="gptq")).algo_config[0]
    tuned = _config(_recipe("int4_wo_64", algorithm={"name": "gptq", "options": {"damp_percent": 0.05, "block_size": 64}}))
    [gptq] = tuned.algo_config
    assert (gptq.damp_percent, gptq.block_size) == (0.05, 64)
    assert plain.damp_percent == 0.01 and gptq.inside_layer_modules == plain.inside_layer_modules  # template kept
    [smooth] = _config(_recipe("int8_per_channel", algorithm={"name": "smoothquant", "options": {"alpha": 0.5}})).algo_config
    assert type(smooth).__name__ == "SmoothQuantConfig" and smooth.alpha == 0.5 and smooth.scaling_layers


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_recipe_options_are_fields_of_quarks_config_class(algorithm):
    """The recipe schema mirrors Quark's config classes (validate must not import Quark): a field
    renamed or removed in Quark fails here."""
    from quark.torch.quantization.config import config as quark_config

    quark_fields = {field.name for field in dataclasses.fields(getattr(quark_config, ALGORITHMS[algorithm].quark_config_class))}
    ours = set(ALGORITHMS[algorithm].options.model_fields)
    assert ours <= quark_fields - {"name"}, ours - quark_fields
    # Everything Quark offers is in the recipe, except nested config objects.
    assert quark_fields - {"name", "online_config"} <= ours
