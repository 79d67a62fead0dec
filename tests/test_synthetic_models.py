"""bench/synthetic_llama.py's other architectures: the checkpoint it writes names and shapes its tensors as
transformers' own save_pretrained does (the Hub's layout: one tensor per expert), and loads back without a
missing or unexpected key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from synthetic_llama import SHAPES, hub_tensors, make_config, write_checkpoint  # noqa: E402

NEW_SHAPES = ["mixtral-tiny", "qwen3-moe-tiny", "qwen3-tiny", "phi3-tiny"]
# "135m" as it was before model_type existed: its config must not change.
LLAMA_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def _tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name -> shape in a folder's safetensors files (headers only)."""
    found: dict[str, tuple[int, ...]] = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as reader:
            found.update({name: tuple(reader.get_slice(name).get_shape()) for name in reader.keys()})
    return found


@pytest.mark.parametrize("shape", NEW_SHAPES)
def test_names_match_save_pretrained_and_load_back(shape, tmp_path):
    config = make_config(shape)
    assert config.model_type == SHAPES[shape]["model_type"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "saved")
    write_checkpoint(shape, tmp_path / "generated")
    assert _tensors(tmp_path / "generated") == _tensors(tmp_path / "saved")

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "generated", dtype=torch.bfloat16,
                                                       output_loading_info=True)
    assert type(model.config) is type(config)
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 42, 314, 2718, 49151]])).logits
    assert logits.shape == (1, 5, 49152) and torch.isfinite(logits).all()


def test_experts_are_split_per_expert_under_hub_names():
    """Mixtral: block_sparse_moe, w1/w3 from gate_up_proj's halves, w2 from down_proj; the router renamed too."""
    assert hub_tensors("mixtral", "model.layers.1.mlp.gate.weight", (8, 256)) == [
        ("model.layers.1.block_sparse_moe.gate.weight", (8, 256))]
    assert hub_tensors("mixtral", "model.layers.1.mlp.experts.gate_up_proj", (2, 1024, 256)) == [
        (f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight", (512, 256))
        for e in range(2) for w in ("w1", "w3")]
    assert hub_tensors("qwen3_moe", "model.layers.0.mlp.experts.down_proj", (2, 256, 128)) == [
        (f"model.layers.0.mlp.experts.{e}.down_proj.weight", (256, 128)) for e in range(2)]
    with pytest.raises(ValueError, match="no Hub names"):
        hub_tensors("llama", "model.layers.0.mlp.experts.down_proj", (2, 256, 128))


def test_llama_entries_keep_their_config():
    assert SHAPES["135m"] == LLAMA_135M
    config = make_config("135m")
    assert type(config) is LlamaConfig
    assert config.to_dict() == LlamaConfig(**LLAMA_135M, max_position_embeddings=4096, torch_dtype="bfloat16",
                                           architectures=["LlamaForCausalLM"]).to_dict()
    # Every shape names its causal-LM class, as the Hub's configs do (vLLM picks its model class from it).
    assert make_config("mixtral-tiny").architectures == ["MixtralForCausalLM"]


def test_tokenizer_files_are_copied(tmp_path):
    source = tmp_path / "tokenizer"
    source.mkdir()
    (source / "tokenizer.json").write_text("{}")
    (source / "chat_template.jinja").write_text("{{ messages }}")
    (source / "model.safetensors").write_text("not copied")
    write_checkpoint("qwen3-tiny", tmp_path / "model", tokenizer_from=source)
    names = {path.name for path in (tmp_path / "model").iterdir() if ".safetensors" not in path.name}
    assert names == {"config.json", "tokenizer.json", "chat_template.jinja"}
