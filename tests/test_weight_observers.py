"""Calibrated streaming and the data-free module path lighten two pieces of Quark's work on weights (issue #26):
weight observers skip the calibration-token count, and freeze skips the fake-quantized copy of symmetric weights.
The slow equality tests (test_streaming_equality.py, test_data_free.py) hold the exports to Quark's in-memory bytes;
these check the rules themselves."""

from __future__ import annotations

import copy

import pytest
import torch

from quantize_pipeline.formats.quark_config import build_quark_config
from quantize_pipeline.quantize.freeze import weights_fake_quantized_on_freeze
from quantize_pipeline.quantize.weight_observers import use_uncounted_observers
from quantize_pipeline.recipe.schema import Recipe

pytestmark = pytest.mark.slow  # imports Quark (its kernels: ~15 s)

UINT4_ASYMMETRIC = {"weight": {"dtype": "uint4", "granularity": "per_group", "group_size": 64, "symmetric": False},
                    "activation": None}


def _quark_config(scheme):
    recipe = Recipe.model_validate({"name": "observers", "model": {"source": "org/unused"},
                                    "quantization": {"scheme": scheme, "exclude": ["lm_head"]}})
    return build_quark_config(recipe, "llama", ["lm_head"], {})


@pytest.mark.parametrize(("scheme", "fake_quantized"), [
    ("fp8", False), ("int8_per_channel", False), ("int4_wo_64", False), ("mxfp4", False), ("int4_fp8", False),
    (UINT4_ASYMMETRIC, True),  # zero points: quantizing the originals gave other bytes (compared)
])
def test_freeze_keeps_the_fake_quantized_weights_for_asymmetric_weights_only(scheme, fake_quantized):
    assert weights_fake_quantized_on_freeze(_quark_config(scheme)) is fake_quantized


def test_weight_observers_skip_the_token_count_and_leave_activations_counting():
    config = _quark_config("fp8")
    original = copy.deepcopy(config)
    use_uncounted_observers(config)
    layer = config.global_quant_config
    weight_cls, input_cls = layer.weight.observer_cls, layer.input_tensors.observer_cls
    assert weight_cls is not input_cls and issubclass(weight_cls, input_cls)
    assert input_cls is original.global_quant_config.input_tensors.observer_cls  # the shared spec was copied first
    tensor = torch.ones(4, 8)
    weight_observer, input_observer = weight_cls(layer.weight), input_cls(layer.input_tensors)
    weight_observer.record_observed_tokens(tensor)
    input_observer.record_observed_tokens(tensor)
    assert (weight_observer._num_observed_tokens, input_observer._num_observed_tokens) == (0, 4)
    # min/max, and so the scale, are Quark's own
    weight_observer(tensor * 3)
    input_observer(tensor * 3)
    assert torch.equal(weight_observer._calculate_qparams()[0], input_observer._calculate_qparams()[0])


def test_activation_observers_skip_the_count_only_when_asked():
    config = _quark_config("fp8")
    use_uncounted_observers(config, activations=True)
    layer = config.global_quant_config
    counted = _quark_config("fp8").global_quant_config.input_tensors.observer_cls
    uncounted = layer.input_tensors.observer_cls
    assert uncounted is not counted and issubclass(uncounted, counted)
    observer = uncounted(layer.input_tensors)
    observer.record_observed_tokens(torch.ones(4, 8))
    assert observer._num_observed_tokens == 0


def test_only_per_expert_modules_count_as_experts():
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from quantize_pipeline.quantize import moe

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 2, "vocab_size": 64}
    dense = LlamaForCausalLM(LlamaConfig(**small))
    assert not moe.has_experts(dense.model.layers[0])
    mixtral = MixtralForCausalLM(MixtralConfig(**small, num_local_experts=2, num_experts_per_tok=1))
    moe.unfuse_experts(mixtral)
    assert moe.has_experts(mixtral.model.layers[0])
