"""Synthetic Llama checkpoints (random weights) written shard by shard, never held whole in memory.

Shapes follow published models, so sizes and layer shapes are real; the weights are noise
(normal, std 0.02; norms 1), which is all a memory and time benchmark of quantization needs.

    python bench/synthetic_llama.py 1b /tmp/synthetic-1b
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# name -> LlamaConfig fields (published dimensions; "14b" is Qwen2.5-14B's shape as a Llama: > 28 GB of bf16).
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
}
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


def write_checkpoint(shape: str, out_dir: Path, seed: int = 0) -> dict:
    """Write config.json, bf16 safetensors shards and the index; return {"bytes", "params", "shards"}.
    A finished checkpoint (index present) is kept as it is."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / INDEX_FILE).is_file():
        index = json.loads((out_dir / INDEX_FILE).read_text())
        return {"bytes": index["metadata"]["total_size"], "params": index["metadata"]["total_parameters"],
                "shards": len(set(index["weight_map"].values()))}
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, torch_dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    # Noise drawn once and sliced at random offsets: drawing 15 billion fresh values would take most
    # of an hour on 2 cores, and a memory benchmark needs realistic magnitudes, not independent weights.
    generator = torch.Generator().manual_seed(seed)
    pool = torch.empty(POOL_VALUES, dtype=torch.float32).normal_(0, 0.02, generator=generator).to(torch.bfloat16)
    names = [name for name, _ in skeleton.named_parameters()]  # tied lm_head is listed once
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

    for name in names:
        parameter = skeleton.get_parameter(name)
        if parameter.ndim == 1:  # RMSNorm weights
            tensor = torch.ones(parameter.shape, dtype=torch.bfloat16)
        else:
            tensor = _noise(pool, parameter.shape, generator)
        size = tensor.numel() * 2
        if shard_bytes + size > SHARD_BYTES:
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
    print(write_checkpoint(sys.argv[1], Path(sys.argv[2])))
