"""verify: the exported tensors and config are what the recipe asked for.

Works on any format a `quantize_pipeline.formats` adapter reads (Quark, compressed-tensors, GPTQ, AWQ,
FP8): the adapter named by `quantization_config.quant_method` checks the config against the
scheme and says which tensors each quantized layer stores; the checks here are shared. Reads
safetensors headers and config.json only, except where a header cannot tell (sub-8-bit
integers stored one per byte): there it reads those weights' values. This is where a
mislabelled export ("FP8" that is really INT8, an "int4" config over int8 values, a
per-tensor scale where the recipe said per-channel, an ignore list that disagrees with the
tensors) is caught.
"""

from __future__ import annotations

import json
from pathlib import Path

from quantize_pipeline import formats
from quantize_pipeline.errors import VerifyFailed
from quantize_pipeline.formats import FormatAdapter, LayerTensors
from quantize_pipeline.formats.quark import check_layer_configs
from quantize_pipeline.formats.safetensors_header import folder_size, read_folder
from quantize_pipeline.recipe import layers
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.recipe.schemes import SchemeSpec

FLOAT_DTYPES = {"BF16", "F16", "F32"}


def _quantization_config(config: dict) -> dict | None:
    quantization = config.get("quantization_config")
    return quantization if isinstance(quantization, dict) else None


def check_config(scheme: SchemeSpec, config: dict) -> list[str]:
    """Problems in config.json's quantization_config against the scheme (through its format's adapter)."""
    quantization = _quantization_config(config)
    if quantization is None:
        return ["config.json has no quantization_config"]
    try:
        adapter = formats.adapter_for(quantization)
    except formats.FormatError as exc:
        return [str(exc)]
    return adapter.config_problems(scheme, quantization)


def check_kv_cache(kv_cache: str | None, config: dict, exported: dict[str, dict], linear_layers: list[str]) -> list[str]:
    """The export carries the KV-cache scales its format stores when the recipe asks for them, and not otherwise."""
    quantization = _quantization_config(config) or {}
    adapter = formats.ADAPTERS.get(quantization.get("quant_method"), formats.ADAPTERS["quark"])
    return adapter.kv_cache_problems(kv_cache, quantization, exported, linear_layers)


def _scale_shape_problem(expected: LayerTensors, scale_shape: list[int]) -> str | None:
    ok = tuple(scale_shape) in expected.scale_shapes
    return None if ok else f"scale shape {scale_shape}, expected {expected.scale_wanted}"


def _layer_problems(layer: str, scheme: SchemeSpec, expected: LayerTensors, exported: dict[str, dict]) -> list[str]:
    problems = []
    weight = exported[f"{layer}.{expected.weight}"]
    if weight["dtype"] != expected.weight_dtype:
        problems.append(f"{layer}: weight stored as {weight['dtype']}, expected {expected.weight_dtype} for {scheme.name}")
    elif expected.weight_shape is not None and tuple(weight["shape"]) != expected.weight_shape:
        problems.append(f"{layer}: {expected.weight} shape {weight['shape']}, expected {list(expected.weight_shape)} for {scheme.name}")
    scale = exported.get(f"{layer}.{expected.scale}")
    if scale is None:
        problems.append(f"{layer}: no {expected.scale}")
    else:
        problem = _scale_shape_problem(expected, scale["shape"])
        if problem:
            problems.append(f"{layer}: {problem}")
        if expected.scale_dtype is not None and scale["dtype"] != expected.scale_dtype:
            problems.append(f"{layer}: {expected.scale} stored as {scale['dtype']}, expected {expected.scale_dtype} "
                            f"for {scheme.name}")
    if expected.zero_point is not None:
        zero_point = exported.get(f"{layer}.{expected.zero_point}")
        if zero_point is None:
            problems.append(f"{layer}: asymmetric weights but no {expected.zero_point}")
        elif expected.zero_point_shape is not None and tuple(zero_point["shape"]) != expected.zero_point_shape:
            problems.append(f"{layer}: {expected.zero_point} shape {zero_point['shape']}, expected {list(expected.zero_point_shape)}")
    problems += [f"{layer}: no {name}" for name in expected.required if f"{layer}.{name}" not in exported]
    has_input_scale = f"{layer}.{expected.input_scale}" in exported
    if scheme.activation_static and not has_input_scale:
        problems.append(f"{layer}: static activation scheme but no {expected.input_scale}")
    if not scheme.activation_static and has_input_scale:
        problems.append(f"{layer}: dynamic/weight-only scheme but a static {expected.input_scale} was stored")
    return problems


def _excluded_problem(layer: str, expected: LayerTensors, exported: dict[str, dict]) -> str | None:
    weight = exported.get(f"{layer}.weight")
    if f"{layer}.{expected.scale}" in exported or (expected.weight != "weight" and f"{layer}.{expected.weight}" in exported):
        return f"{layer}: excluded by the recipe but quantized"
    if weight is not None and weight["dtype"] not in FLOAT_DTYPES:
        return f"{layer}: excluded by the recipe but stored as {weight['dtype']}"
    return None


