"""verify: the exported tensors and config are what the recipe asked for.

Reads only safetensors headers and config.json (fast, no torch). This is where a
mislabelled export ("FP8" that is really INT8, a per-tensor scale where the
recipe said per-channel, an excluded layer that got quantized) is caught.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import layers
from pipeline.errors import VerifyFailed
from pipeline.recipe import Recipe
from pipeline.safetensors_header import folder_size, read_folder
from pipeline.schemes import STORED_WEIGHT_DTYPE, WEIGHT_DTYPES, SchemeSpec, get_scheme

FLOAT_DTYPES = {"BF16", "F16", "F32"}
# How Quark's quantization_config names our granularities.
QUARK_QSCHEME = {"per_tensor": "per_tensor", "per_channel": "per_channel", "per_group": "per_group", "per_token": "per_channel"}
QUARK_DTYPE = {dtype: dtype for dtype in WEIGHT_DTYPES}
# Quark's kv_cache_group: the k/v projection outputs get an fp8 per-tensor scale.
KV_CACHE_DTYPE = {"fp8": "fp8_e4m3"}


def _scale_shape_problem(scheme: SchemeSpec, weight_shape: list[int], scale_shape: list[int]) -> str | None:
    out_features, in_features = weight_shape[0], weight_shape[-1]
    if scheme.weight_granularity == "per_tensor":
        ok = scale_shape in ([], [1])
        wanted = "one scale"
    elif scheme.weight_granularity == "per_channel":
        ok = scale_shape in ([out_features], [out_features, 1])
        wanted = f"one scale per output row ({out_features})"
    else:
        groups = in_features // scheme.group_size
        ok = scale_shape in ([out_features, groups], [groups, out_features])
        wanted = f"{out_features}x{groups} group scales"
    return None if ok else f"scale shape {scale_shape}, expected {wanted}"


def check_config(scheme: SchemeSpec, config: dict) -> list[str]:
    """Problems in config.json's quantization_config against the scheme."""
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return ["config.json has no quantization_config"]
    problems = []
    if quantization.get("quant_method") != "quark":
        problems.append(f"quant_method is {quantization.get('quant_method')!r}, expected 'quark'")
    global_config = quantization.get("global_quant_config") or {}
    weight = global_config.get("weight") or {}
    if weight.get("dtype") != QUARK_DTYPE[scheme.weight_dtype]:
        problems.append(f"weight dtype is {weight.get('dtype')!r}, expected {QUARK_DTYPE[scheme.weight_dtype]!r}")
    if weight.get("qscheme") != QUARK_QSCHEME[scheme.weight_granularity]:
        problems.append(f"weight qscheme is {weight.get('qscheme')!r}, expected {scheme.weight_granularity!r}")
    if scheme.group_size is not None and weight.get("group_size") != scheme.group_size:
        problems.append(f"weight group_size is {weight.get('group_size')!r}, expected {scheme.group_size}")
    if (weight.get("symmetric", True) is not False) != scheme.weight_symmetric:
        problems.append(f"weight symmetric is {weight.get('symmetric')!r}, expected {scheme.weight_symmetric}")
    activation = global_config.get("input_tensors")
    if scheme.weight_only:
        if activation:
            problems.append("activations are quantized, but the scheme is weight-only")
    elif not activation:
        problems.append("activations are not quantized")
    else:
        if activation.get("dtype") != QUARK_DTYPE[scheme.activation_dtype]:
            problems.append(
                f"activation dtype is {activation.get('dtype')!r}, expected {QUARK_DTYPE[scheme.activation_dtype]!r}"
            )
        if activation.get("qscheme") != QUARK_QSCHEME[scheme.activation_granularity]:
            problems.append(f"activation qscheme is {activation.get('qscheme')!r}, expected {scheme.activation_granularity!r}")
        if bool(activation.get("is_dynamic")) == scheme.activation_static:
            wanted = "static" if scheme.activation_static else "dynamic"
            problems.append(f"activation quantization is not {wanted}")
        if (activation.get("symmetric", True) is not False) != scheme.activation_symmetric:
            problems.append(f"activation symmetric is {activation.get('symmetric')!r}, expected {scheme.activation_symmetric}")
    return problems


