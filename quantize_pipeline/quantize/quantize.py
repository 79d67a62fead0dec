"""quantize: AMD Quark's LLMTemplate config + ModelQuantizer over the calibration tokens.

Runs in a child process (see worker.py) together with freeze and export, which
need the same in-memory quantized model; each of the three writes its own folder.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from pathlib import Path

from quantize_pipeline.formats.quark_config import build_quark_config, quark_scheme_name
from quantize_pipeline.quantize import moe, row_min_max
from quantize_pipeline.quantize.forward_batches import forward_batches
from quantize_pipeline.recipe import layers
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.recipe.schemes import SchemeSpec


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def layer_overrides(recipe: Recipe, linear_names: list[str], excluded: list[str]) -> dict[str, SchemeSpec]:
    """Exact layer name -> scheme for the recipe's `layers` patterns (first pattern wins). The scheme
    objects come from the recipe itself: quantize, verify and check derive them the same way, and no
    stage parses a scheme back from its name."""
    overrides: dict[str, SchemeSpec] = {}
    for pattern, scheme in recipe.quantization.layer_schemes().items():
        for name in layers.select(linear_names, [pattern]):
            if name not in excluded:
                overrides.setdefault(name, scheme)
    return overrides


def equal_length_batches(token_batches: list[list[int]]) -> list[list[int]]:
    """The same tokens packed into as many batches of one length.

    Why: Quark's layer-wise algorithms (SmoothQuant, AWQ, GPTQ) replay every cached batch through
    each decoder layer with the keyword arguments (rotary position embeddings) captured from one
    batch, so batches of different lengths fail with a shape mismatch.
    """
    stream = [token for ids in token_batches for token in ids]
    length = max(1, min(max(len(ids) for ids in token_batches), len(stream) // len(token_batches)))
    return [stream[start:start + length] for start in range(0, length * len(token_batches), length)]


def linear_layer_names(model) -> list[str]:
    import torch

    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


@dataclass
class ResolvedConfig:
    """The Quark config of a recipe on one model, and the layer names it was resolved from."""

    quark_config: object
    linear_names: list[str]
    excluded: list[str]
    overrides: dict[str, SchemeSpec]
    model_type: str = ""

    def checkpoint_name(self, name: str) -> str:
        """A module's name in the checkpoint and the export (quantize_pipeline/quantize/moe.py): what quantize.json records."""
        return moe.checkpoint_name(self.model_type, name)


def resolve_config(recipe: Recipe, model) -> ResolvedConfig:
    """From the model's module names alone (works on a meta-device skeleton too)."""
    linear_names = linear_layer_names(model)
    # Patterns speak the checkpoint's names (validate, plan and verify read those); an unfused MoE model's
    # modules may be named otherwise (quantize_pipeline/quantize/moe.py): matched by their checkpoint name, configured by their own.
    model_type = model.config.model_type
    by_checkpoint_name = {moe.checkpoint_name(model_type, name): name for name in linear_names}
    checkpoint_names = list(by_checkpoint_name)
    excluded_names = layers.select(checkpoint_names, recipe.quantization.kept)
    excluded = [by_checkpoint_name[name] for name in excluded_names]
    overrides = {by_checkpoint_name[name]: scheme
                 for name, scheme in layer_overrides(recipe, checkpoint_names, excluded_names).items()}
    config = build_quark_config(recipe, model_type, excluded, overrides)
    row_min_max.install()  # every quantizing path resolves its config first
    return ResolvedConfig(config, linear_names, excluded, overrides, model_type)


def write_summary(recipe: Recipe, resolved: ResolvedConfig, calibration_batches: int, out_dir: Path,
                  extra: dict | None = None) -> dict:
    """quantize.json (what was quantized how) and quark_config.txt; returns the summary."""
    rename = resolved.checkpoint_name
    linear_names, excluded = [rename(name) for name in resolved.linear_names], [rename(name) for name in resolved.excluded]
    overrides = {rename(name): scheme for name, scheme in resolved.overrides.items()}
    summary = {
        "scheme": recipe.scheme.name,
        "quark_scheme": quark_scheme_name(recipe.scheme),
        "kv_cache": recipe.quantization.kv_cache,
        "linear_layers": len(linear_names),
        "excluded_layers": excluded,
        "layer_overrides": {name: scheme.name for name, scheme in overrides.items()},  # for people; not read back
        "algorithm": recipe.quantization.algorithm_name,
        "algorithm_options": recipe.quantization.algorithm_options,
        "quantized_layers": len(linear_names) - len(excluded),
        "linear_layer_names": linear_names,
        "calibration_batches": calibration_batches,
        **(extra or {}),
    }
    (out_dir / "quantize.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "quark_config.txt").write_text(str(resolved.quark_config) + "\n")
    return summary


def say_uncalibrated(filled: list[dict]) -> None:
    if filled:
        print(f"{len(filled)} MoE expert layers received no calibration token: input scale set to "
              f"{moe.UNCALIBRATED_EXPERT_SCALE}", flush=True)


def quantize_warnings(summary: dict) -> tuple[str, ...]:
    """What a quantize.json says that the report must show before its verdict (report.md's WARNING lines)."""
    uncalibrated = summary.get("experts_without_calibration_tokens") or {}
    if not uncalibrated.get("count"):
        return ()
    names = [expert["layer"] for expert in uncalibrated["experts"]]
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return (f"{uncalibrated['count']} MoE expert layers received no calibration token ({shown}; each in "
            f"quantize/quantize.json): their static input scale is {uncalibrated['input_scale_set_to']}. More or "
            "more varied calibration samples reach more experts.",)


def quantize(recipe: Recipe, model, token_batches: list[list[int]], out_dir: Path, extra: dict | None = None):
    """Quantize `model` in place with Quark; write the resolved config summary. Returns (model, quantizer, summary)."""
    import torch
    from quark.torch import ModelQuantizer

    resolved = resolve_config(recipe, model)
    quantizer = ModelQuantizer(resolved.quark_config)
    if recipe.quantization.algorithm_name is not None:
        token_batches = equal_length_batches(token_batches)
    batches = [torch.tensor(samples, dtype=torch.long)
               for samples in forward_batches(token_batches, resolved.quark_config)]
    with torch.no_grad():
        model = quantizer.quantize_model(model, batches)
    uncalibrated = moe.fill_uncalibrated_expert_scales(model, resolved.model_type)
    say_uncalibrated(uncalibrated)
    summary = write_summary(recipe, resolved, len(batches), out_dir,
                            {**(extra or {}), "experts_without_calibration_tokens": moe.uncalibrated_record(uncalibrated)})
    return model, quantizer, summary
