"""Mixture-of-Experts models: experts unfused for Quark, routers kept, exports named as the checkpoint is.

transformers 5 holds the experts of Mixtral-style models as fused 3-D parameters (`mlp.experts.gate_up_proj`
[experts, 2*ffn, hidden]), not one nn.Linear per expert, so Quark's ModelQuantizer never sees them: measured on a
tiny Mixtral, the export kept every expert in BF16. Quark's own `preprocess_for_quantization` (its CLI calls it,
ModelQuantizer does not) replaces each fused module with per-expert `experts.E.{gate,up,down}_proj` linears.

Quark's exporter then writes the live module names. For Qwen3-MoE those are the Hub checkpoint's names; for
Mixtral the checkpoint says `block_sparse_moe.experts.E.w1/w3/w2` (vLLM's Mixtral loads that layout), so the
export is renamed back: recipes, verify and users see the checkpoint's names throughout. Streaming unfuses the
meta skeleton the same way, reads each layer's per-expert tensors under their live names and writes them under
the checkpoint's.

Static activation scales: an expert no calibration token reached keeps Quark's initial input scale (1.0), and
vLLM serves a static FP8 MoE layer with the maximum scale across its experts; such experts get a defined scale
(fill_uncalibrated_expert_scales), listed in quantize.json and warned about in the report.
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


def is_moe_config(config: dict) -> bool:
    """Whether a config.json's content describes a Mixture-of-Experts model (any expert count set)."""
    return any(config.get(key) for key in MOE_EXPERT_COUNT_KEYS)

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


def checkpoint_quantization_config(model_type: str, quantization: dict) -> dict:
    """A quantization_config written with live module names, renamed to the checkpoint's (streaming's export)."""
    return _renamed_layers(quantization, lambda name: checkpoint_name(model_type, name))


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


# A per-expert module's name, as unfuse_experts leaves them: `...experts.<index>` and what is inside it.
_EXPERT = re.compile(r"(^|\.)experts\.\d+(\.|$)")


def has_experts(module) -> bool:
    """Whether `module` holds per-expert modules."""
    return any(_EXPERT.search(name) for name, _ in module.named_modules())


# An expert's static input quantizer, by its live module name: (the layer's experts, expert index, projection).
_EXPERT_INPUT_QUANTIZER = re.compile(r"^(?P<experts>.*\.experts)\.(?P<index>\d+)\.(?P<projection>[^.]+)\._input_quantizer$")

UNCALIBRATED_EXPERT_SCALE = (
    "the largest input scale of the same projection among the layer's experts that received tokens: vLLM's "
    "static FP8 MoE methods serve a layer with one input scale, the maximum across its experts, so this is the "
    "scale the expert is served with (left alone, Quark keeps its initial 1.0, which vLLM's maximum would then "
    "impose on every expert of the layer)"
)


def fill_uncalibrated_expert_scales(model, model_type: str) -> list[dict]:
    """Experts no calibration token reached (Quark counts each static input quantizer's observed tokens) get a
    defined input scale (UNCALIBRATED_EXPERT_SCALE) before freeze. Returns [{"layer", "input_scale"}] of them
    (checkpoint names). `model`: the whole model, or a streaming layer's container named as in it."""
    import torch
    from quark.torch.quantization.tensor_quantize import ScaledFakeQuantize

    groups: dict[tuple[str, str], list[tuple[str, object, int]]] = {}
    for name, module in model.named_modules():
        match = _EXPERT_INPUT_QUANTIZER.match(name)
        if match and isinstance(module, ScaledFakeQuantize) and not module.observer.is_dynamic:
            tokens = int(getattr(module.observer, "_num_observed_tokens", 0))
            groups.setdefault((match["experts"], match["projection"]), []).append(
                (name[: -len("._input_quantizer")], module, tokens))
    filled = []
    with torch.no_grad():
        for (_, projection), members in sorted(groups.items()):
            seen = [module for _, module, tokens in members if tokens > 0]
            if not seen or len(seen) == len(members):
                continue  # every expert calibrated, or none was (the layer saw no token at all: nothing to take)
            donor = max(seen, key=lambda module: float(module.scale.detach().float().max()))
            for linear, module, tokens in members:
                if tokens == 0:
                    module.scale.copy_(donor.scale.detach().to(module.scale.dtype).reshape(module.scale.shape))
                    if getattr(module, "zero_point", None) is not None and getattr(donor, "zero_point", None) is not None:
                        module.zero_point.copy_(donor.zero_point.reshape(module.zero_point.shape))
                    filled.append({"layer": checkpoint_name(model_type, linear),
                                   "input_scale": float(module.scale.detach().float().max())})
    return filled


def uncalibrated_record(filled: list[dict]) -> dict:
    """quantize.json's `experts_without_calibration_tokens`: the experts fill_uncalibrated_expert_scales set."""
    return {"count": len(filled), "input_scale_set_to": UNCALIBRATED_EXPERT_SCALE if filled else None,
            "experts": filled}


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
