"""Cross-field checks that need the model's files (config.json, safetensors headers), not its weights.

Used by `validate` and before `run` loads anything; no torch import.
"""

from __future__ import annotations

import json
from pathlib import Path

from quantize_pipeline.engines import compat
from quantize_pipeline.engines.names import EngineName
from quantize_pipeline.formats.safetensors_header import read_folder
from quantize_pipeline.recipe import layers, models
from quantize_pipeline.recipe.schema import Recipe

DIMENSION_KEYS = ("hidden_size", "intermediate_size", "moe_intermediate_size")


def local_model_dir(recipe: Recipe) -> Path | None:
    """The model folder if it is on disk already (a folder, or a prepared builtin/GGUF model)."""
    if recipe.model.kind == "folder":
        return Path(recipe.model.source)
    folder = models.converted_model_dir(recipe.model)
    return folder if folder is not None and models.is_prepared(folder) else None


def weight_layer_names(model_dir: Path) -> list[str]:
    """Layers that own a 2-D weight, from safetensors headers (embeddings left out)."""
    names = []
    for tensor, info in read_folder(model_dir).items():
        if tensor.endswith(".weight") and len(info["shape"]) == 2 and "embed" not in tensor:
            names.append(tensor.removesuffix(".weight"))
    return names


def fused_checkpoint_tensor(model_dir: Path) -> str | None:
    """A tensor of more than two dimensions in the checkpoint's safetensors (experts fused into one parameter, as
    some repos ship them), or None. The data-free path quantizes each linear's own 2-D weight tensor."""
    if not any(model_dir.glob("*.safetensors")):
        return None  # a config alone (planning offline): the Hub's per-expert layout is assumed
    return next((name for name, info in read_folder(model_dir).items() if len(info["shape"]) > 2), None)


def model_problems(recipe: Recipe, model_dir: Path) -> list[tuple[str, str]]:
    """(field, problem) pairs for a recipe against a local model."""
    problems = []
    config = json.loads((model_dir / "config.json").read_text())
    used = {spec.name: spec for spec in (recipe.scheme, *recipe.quantization.layer_schemes().values())}
    for scheme, spec in sorted(used.items()):
        group = spec.group_size
        for key in DIMENSION_KEYS:
            size = config.get(key)
            if group and isinstance(size, int) and size % group:
                problems.append((
                    "quantization.scheme", f"{scheme}: group size {group} does not divide the model's {key} {size} "
                    f"(use a group size that divides it, e.g. int4_wo_64 or int4_wo_32)",
                ))
    names = weight_layer_names(model_dir)
    tied = config.get("tie_word_embeddings") and "lm_head" not in names
    for pattern in recipe.quantization.exclude:
        if not layers.select(names, [pattern]) and not (tied and layers.matches("lm_head", pattern)):
            problems.append(("quantization.exclude", f"pattern {pattern!r} matches no layer of the model"))
    for pattern in recipe.quantization.layers:
        if not layers.select(names, [pattern]):
            problems.append(("quantization.layers", f"pattern {pattern!r} matches no layer of the model"))
    if recipe.quantization.mode == "data_free" and (fused := fused_checkpoint_tensor(model_dir)) is not None:
        problems.append(("quantization.mode", f"data_free quantizes each linear's own 2-D weight tensor; the "
                         f"checkpoint's {fused} is fused ({len(read_folder(model_dir)[fused]['shape'])}-D): use "
                         "streaming, in_memory or auto"))
    if recipe.evaluation.engine != EngineName.TRANSFORMERS:  # vLLM serves fused shards with one scheme
        problems.extend(fused_scheme_problems(recipe, names))
    return problems


def fused_scheme_problems(recipe: Recipe, names: list[str]) -> list[tuple[str, str]]:
    """The first layer whose scheme (or exclusion) differs from a shard vLLM fuses it with, as a
    (field, problem) pair, or []: vLLM refuses such an export in serve ("Found different quantization
    schemes for the shards of ...")."""
    split = layers.split_fused_groups(layers.select(names, recipe.quantization.exclude), names)
    if split:
        name, missing = split[0]
        return [("quantization.exclude", f"{name} excluded without {', '.join(missing)}: vLLM fuses them "
                 "into one layer with one scheme; exclude them together")]
    assigned = layers.assign_schemes(recipe, names)
    for name in names:
        differing = [member for member in layers.fused_siblings(name, names) if assigned[member] != assigned[name]]
        if differing:
            return [("quantization.layers", f"{name} gets {assigned[name] or 'no quantization'} but "
                     + ", ".join(f"{member} {assigned[member] or 'no quantization'}" for member in differing)
                     + ": vLLM fuses them into one layer with one scheme; give them the same scheme")]
    return []


def recipe_support(recipe: Recipe, engine: str) -> compat.Support:
    """compat.can_serve for a recipe as validate, run and check see it: by the layers of its model when the
    model is local (as `plan` does), by the recipe alone for a Hub id not on disk."""
    model_dir = local_model_dir(recipe)
    return compat.can_serve(recipe, engine, weight_layer_names(model_dir) if model_dir is not None else None)
