"""Calibration samples grouped into forward passes (quantize/forward_batches.py): only where every static
observer is a min/max one, consecutive samples of one length, up to BATCH_TOKENS a pass."""

from __future__ import annotations

import pytest

from quantize_pipeline.quantize.forward_batches import BATCH_TOKENS, forward_batches, static_activation_observers
from quantize_pipeline.recipe.schema import Recipe


def _quark_config(scheme: str, **quantization):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantize_pipeline.quantize.quantize import resolve_config

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, vocab_size=100))
    recipe = Recipe.model_validate({"name": "x", "model": {"source": "builtin:smollm2-135m-instruct"},
                                    "quantization": {"scheme": scheme, **quantization}})
    return resolve_config(recipe, model).quark_config


@pytest.mark.parametrize(("scheme", "kv_cache", "observers"), [
    ("fp8", None, {"PerTensorMinMaxObserver"}),
    ("fp8", "fp8", {"PerTensorMinMaxObserver"}),  # the k/v output scales too
    ("int8_per_tensor", None, {"PerTensorMinMaxObserver"}),
    ("int8_per_channel", None, set()),  # dynamic activations: nothing observed per pass
    ("int4_wo_64", None, set()),
])
def test_static_activation_observers_of_real_configs(scheme, kv_cache, observers):
    assert static_activation_observers(_quark_config(scheme, kv_cache=kv_cache)) == observers


def test_equal_lengths_go_together_up_to_the_token_bound_in_order():
    samples = [[index] * 128 for index in range(20)]
    passes = forward_batches(samples, _quark_config("fp8"))
    per_pass = BATCH_TOKENS // 128
    assert [len(group) for group in passes] == [per_pass, per_pass, 20 - 2 * per_pass]
    assert [ids for group in passes for ids in group] == samples  # every sample once, in order


def test_a_length_change_starts_a_new_pass_and_a_long_sample_goes_alone():
    samples = [[1] * 5, [2] * 5, [3] * 7, [4] * 5, [5] * (BATCH_TOKENS + 1), [6] * (BATCH_TOKENS + 1)]
    passes = forward_batches(samples, _quark_config("fp8"))
    assert passes == [[[1] * 5, [2] * 5], [[3] * 7], [[4] * 5], [[5] * (BATCH_TOKENS + 1)], [[6] * (BATCH_TOKENS + 1)]]


def test_an_algorithm_or_another_observer_keeps_one_sample_a_pass(monkeypatch):
    from quark.torch.quantization.observer.observer import PerTensorPercentileObserver

    samples = [[7] * 16 for _ in range(4)]
    smoothed = _quark_config("fp8", algorithm="smoothquant")
    assert smoothed.algo_config
    assert forward_batches(samples, smoothed) == [[ids] for ids in samples]
    percentile = _quark_config("fp8")
    percentile.global_quant_config.input_tensors.observer_cls = PerTensorPercentileObserver
    assert static_activation_observers(percentile) == {"PerTensorPercentileObserver"}
    assert forward_batches(samples, percentile) == [[ids] for ids in samples]


@pytest.mark.slow
def test_grouped_passes_give_the_per_sample_scales_on_the_tiny_model(tmp_path, monkeypatch):
    """The real model, fp8 with the fp8 KV cache: every static scale is what one-sample passes give (the same
    bits on this machine; allowed: one bf16 rounding step, where another machine's kernels sum a batch
    otherwise)."""
    import torch

    from quantize_pipeline.quantize import forward_batches as batching
    from quantize_pipeline.quantize.quantize import quantize
    from quantize_pipeline.recipe.models import converted_model_dir

    recipe = Recipe.model_validate({
        "name": "batches", "model": {"source": "builtin:smollm2-135m-instruct"},
        "calibration": {"samples": 8, "max_seq_len": 32},
        "quantization": {"scheme": "fp8", "kv_cache": "fp8", "mode": "in_memory"}})
    from transformers import AutoModelForCausalLM

    model_dir = converted_model_dir(recipe.model)
    generator = torch.Generator().manual_seed(0)
    samples = torch.randint(100, 40000, (8, 32), generator=generator).tolist()

    def scales(limit: int) -> dict:
        monkeypatch.setattr(batching, "BATCH_TOKENS", limit)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        (tmp_path / str(limit)).mkdir()
        model, _, summary = quantize(recipe, model, samples, tmp_path / str(limit))
        found = {name: module.scale.detach().clone() for name, module in model.named_modules()
                 if type(module).__name__.endswith("FakeQuantize") and "weight" not in name}
        return summary["calibration_batches"], found

    batches_one, one = scales(0)
    batches_grouped, grouped = scales(BATCH_TOKENS)
    assert (batches_one, batches_grouped) == (8, 1)
    assert one.keys() == grouped.keys() and len(one) > 30  # inputs of every linear, k/v outputs
    for name in one:
        assert torch.allclose(one[name].float(), grouped[name].float(), rtol=2**-7, atol=0), name
