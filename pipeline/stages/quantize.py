"""quantize: AMD Quark's LLMTemplate config + ModelQuantizer over the calibration tokens.

Runs in a child process (see worker.py) together with freeze and export, which
need the same in-memory quantized model; each of the three writes its own folder.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from pipeline import layers
from pipeline.recipe import Recipe
from pipeline.schemes import SCHEMES, SchemeSpec
from pipeline.stages.calibrate import load_token_batches

# Quark's template vocabulary has no INT8 per-channel weight + per-token
# activation scheme; we register one built from Quark's own specs.
CUSTOM_QUARK_SCHEMES = ("int8_per_channel",)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _register_custom_schemes() -> None:
    from quark.torch import LLMTemplate
    from quark.torch.quantization.config.config import Int8PerChannelSpec, QLayerConfig

    if "int8_per_channel" in LLMTemplate.get_supported_schemes():
        return
    weight = Int8PerChannelSpec(ch_axis=0, symmetric=True, is_dynamic=False).to_quantization_spec()
    # ch_axis=1 on a [tokens, hidden] input gives one scale per token, as Quark's ptpc_fp8 does.
    per_token = Int8PerChannelSpec(ch_axis=1, symmetric=True, is_dynamic=True).to_quantization_spec()
    LLMTemplate.register_scheme("int8_per_channel", QLayerConfig(weight=weight, input_tensors=per_token))


def _template_for(model_type: str):
    from quark.torch import LLMTemplate

    if model_type in LLMTemplate.list_available():
        return LLMTemplate.get(model_type)
    # An architecture Quark has no template for: the common HF attention names.
    return LLMTemplate(model_type=model_type, kv_layers_name=["*k_proj", "*v_proj"], q_layer_name="*q_proj")


def quark_scheme_name(scheme: SchemeSpec) -> str:
    return scheme.quark_scheme or scheme.name


def layer_overrides(recipe: Recipe, linear_names: list[str], excluded: list[str]) -> dict[str, str]:
    """Exact layer name -> recipe scheme name for the recipe's `layers` patterns (first pattern wins)."""
    overrides: dict[str, str] = {}
    for pattern, scheme_name in recipe.quantization.layers.items():
        for name in layers.select(linear_names, [pattern]):
            if name not in excluded:
                overrides.setdefault(name, scheme_name)
    return overrides


def build_quark_config(recipe: Recipe, model_type: str, excluded_layers: list[str], overrides: dict[str, str]):
    _register_custom_schemes()
    return _template_for(model_type).get_config(
        scheme=quark_scheme_name(recipe.scheme),
        algorithm=recipe.quantization.algorithm,
        kv_cache_scheme=recipe.quantization.kv_cache,
        exclude_layers=excluded_layers,
        layer_config={name: quark_scheme_name(SCHEMES[scheme]) for name, scheme in overrides.items()} or None,
    )


def linear_layer_names(model) -> list[str]:
    import torch

    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def quantize(recipe: Recipe, model, token_batches: list[list[int]], out_dir: Path):
    """Quantize `model` in place with Quark; write the resolved config summary. Returns (model, quantizer, summary)."""
    import torch
    from quark.torch import ModelQuantizer

    linear_names = linear_layer_names(model)
    excluded = layers.select(linear_names, recipe.quantization.exclude)
    overrides = layer_overrides(recipe, linear_names, excluded)
    config = build_quark_config(recipe, model.config.model_type, excluded, overrides)
    quantizer = ModelQuantizer(config)
    batches = [torch.tensor([ids], dtype=torch.long) for ids in token_batches]
    with torch.no_grad():
        model = quantizer.quantize_model(model, batches)
    summary = {
        "quark_scheme": quark_scheme_name(recipe.scheme),
        "kv_cache": recipe.quantization.kv_cache,
        "linear_layers": len(linear_names),
        "excluded_layers": excluded,
        "layer_overrides": overrides,
        "algorithm": recipe.quantization.algorithm,
        "quantized_layers": len(linear_names) - len(excluded),
        "linear_layer_names": linear_names,
        "calibration_batches": len(batches),
    }
    (out_dir / "quantize.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "quark_config.txt").write_text(str(config) + "\n")
    return model, quantizer, summary


def quantize_freeze_export(recipe: dict, model_dir: str, calibrate_dir: str, out_dirs: dict[str, str]) -> dict:
    """Child-process job: quantize -> freeze -> export. Returns one record per stage."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.stages import export, freeze

    parsed = Recipe.model_validate(recipe)
    records = {}
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, parsed.model.dtype), trust_remote_code=parsed.model.trust_remote_code
    )
    model.eval()
    model, quantizer, summary = quantize(parsed, model, load_token_batches(Path(calibrate_dir)), Path(out_dirs["quantize"]))
    records["quantize"] = {"summary": summary, "wall_s": time.perf_counter() - started, "peak_rss_mb": _peak_rss_mb()}

    started = time.perf_counter()
    model, summary = freeze.freeze(quantizer, model, Path(out_dirs["freeze"]))
    records["freeze"] = {"summary": summary, "wall_s": time.perf_counter() - started, "peak_rss_mb": _peak_rss_mb()}

    started = time.perf_counter()
    summary = export.export(parsed, model, Path(model_dir), Path(out_dirs["model"]))
    records["export"] = {"summary": summary, "wall_s": time.perf_counter() - started, "peak_rss_mb": _peak_rss_mb()}
    return records
