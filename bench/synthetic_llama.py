"""Synthetic checkpoints (random weights) written shard by shard, never held whole in memory.

Shapes follow published models, so sizes and layer shapes are real; the weights are noise
(normal, std 0.02; norms 1), which is all a memory and time benchmark of quantization needs.
Llama shapes by default; tiny Mixture-of-Experts (Mixtral, Qwen3-MoE) and other dense architectures
(Qwen3, Phi-3) too, under the tensor names the Hub's checkpoints use (one tensor per expert).

    python bench/synthetic_llama.py 1b /tmp/synthetic-1b [TOKENIZER_DIR]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

# name -> config fields; "model_type" picks the architecture, "llama" when absent (published dimensions; "14b" is
# Qwen2.5-14B's shape as a Llama: > 28 GB of bf16).
SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # The 135M shape cut to 4 layers: bench/gpu_check.py's CPU size (seconds to write and quantize).
    "135m-4layers": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    # The 14B shape cut to 4 layers: profiling streaming's per-layer cost without writing 27.5 GiB.
    "14b-4layers": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=4, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    # Wide and shallow (narrow attention through head_dim, a small MLP): a calibration boundary of GiBs for
    # seconds of compute, where the boundary, not a layer, decides a streaming run's peak (plan vs measured).
    "wide-2layers": dict(hidden_size=8192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=1, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    # Tiny other architectures (seconds to write): experts stored one tensor per expert, fused q/k/v and
    # gate/up (Phi-3), q/k norms (Qwen3). The default model's vocabulary, so its tokenizer fits.
    "mixtral-tiny": dict(model_type="mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=49152, tie_word_embeddings=False),
    "qwen3-moe-tiny": dict(model_type="qwen3_moe", hidden_size=256, moe_intermediate_size=128, intermediate_size=512,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                           num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
                           vocab_size=49152, tie_word_embeddings=False),
    "qwen3-tiny": dict(model_type="qwen3", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=49152,
                       tie_word_embeddings=True),
    "phi3-tiny": dict(model_type="phi3", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=False),
}
# model_type -> (the MoE block's name on the Hub, per-expert names of gate_up_proj's two halves, of down_proj).
# transformers 5 fuses the experts into 3-D parameters when loading and splits them back when saving.
HUB_EXPERTS = {
    "mixtral": ("block_sparse_moe", ("w1", "w3"), "w2"),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj"), "down_proj"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
SHARD_BYTES = 2 * 2**30
POOL_VALUES = 2**26  # 128 MiB of bf16 noise
INDEX_FILE = "model.safetensors.index.json"


def _noise(pool, shape, generator):
    """A tensor of `shape` filled from the noise pool (copied: each tensor owns its storage when saved)."""
    import torch

    count = int(torch.Size(shape).numel())
    parts, filled = [], 0
    while filled < count:
        take = min(count - filled, pool.numel() // 2)
        start = int(torch.randint(0, pool.numel() - take + 1, (1,), generator=generator))
        parts.append(pool[start:start + take])
        filled += take
    return torch.cat(parts).reshape(shape)


def make_config(shape: str):
    """The shape's config (a LlamaConfig unless the entry names another model_type)."""
    from transformers import AutoConfig

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    fields = dict(SHAPES[shape])
    model_type = fields.pop("model_type", "llama")
    # `architectures` as the Hub's configs have it: vLLM picks the model class from it (without it, a Mixtral
    # resolves to the pooling MixtralModel and cannot generate: measured).
    return AutoConfig.for_model(model_type, **fields, max_position_embeddings=4096, torch_dtype="bfloat16",
                                architectures=[MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]])