def check_tensors(
    default_scheme: SchemeSpec, exported: dict[str, dict], base: dict[str, dict], linear_layers: list[str],
    exclude: tuple[str, ...], overrides: dict[str, SchemeSpec] | None = None,
    adapter: FormatAdapter | None = None, quantization_config: dict | None = None,
) -> tuple[list[str], int, dict[str, LayerTensors]]:
    """Problems in the exported tensors, how many layers were checked as quantized, and what was
    expected of each (for the value checks). `overrides` maps a layer name to the scheme the
    recipe's `layers` gave it; `adapter` is the export's format (Quark by default)."""
    adapter = adapter or formats.ADAPTERS["quark"]
    quantization_config = quantization_config or {}
    problems = []
    excluded = set(layers.select(linear_layers, exclude))
    overrides = overrides or {}
    checked = 0
    expectations: dict[str, LayerTensors] = {}
    for layer in linear_layers:
        scheme = overrides.get(layer, default_scheme)
        shape_source = base.get(f"{layer}.weight") or exported.get(f"{layer}.weight") or {"shape": [0, 0]}
        out_features, in_features = shape_source["shape"][0], shape_source["shape"][-1]
        try:
            expected = adapter.layer_tensors(scheme, quantization_config, out_features, in_features)
        except formats.FormatError as exc:
            return [str(exc)], 0, {}
        if layer in excluded:
            problem = _excluded_problem(layer, expected, exported)
            problems += [problem] if problem else []
            continue
        dense = exported.get(f"{layer}.weight")
        if dense is not None and dense["dtype"] in FLOAT_DTYPES and f"{layer}.{expected.scale}" not in exported:
            # left unquantized, yet neither the config's ignore list nor the recipe's exclude names it
            problems.append(f"{layer}: weight stored as {dense['dtype']}, expected {expected.weight_dtype} for {scheme.name}")
            continue
        if f"{layer}.{expected.weight}" not in exported:
            if f"{layer}.weight" in base:  # tied weights (lm_head) are absent from both
                problems.append(f"{layer}: weight missing from the export")
            continue
        checked += 1
        expectations[layer] = expected
        problems += _layer_problems(layer, scheme, expected, exported)
    return problems, checked, expectations


# Float tensors of two or more dimensions that are not a linear layer's weight by design: embeddings.
NOT_LINEAR_WEIGHTS = ("embed_tokens.", "wte.", "word_embeddings.", "embed_positions.")
SCALE_SUFFIXES = ("_scale", "_scale_2", "zero_point", "_scale_inv")


def check_uncovered_weights(exported: dict[str, dict], linear_layers: list[str], exclude: tuple[str, ...]) -> list[str]:
    """Weights that no quantized layer holds and no exclude names, left in a float dtype: the recipe's scheme
    covers every layer it does not exclude, so such a weight was skipped, not kept on purpose. This is how
    a model whose experts are fused 3-D parameters (transformers 5's Mixtral, Qwen3-MoE: `experts.gate_up_proj`
    [experts, 2*ffn, hidden], no nn.Linear per expert, so Quark never sees them) fails verify instead of
    passing with BF16 experts. Embeddings are not linear layers and are skipped."""
    known = set(linear_layers)
    problems = []
    for name, header in exported.items():
        module = name.rsplit(".", 1)[0]
        if (header["dtype"] not in FLOAT_DTYPES or len(header["shape"]) < 2 or module in known
                or name.endswith(SCALE_SUFFIXES) or any(part in f"{name}." for part in NOT_LINEAR_WEIGHTS)
                or layers.select([name, module], exclude)):
            continue
        shape = "x".join(str(size) for size in header["shape"])
        problems.append(f"{name}: {header['dtype']} [{shape}] left in the model dtype: no quantized layer holds it and "
                        "no exclude names it (MoE experts stored as fused parameters are not nn.Linear layers)")
    return problems


def check_values(model_dir: Path, expectations: dict[str, LayerTensors]) -> list[str]:
    """Sub-8-bit integers stored one per byte: the values must fit the claimed bit width
    (an "int4" config over int8 weights passes every header check)."""
    wanted = {f"{layer}.{expected.weight}": expected.value_range
              for layer, expected in expectations.items() if expected.value_range is not None}
    if not wanted:
        return []
    from safetensors import safe_open

    problems = []
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            for name in sorted(set(handle.keys()) & set(wanted)):
                values = handle.get_tensor(name)
                low, high = wanted[name]
                if values.min() < low or values.max() > high:
                    problems.append(f"{name.rsplit('.', 1)[0]}: stored values span {int(values.min())}..{int(values.max())}, "
                                    f"outside the claimed {low}..{high}")
    return problems


def verify(
    recipe: Recipe, base_model_dir: Path, model_dir: Path, linear_layers: list[str], out_dir: Path,
    layer_overrides: dict[str, SchemeSpec] | None = None,
) -> dict:
    scheme = recipe.scheme
    config = json.loads((model_dir / "config.json").read_text())
    exported, base = read_folder(model_dir), read_folder(base_model_dir)
    problems = check_config(scheme, config)
    quantization = _quantization_config(config) or {}
    adapter = formats.ADAPTERS.get(quantization.get("quant_method"), formats.ADAPTERS["quark"])
    tensor_problems, checked, expectations = check_tensors(
        scheme, exported, base, linear_layers, recipe.quantization.kept, layer_overrides, adapter, quantization,
    )
    problems += tensor_problems
    if adapter.quant_method == "quark" and layer_overrides:
        problems += check_layer_configs(layer_overrides, quantization)
    problems += check_uncovered_weights(exported, linear_layers, recipe.quantization.kept)
    problems += check_values(model_dir, expectations)
    problems += check_kv_cache(recipe.quantization.kv_cache, config, exported, linear_layers)
    if checked == 0:
        problems.append("no quantized layer found in the export")
    size_ratio = folder_size(model_dir) / folder_size(base_model_dir)
    summary = {
        "format": adapter.quant_method,
        "format_checks": adapter.checks,
        "scheme": scheme.name,
        "kv_cache": recipe.quantization.kv_cache,
        "quantized_layers_checked": checked,
        "excluded_layers": layers.select(linear_layers, recipe.quantization.kept),
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
