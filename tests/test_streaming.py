"""quantization.mode: the recipe rules, the auto decision, and the streaming path's shard reader/writer.

The equality of streaming and in-memory exports on the real model is in test_streaming_equality.py (slow).
"""

from __future__ import annotations

import json

import pytest

from quantize_pipeline.errors import RecipeError
from quantize_pipeline.recipe import plan
from quantize_pipeline.recipe.schema import Recipe, ResourcesSpec, load_recipe
from tests.conftest import REPO

LLAMA_8B = REPO / "recipes" / "model-configs" / "llama-3.1-8b-instruct" / "config.json"


def _recipe(**quantization) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "model": {"source": "builtin:smollm2-135m-instruct"},
        "quantization": {"scheme": "fp8", **quantization},
    })


def test_mode_defaults_to_auto():
    assert _recipe().quantization.mode == "auto"


@pytest.mark.parametrize(("extra", "words"), [
    ({"algorithm": "gptq"}, "algorithm gptq needs the whole model"),
    ({"algorithm": "smoothquant"}, "algorithm smoothquant needs the whole model"),
])
def test_streaming_refuses_whole_model_features_naming_the_field(write_recipe, minimal_recipe_text, extra, words):
    lines = "".join(f"  {key}: {value}\n" for key, value in extra.items())
    path = write_recipe(minimal_recipe_text + lines + "  mode: streaming\n")
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert "quantization.mode" in str(raised.value) and words in str(raised.value)
    assert "\n" not in str(raised.value)


def test_unknown_mode_is_refused(write_recipe, minimal_recipe_text):
    with pytest.raises(RecipeError, match="quantization.mode"):
        load_recipe(write_recipe(minimal_recipe_text + "  mode: sometimes\n"))


@pytest.mark.parametrize(("extra", "words"), [
    ({"scheme": "fp8"}, "fp8 has static activation scales (calibrated)"),
    ({"scheme": "int4_fp8"}, "int4_fp8's per_tensor activation scale is calibrated"),
    ({"scheme": "nvfp4"}, "nvfp4 has static activation scales"),
    ({"algorithm": "gptq"}, "algorithm gptq needs calibration data"),
    ({"kv_cache": "fp8"}, "kv_cache fp8's scales are calibrated"),
])
def test_data_free_refuses_what_needs_calibration_naming_the_field(write_recipe, extra, words):
    lines = "".join(f"  {key}: {value}\n" for key, value in extra.items())
    text = "name: tiny\nmodel:\n  source: builtin:smollm2-135m-instruct\nquantization:\n"
    if "scheme" not in extra:
        text += "  scheme: int8_per_channel\n"
    with pytest.raises(RecipeError) as raised:
        load_recipe(write_recipe(text + lines + "  mode: data_free\n"))
    assert "quantization" in str(raised.value) and words in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("scheme", ["int8_per_channel", "ptpc_fp8", "int4_wo_64", "mxfp4_weight_only", "mxfp4"])
def test_auto_is_data_free_for_schemes_without_static_activation_scales(scheme):
    mode, reason = _mode(8, scheme=scheme)
    assert mode == "data_free" and "no calibration needed" in reason
    assert _recipe(scheme=scheme, mode="data_free").quantization.mode == "data_free"


def _mode(budget_gib: float, **quantization) -> tuple[str, str]:
    recipe = _recipe(**quantization).model_copy(update={"resources": ResourcesSpec(host_memory_gb=budget_gib)})
    return plan.quantize_mode(recipe, LLAMA_8B, "cpu")


def test_explicit_mode_is_kept_with_its_reason():
    assert _mode(8, mode="in_memory") == ("in_memory", "as the recipe asks")


def test_auto_streams_when_the_in_memory_estimate_exceeds_the_budget():
    mode, reason = _mode(8)  # 8B in bf16: ~18.7 GiB in memory
    assert mode == "streaming" and "> budget 8.0 GiB" in reason


def test_auto_stays_in_memory_when_it_fits():
    mode, reason = _mode(64)
    assert mode == "in_memory" and "fits" in reason


def test_auto_with_an_algorithm_falls_back_to_in_memory_and_says_why():
    mode, reason = _mode(8, scheme="int4_wo_64", algorithm="gptq")
    assert mode == "in_memory" and "gptq needs the whole model" in reason


@pytest.mark.parametrize("max_shard_bytes", [10**9, 3000])
def test_shard_writer_layout_reads_back(tmp_path, max_shard_bytes):
    import torch

    from quantize_pipeline.quantize.streaming import CheckpointReader, ShardWriter

    tensors = {f"model.layers.{index}.weight": torch.full((16, 16), float(index)) for index in range(4)}
    writer = ShardWriter(tmp_path, max_shard_bytes=max_shard_bytes)
    for name, tensor in tensors.items():
        writer.add({name: tensor})
    files = writer.close()
    names = sorted(path.name for path in tmp_path.iterdir())
    if max_shard_bytes == 3000:  # 1 KiB tensors, at most 2 per shard, as save_pretrained names them
        assert files == [f"model-0000{number}-of-00002.safetensors" for number in (1, 2)]
        assert names == sorted(files + ["model.safetensors.index.json"])
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == 4 * 16 * 16 * 4
    else:
        assert files == names == ["model.safetensors"]
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.names("model.layers.")) == sorted(tensors)
    read = reader.read(["model.layers.3.weight", "model.layers.0.weight"])
    assert torch.equal(read["model.layers.3.weight"], tensors["model.layers.3.weight"])
    assert torch.equal(read["model.layers.0.weight"], tensors["model.layers.0.weight"])