def hub_tensors(model_type: str, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The Hub checkpoint's (name, shape) pairs for one parameter of the live model: itself, except fused experts
    ([E, 2*I, H] gate_up_proj, gate half first; [E, H, I] down_proj), which the Hub keeps one tensor per expert,
    and the MoE block's name (Mixtral's router and experts live under block_sparse_moe)."""
    if model_type in HUB_EXPERTS:
        name = name.replace(".mlp.", f".{HUB_EXPERTS[model_type][0]}.")
    if len(shape) != 3:
        return [(name, shape)]
    if model_type not in HUB_EXPERTS:
        raise ValueError(f"{name}: fused 3-D experts of model_type {model_type!r} have no Hub names here")
    _, (gate, up), down = HUB_EXPERTS[model_type]
    prefix, fused = name.rsplit(".experts.", 1)
    experts, rows, cols = shape
    if fused == "gate_up_proj":
        parts = [(gate, (rows // 2, cols)), (up, (rows // 2, cols))]
    elif fused == "down_proj":
        parts = [(down, (rows, cols))]
    else:
        raise ValueError(f"{name}: unknown fused expert parameter")
    return [(f"{prefix}.experts.{expert}.{part}.weight", dims) for expert in range(experts) for part, dims in parts]


def copy_tokenizer(source: Path, out_dir: Path) -> None:
    """Copy the tokenizer, chat template and generation config that `source` has: random weights, a real tokenizer."""
    for file in TOKENIZER_FILES:
        if (source / file).is_file():
            shutil.copyfile(source / file, out_dir / file)


def write_checkpoint(shape: str, out_dir: Path, seed: int = 0, tokenizer_from: Path | None = None,
                     shard_bytes_max: int = SHARD_BYTES) -> dict:
    """Write config.json, bf16 safetensors shards (at most shard_bytes_max each, unless one tensor is larger)
    and the index; return {"bytes", "params", "shards"}.
    A finished checkpoint (index present) is kept as it is (the tokenizer files are still copied)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, out_dir)
    if (out_dir / INDEX_FILE).is_file():
        index = json.loads((out_dir / INDEX_FILE).read_text())
        return {"bytes": index["metadata"]["total_size"], "params": index["metadata"]["total_parameters"],
                "shards": len(set(index["weight_map"].values()))}
    config = make_config(shape)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    # Noise drawn once and sliced at random offsets: drawing 15 billion fresh values would take most
    # of an hour on 2 cores, and a memory benchmark needs realistic magnitudes, not independent weights.
    generator = torch.Generator().manual_seed(seed)
    pool = torch.empty(POOL_VALUES, dtype=torch.float32).normal_(0, 0.02, generator=generator).to(torch.bfloat16)
    # Tied lm_head is listed once; fused experts become one tensor per expert, as the Hub stores them.
    tensors = [hub for name, parameter in skeleton.named_parameters()
               for hub in hub_tensors(config.model_type, name, tuple(parameter.shape))]
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = total_params = 0
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out_dir / f".{name}.tmp"), metadata={"format": "pt"})
            (out_dir / f".{name}.tmp").rename(out_dir / name)
            files.append(name)
            weight_map.update({tensor: name for tensor in shard})
            shard, shard_bytes = {}, 0

    for name, dims in tensors:
        if len(dims) == 1:  # RMSNorm weights
            tensor = torch.ones(dims, dtype=torch.bfloat16)
        else:
            tensor = _noise(pool, dims, generator)
        size = tensor.numel() * 2
        if shard and shard_bytes + size > shard_bytes_max:
            flush()
        shard[name] = tensor
        shard_bytes += size
        total_bytes += size
        total_params += tensor.numel()
    flush()
    # Shard files are named -0000i-of-0000n by HF; ours need no total up front, so names stay as written.
    config.save_pretrained(out_dir)
    index = {"metadata": {"total_size": total_bytes, "total_parameters": total_params}, "weight_map": weight_map}
    (out_dir / f".{INDEX_FILE}.tmp").write_text(json.dumps(index, indent=2))
    (out_dir / f".{INDEX_FILE}.tmp").rename(out_dir / INDEX_FILE)
    return {"bytes": total_bytes, "params": total_params, "shards": len(files)}


if __name__ == "__main__":
    tokenizer = Path(sys.argv[3]) if sys.argv[3:] else None
    print(write_checkpoint(sys.argv[1], Path(sys.argv[2]), tokenizer_from=tokenizer))