def check_kv_cache(kv_cache: str | None, config: dict, exported: dict[str, dict], linear_layers: list[str]) -> list[str]:
    """The export carries Quark's KV-cache group when the recipe asks for one, and not otherwise."""
    quantization = config.get("quantization_config") or {}
    groups = quantization.get("kv_cache_quant_config") or {}
    scaled = [layer for layer in linear_layers if f"{layer}.output_scale" in exported]
    if kv_cache is None:
        return ["kv_cache_quant_config present, but the recipe has no kv_cache"] if groups else []
    problems = []
    if not groups:
        problems.append("quantization_config has no kv_cache_quant_config (the recipe asks for kv_cache)")
    for pattern, group in groups.items():
        output = (group or {}).get("output_tensors") or {}
        if output.get("dtype") != KV_CACHE_DTYPE[kv_cache]:
            problems.append(f"kv cache group {pattern}: output dtype {output.get('dtype')!r}, expected {KV_CACHE_DTYPE[kv_cache]!r}")
    kv_layers = [layer for layer in linear_layers if layer.endswith(("k_proj", "v_proj"))]
    missing = [layer for layer in kv_layers if layer not in scaled]
    if missing:
        problems.append(f"{missing[0]}: no output_scale for the KV cache (+{len(missing) - 1} more k/v layers)")
    return problems


def check_tensors(
    default_scheme: SchemeSpec, exported: dict[str, dict], base: dict[str, dict], linear_layers: list[str],
    exclude: tuple[str, ...], overrides: dict[str, SchemeSpec] | None = None,
) -> tuple[list[str], int]:
    """Problems in the exported tensors; also returns how many layers were checked as quantized.

    `overrides` maps a layer name to the scheme the recipe's `layers` gave it.
    """
    problems = []
    excluded = set(layers.select(linear_layers, exclude))
    overrides = overrides or {}
    checked = 0
    for layer in linear_layers:
        scheme = overrides.get(layer, default_scheme)
        stored_dtype = STORED_WEIGHT_DTYPE[scheme.weight_dtype]
        weight, scale = exported.get(f"{layer}.weight"), exported.get(f"{layer}.weight_scale")
        if layer in excluded:
            if scale is not None:
                problems.append(f"{layer}: excluded by the recipe but quantized")
            elif weight is not None and weight["dtype"] not in FLOAT_DTYPES:
                problems.append(f"{layer}: excluded by the recipe but stored as {weight['dtype']}")
            continue
        if weight is None:
            if f"{layer}.weight" in base:  # tied weights (lm_head) are absent from both
                problems.append(f"{layer}: weight missing from the export")
            continue
        checked += 1
        if weight["dtype"] != stored_dtype:
            problems.append(f"{layer}: weight stored as {weight['dtype']}, expected {stored_dtype} for {scheme.name}")
        if scale is None:
            problems.append(f"{layer}: no weight_scale")
        else:
            base_shape = base.get(f"{layer}.weight", weight)["shape"]
            problem = _scale_shape_problem(scheme, base_shape, scale["shape"])
            if problem:
                problems.append(f"{layer}: {problem}")
        if not scheme.weight_symmetric and f"{layer}.weight_zero_point" not in exported:
            problems.append(f"{layer}: asymmetric weights but no weight_zero_point")
        has_input_scale = f"{layer}.input_scale" in exported
        if scheme.activation_static and not has_input_scale:
            problems.append(f"{layer}: static activation scheme but no input_scale")
        if not scheme.activation_static and has_input_scale:
            problems.append(f"{layer}: dynamic/weight-only scheme but a static input_scale was stored")
    return problems, checked


def verify(
    recipe: Recipe, base_model_dir: Path, model_dir: Path, linear_layers: list[str], out_dir: Path,
    layer_overrides: dict[str, str] | None = None,
) -> dict:
    scheme = recipe.scheme
    config = json.loads((model_dir / "config.json").read_text())
    exported, base = read_folder(model_dir), read_folder(base_model_dir)
    problems = check_config(scheme, config)
    overrides = {name: get_scheme(scheme_name) for name, scheme_name in (layer_overrides or {}).items()}
    tensor_problems, checked = check_tensors(
        scheme, exported, base, linear_layers, recipe.quantization.exclude, overrides
    )
    problems += tensor_problems
    problems += check_kv_cache(recipe.quantization.kv_cache, config, exported, linear_layers)
    if checked == 0:
        problems.append("no quantized layer found in the export")
    size_ratio = folder_size(model_dir) / folder_size(base_model_dir)
    summary = {
        "scheme": scheme.name,
        "kv_cache": recipe.quantization.kv_cache,
        "quantized_layers_checked": checked,
        "excluded_layers": layers.select(linear_layers, recipe.quantization.exclude),
        "export_size_bytes": folder_size(model_dir),
        "base_size_bytes": folder_size(base_model_dir),
        "size_ratio": round(size_ratio, 4),
        "problems": problems,
        "passed": not problems,
    }
    (out_dir / "verify.json").write_text(json.dumps(summary, indent=2) + "\n")
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerifyFailed(f"export does not match scheme {scheme.name}: {problems[0]}{more}", stage="verify")
    return summary