def test_container_names_modules_as_the_full_model():
    import torch

    from quantize_pipeline.quantize.streaming import _named_container

    layer = torch.nn.Sequential()
    layer.add_module("q_proj", torch.nn.Linear(4, 4))
    container = _named_container("model.layers.7", layer)
    assert "model.layers.7.q_proj" in dict(container.named_modules())
    inputs = torch.ones(1, 4)
    container.batches = [{"hidden_states": inputs}]
    output = container(inputs)
    assert container.batches == [{"hidden_states": output}] and container.seen == 1  # the output replaced its input


def test_layer_state_resumes_after_the_last_layer_that_verifies(tmp_path):
    import torch

    from quantize_pipeline.quantize.stream_state import LayerState

    state = LayerState(tmp_path / "layers", "key-1")
    for index in range(3):
        state.save(index, {f"layers.{index}.w": torch.full((4,), float(index))}, [torch.full((2, 3), float(index))])
    assert state.finished_layers(5, needs_hidden=True) == 3
    assert not (tmp_path / "layers" / "layer-00000.hidden.safetensors").exists()  # only the newest boundary is kept
    assert torch.equal(state.load_hidden(2, "cpu")[0], torch.full((2, 3), 2.0))
    assert torch.equal(state.load_tensors(1)["layers.1.w"], torch.full((4,), 1.0))

    (tmp_path / "layers" / "layer-00002.hidden.safetensors").write_bytes(b"torn")  # the boundary does not verify
    assert state.finished_layers(5, needs_hidden=True) == 0  # no earlier boundary is kept: start over
    assert state.finished_layers(5, needs_hidden=False) == 3  # weight-only schemes need no boundary

    with open(tmp_path / "layers" / "layer-00001.safetensors", "r+b") as handle:  # a flipped byte in layer 1
        handle.seek(-1, 2)
        handle.write(b"\x01")
    assert state.finished_layers(5, needs_hidden=False) == 1

    assert LayerState(tmp_path / "layers", "key-2").finished_layers(5, needs_hidden=False) == 0  # other inputs


def test_streaming_takes_the_kv_cache_scales(write_recipe, minimal_recipe_text):
    recipe = load_recipe(write_recipe(minimal_recipe_text + "  kv_cache: fp8\n  mode: streaming\n"))
    assert recipe.quantization.mode == "streaming" and recipe.quantization.kv_cache == "fp8"


def test_auto_is_not_data_free_when_the_checkpoint_fuses_experts(tmp_path):
    """Some repos ship experts fused in one 3-D tensor: no linear of its own to quantize shard by shard."""
    import torch
    from safetensors.torch import save_file

    from quantize_pipeline.recipe import checks

    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(2, 4, 3),
               "model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    fused = checks.fused_checkpoint_tensor(tmp_path)
    assert fused == "model.layers.0.mlp.experts.gate_up_proj"
    peaks = {mode: {"host": 2**30, "device": 0} for mode in ("in_memory", "streaming", "data_free")}
    recipe = _recipe(scheme="int8_per_channel")
    assert plan.choose_mode(recipe, peaks, 8 * 2**30, "cpu", None)[0] == "data_free"
    assert plan.choose_mode(recipe, peaks, 8 * 2**30, "cpu", None, fused) == (
        "in_memory", "in-memory peak 1.0 GiB fits (host budget 8.0 GiB)")


def test_the_resume_state_is_written_without_a_serialised_copy_in_memory(tmp_path):
    """Issue #26: the boundary hidden states were serialised to bytes before being written, so a streaming run
    held its largest buffer twice. Python allocations during a save of 64 MiB of hidden states stay small now
    (safetensors' `save` to bytes would allocate the whole 64 MiB as one bytes object, which tracemalloc sees)."""
    import tracemalloc

    import torch
    from safetensors.torch import load_file

    from quantize_pipeline.quantize.stream_state import LayerState

    hidden = [torch.randn(4, 1024, 2048) for _ in range(2)]  # 2 x 32 MiB of float32
    state = LayerState(tmp_path / "state", "key")
    tracemalloc.start()
    state.save(0, {"model.layers.0.mlp.down_proj.weight": torch.ones(8, 8)}, hidden)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB allocated by Python while saving 64 MiB"
    assert state.finished_layers(1, needs_hidden=True) == 1
    assert torch.equal(load_file(tmp_path / "state" / "layer-00000.hidden.safetensors")["1"], hidden[1])
