"""Mixture-of-Experts models: experts unfused for Quark, routers kept, exports named as the checkpoint is.

transformers 5 holds the experts of Mixtral-style models as fused 3-D parameters (`mlp.experts.gate_up_proj`
[experts, 2*ffn, hidden]), not one nn.Linear per expert, so Quark's ModelQuantizer never sees them: measured on a
tiny Mixtral, the export kept every expert in BF16. Quark's own `preprocess_for_quantization` (its CLI calls it,
ModelQuantizer does not) replaces each fused module with per-expert `experts.E.{gate,up,down}_proj` linears.

Quark's exporter then writes the live module names. For Qwen3-MoE those are the Hub checkpoint's names; for
Mixtral the checkpoint says `block_sparse_moe.experts.E.w1/w3/w2` (vLLM's Mixtral loads that layout), so the
export is renamed back: recipes, verify and users see the checkpoint's names throughout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Router linears of the MoE blocks (Qwen3-MoE's gate is an nn.Linear subclass once Quark unfuses; Mixtral's is a
# bare parameter module; Qwen2-MoE also has a shared-expert gate). Kept in the model dtype unless a recipe sets
# quantization.keep_routers: false, as Quark's templates (`*.gate`) and llm-compressor's examples do.
ROUTER_PATTERN = r"re:.*\.(mlp|block_sparse_moe)\.(gate|router|shared_expert_gate)$"

# config.json keys that give an MoE model's expert count (Mixtral, Qwen-MoE / gpt-oss, DeepSeek).
MOE_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")

MOE_STREAMING_REFUSAL = ("streaming does not quantize MoE experts yet (they are unfused for Quark in memory only: "
                         "pipeline/moe.py); use in_memory or auto")

# transformers-5 module names (experts unfused) -> the Hub checkpoint's, per model type; absent: the same.
CHECKPOINT_RENAMES: dict[str, list[tuple[str, str]]] = {
    "mixtral": [
        (r"\.mlp\.(gate|experts)\b", r".block_sparse_moe.\1"),
        (r"(\.experts\.\d+)\.gate_proj\b", r"\1.w1"),
        (r"(\.experts\.\d+)\.up_proj\b", r"\1.w3"),
        (r"(\.experts\.\d+)\.down_proj\b", r"\1.w2"),
    ],
}

# The reverse, for Quark's importer (its model's `_checkpoint_conversion_mapping`: regex -> replacement, the
# first that matches a name applies), so that the transformers engine loads a renamed export.
IMPORT_RENAMES: dict[str, dict[str, str]] = {
    "mixtral": {
        r"\.block_sparse_moe\.experts\.(\d+)\.w1\.": r".mlp.experts.\1.gate_proj.",
        r"\.block_sparse_moe\.experts\.(\d+)\.w3\.": r".mlp.experts.\1.up_proj.",
        r"\.block_sparse_moe\.experts\.(\d+)\.w2\.": r".mlp.experts.\1.down_proj.",
        r"\.block_sparse_moe\.gate\.": r".mlp.gate.",
    },
}


def checkpoint_name(model_type: str, name: str) -> str:
    for pattern, replacement in CHECKPOINT_RENAMES.get(model_type, []):
        name = re.sub(pattern, replacement, name)
    return name


def live_name(model_type: str, name: str) -> str:
    """The transformers-5 module name of a checkpoint name (IMPORT_RENAMES, the first that matches)."""
    for pattern, replacement in IMPORT_RENAMES.get(model_type, {}).items():
        renamed = re.sub(pattern, replacement, name + ".")
        if renamed != name + ".":
            return renamed[:-1]
    return name


def live_quantization_config(model_type: str, quantization: dict) -> dict:
    """An export's quantization_config with its layer names (exclude, layer_quant_config keys) as Quark's importer
    finds the modules: the reverse of rename_export's config step."""
    return _renamed_layers(quantization, lambda name: live_name(model_type, name))


def _renamed_layers(quantization: dict, rename) -> dict:
    """A quantization_config whose layer names (exclude/ignore lists, layer_quant_config keys) went through rename."""
    quantization = dict(quantization)
    for key in ("exclude", "ignore"):
        if isinstance(quantization.get(key), list):
            quantization[key] = [rename(name) for name in quantization[key]]
    if isinstance(quantization.get("layer_quant_config"), dict):
        quantization["layer_quant_config"] = {rename(name): value
                                              for name, value in quantization["layer_quant_config"].items()}
    return quantization


def unfuse_experts(model) -> int:
    """Quark's preprocess: every fused experts module it knows becomes per-expert linears. Returns how many."""
    from quark.torch.utils.llm import preprocess_for_quantization
    from quark.torch.utils.llm.module_replacement.preprocess_registry import PREPROCESS_REGISTRY

    fused = sum(type(module) in PREPROCESS_REGISTRY for module in model.modules())
    if fused:
        preprocess_for_quantization(model)
    return fused


def rename_export(out_dir: Path, model_type: str) -> int:
    """Rename an export's tensors (safetensors files, index) and the quantization_config's layer names to the
    checkpoint's names. Each file is rewritten to a temporary name, then renamed over. Returns tensors renamed."""
    if model_type not in CHECKPOINT_RENAMES:
        return 0
    from safetensors import safe_open
    from safetensors.torch import save_file

    renamed = 0
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {checkpoint_name(model_type, name): handle.get_tensor(name) for name in handle.keys()}
            renamed += sum(checkpoint_name(model_type, name) != name for name in handle.keys())
        temporary = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(temporary), metadata=metadata)
        temporary.replace(path)
    index = out_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {checkpoint_name(model_type, name): file for name, file in data["weight_map"].items()}
        _write_json(index, data)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("quantization_config"), dict):
        config["quantization_config"] = _renamed_layers(config["quantization_config"],
                                                        lambda name: checkpoint_name(model_type, name))
    _write_json(config_path, config)
    return renamed


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)
