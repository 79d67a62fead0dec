"""plan: what a recipe would do, from the model's config alone (no weights loaded).

The model is built on PyTorch's meta device, so a 70B config plans in seconds:
which layers get which scheme, the export size, rough peak memory, and which
engine will serve it (or why none can).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import checks, compat, layers
from pipeline.recipe import Recipe
from pipeline.schemes import WEIGHT_BITS, SchemeSpec, get_scheme
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
EXPERT_MARKERS = (".experts.",)


@dataclass
class Plan:
    stages: tuple[str, ...]
    layer_schemes: dict[str, str | None]  # linear layer -> scheme name, None when excluded
    base_size_bytes: int
    export_size_bytes: int
    quantize_peak_bytes: int
    engines: dict[str, compat.Support] = field(default_factory=dict)
    installed_engine: str | None = None

    @property
    def counts(self) -> Counter:
        return Counter(scheme or "excluded (kept in model dtype)" for scheme in self.layer_schemes.values())


def is_expert_layer(name: str) -> bool:
    return any(marker in name for marker in EXPERT_MARKERS)


def engine_support(recipe: Recipe, layer_schemes: dict[str, str | None], engine: str) -> compat.Support:
    """The weakest support among the schemes the layers actually use on this engine."""
    verdict = compat.Support(True, "", compat.MEASURED)
    for scheme in sorted(set(filter(None, layer_schemes.values()))):
        names = [name for name, assigned in layer_schemes.items() if assigned == scheme]
        experts_only = all(is_expert_layer(name) for name in names)
        entry = compat.support(scheme, engine, moe_experts_only=experts_only)
        if not entry.supported:
            return compat.Support(False, f"{scheme}: {entry.reason}", entry.source)
        if entry.source != compat.MEASURED:
            verdict = compat.Support(True, "", entry.source)
        verdict = compat.Support(True, "; ".join(filter(None, [verdict.reason, f"{scheme}: {entry.reason}"])), verdict.source)
    kv_cache = recipe.quantization.kv_cache
    if kv_cache is not None:
        entry = compat.kv_cache_support(kv_cache, engine)
        if not entry.supported:
            return compat.Support(False, f"kv_cache {kv_cache}: {entry.reason}", entry.source)
        verdict = compat.Support(True, f"{verdict.reason}; kv_cache {kv_cache}: {entry.reason}", verdict.source)
    return verdict


def assign_schemes(recipe: Recipe, linear_names: list[str]) -> dict[str, str | None]:
    excluded = set(layers.select(linear_names, recipe.quantization.exclude))
    assigned: dict[str, str | None] = {}
    for name in linear_names:
        if name in excluded:
            assigned[name] = None
            continue
        override = next(
            (spec.name for pattern, spec in recipe.quantization.layer_schemes().items() if layers.matches(name, pattern)),
            None,
        )
        assigned[name] = override or recipe.scheme.name
    return assigned


def _quantized_bytes(spec: SchemeSpec, shape: tuple[int, ...]) -> int:
    out_features, in_features = shape[0], shape[-1]
    weight = out_features * in_features * WEIGHT_BITS[spec.weight_dtype] // 8
    if spec.weight_granularity == "per_group":
        scales = out_features * (in_features // spec.group_size)
    elif spec.weight_granularity == "per_channel":
        scales = out_features
    else:
        scales = 1
    zero_points = 0 if spec.weight_symmetric else scales  # one per scale (int8/int4 packed: at most a byte)
    return weight + scales * 2 + zero_points


def meta_model_layers(config_path: Path, trust_remote_code: bool = False) -> tuple[dict[str, tuple[int, ...]], int]:
    """(quantizable layer -> 2-D weight shape, total parameter count) of a model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path.parent, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    linear: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if parameter.ndim == 2 and parameter_name == "weight":  # Linear layers and MoE routers
                linear[name] = tuple(parameter.shape)
            elif parameter.ndim == 3:  # fused MoE experts [experts, out, in] (transformers 5)
                linear[f"{name}.{parameter_name}"] = (parameter.shape[0] * parameter.shape[1], parameter.shape[2])
    # Tied weights (lm_head = embed_tokens) are stored once.
    total = sum(parameter.numel() for parameter in model.parameters())
    return linear, total


def make_plan(recipe: Recipe, config_path: Path) -> Plan:
    from pipeline.runner import STAGES

    linear, total_params = meta_model_layers(config_path, recipe.model.trust_remote_code)
    layer_schemes = assign_schemes(recipe, list(linear))
    dtype_bytes = DTYPE_BYTES[recipe.model.dtype]
    base_size = total_params * dtype_bytes
    export_size = base_size
    for name, scheme in layer_schemes.items():
        if scheme is not None:
            shape = linear[name]
            export_size += _quantized_bytes(get_scheme(scheme), shape) - shape[0] * shape[-1] * dtype_bytes
    stages = STAGES if recipe.publish is not None else STAGES[:-1]
    return Plan(
        stages=stages,
        layer_schemes=layer_schemes,
        base_size_bytes=base_size,
        export_size_bytes=export_size,
        # Quark holds the model in its dtype plus observers and one layer's calibration activations.
        quantize_peak_bytes=int(base_size * 1.25),
        engines={engine: engine_support(recipe, layer_schemes, engine) for engine in compat.ENGINES},
        installed_engine=compat.installed_vllm_engine(),
    )


def find_model_config(recipe: Recipe, explicit: Path | None) -> Path | None:
    """config.json to plan from: --model-config, the local folder, or a prepared/cached copy."""
    if explicit is not None:
        return explicit
    spec = recipe.model
    if spec.kind != "hub":
        model_dir = checks.local_model_dir(recipe)
        candidate = model_dir / "config.json" if model_dir is not None else None
    else:
        try:
            from huggingface_hub import hf_hub_download

            candidate = Path(hf_hub_download(spec.source, "config.json", revision=spec.revision, local_files_only=True))
        except Exception:  # not in the local HF cache
            return None
    return candidate if candidate is not None and candidate.is_file() else None


def summary(plan: Plan) -> dict:
    """A JSON-able summary (for --json and tests)."""
    return {
        "stages": list(plan.stages),
        "layers": plan.layer_schemes,
        "layer_counts": dict(plan.counts),
        "base_size_bytes": plan.base_size_bytes,
        "export_size_bytes": plan.export_size_bytes,
        "export_size_ratio": round(plan.export_size_bytes / plan.base_size_bytes, 4),
        "quantize_peak_bytes": plan.quantize_peak_bytes,
        "engines": {name: vars(entry) for name, entry in plan.engines.items()},
        "installed_engine": plan.installed_engine,
    }


def to_json(plan: Plan) -> str:
    return json.dumps(summary(plan), indent=2)
