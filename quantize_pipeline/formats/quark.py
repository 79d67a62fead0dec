"""AMD Quark exports (`quant_method: quark`): what this pipeline itself writes.

The config names dtypes and qschemes in Quark's vocabulary (`global_quant_config.weight`,
`input_tensors`, `kv_cache_quant_config`); the tensors are `weight`, `weight_scale`,
`weight_zero_point`, `input_scale`, and `output_scale` on k/v projections for the KV cache.
"""

from __future__ import annotations

from quantize_pipeline.formats.base import Claim, FormatError, LayerTensors, cdiv, standard_scale_shapes
from quantize_pipeline.formats.quark_config import (
    QUARK_DTYPE,
    block_scale_of,
    infer_from_quark_config,
    infer_kv_cache,
    quark_stages,
)
from quantize_pipeline.recipe import layers
from quantize_pipeline.recipe.schemes import (
    STORED_BLOCK_SCALE_DTYPE,
    STORED_WEIGHT_DTYPE,
    WEIGHT_BITS,
    SchemeSpec,
    get_scheme,
)

# How Quark's quantization_config names our granularities and dtypes (FP4/FP6 blocks are its
# per_group with the block as group_size).
QUARK_QSCHEME = {"per_tensor": "per_tensor", "per_channel": "per_channel", "per_group": "per_group",
                 "per_token": "per_channel", "per_block": "per_group"}
# Quark's kv_cache_group: the k/v projection outputs get an fp8 per-tensor scale.
KV_CACHE_DTYPE = {"fp8": "fp8_e4m3"}


def _block_problems(what: str, scheme: SchemeSpec, element: dict, scale_stage: dict | None) -> list[str]:
    """A per_block element config: the block as group_size, and its scales (e8m0, or FP8 under a global scale)."""
    problems = []
    if element.get("group_size") != scheme.block_size:
        problems.append(f"{what} block (group_size) is {element.get('group_size')!r}, expected {scheme.block_size}")
    claimed = block_scale_of(element, scale_stage)
    if claimed != (scheme.scale_dtype, scheme.global_scale):
        said = "no block scale this tool knows" if claimed[0] is None else f"{claimed[0]} block scales"
        wanted = f"{scheme.scale_dtype} block scales" + (" under a per-tensor scale" if scheme.global_scale else "")
        problems.append(f"{what} has {said}{' under a per-tensor scale' if claimed[1] else ''}, expected {wanted}")
    return problems


def _tensor_problems(what: str, entry, dtype: str, granularity: str, scheme: SchemeSpec, symmetric: bool) -> list[str]:
    element, scale_stage = quark_stages(entry)
    element = element or {}
    problems = []
    if element.get("dtype") != QUARK_DTYPE[dtype]:
        problems.append(f"{what} dtype is {element.get('dtype')!r}, expected {QUARK_DTYPE[dtype]!r}")
    if element.get("qscheme") != QUARK_QSCHEME[granularity]:
        problems.append(f"{what} qscheme is {element.get('qscheme')!r}, expected {granularity!r}")
    if granularity == "per_block":
        return problems + _block_problems(what, scheme, element, scale_stage)
    if what == "weight" and scheme.group_size is not None and element.get("group_size") != scheme.group_size:
        problems.append(f"weight group_size is {element.get('group_size')!r}, expected {scheme.group_size}")
    if (element.get("symmetric", True) is not False) != symmetric:
        problems.append(f"{what} symmetric is {element.get('symmetric')!r}, expected {symmetric}")
    return problems


def check_config(scheme: SchemeSpec, quantization: dict) -> list[str]:
    """Problems in a Quark quantization_config against the scheme."""
    problems = []
    if quantization.get("quant_method") != "quark":
        problems.append(f"quant_method is {quantization.get('quant_method')!r}, expected 'quark'")
    return problems + layer_config_problems(scheme, quantization.get("global_quant_config") or {})


def layer_config_problems(scheme: SchemeSpec, layer_config: dict) -> list[str]:
    """Problems in one of the config's layer entries (global_quant_config, a layer_quant_config value)."""
    problems = _tensor_problems("weight", layer_config.get("weight"), scheme.weight_dtype, scheme.weight_granularity,
                                scheme, scheme.weight_symmetric)
    if scheme.progressive and not (isinstance(layer_config.get("weight"), list) and len(layer_config["weight"]) == 2):
        problems.append("weight is not quantized in two steps (FP8, then INT4), as int4_fp8 is")
    activation = layer_config.get("input_tensors")
    if scheme.weight_only:
        if activation:
            problems.append("activations are quantized, but the scheme is weight-only")
    elif not activation:
        problems.append("activations are not quantized")
    else:
        problems += _tensor_problems("activation", activation, scheme.activation_dtype, scheme.activation_granularity,
                                     scheme, scheme.activation_symmetric)
        if bool((quark_stages(activation)[0] or {}).get("is_dynamic")) == scheme.activation_static:
            wanted = "static" if scheme.activation_static else "dynamic"
            problems.append(f"activation quantization is not {wanted}")
    return problems


def check_layer_configs(overrides: dict[str, SchemeSpec], quantization: dict) -> list[str]:
    """Each layer the recipe's `layers:` gives its own scheme must have a layer_quant_config entry (its name, or a
    glob Quark kept as written) that says that scheme: INT4 tensors under an entry that says FP8 are mislabelled."""
    entries = quantization.get("layer_quant_config") or {}
    problems = []
    for layer, scheme in overrides.items():
        key = layer if layer in entries else next((key for key in entries if layers.matches(layer, key)), None)
        if key is None:
            problems.append(f"{layer}: the recipe gives it {scheme.name}, but layer_quant_config has no entry for it")
            continue
        problems += [f"layer_quant_config[{key!r}]: {problem} (for {scheme.name})"
                     for problem in layer_config_problems(scheme, entries[key] or {})]
    return problems


def check_kv_cache(kv_cache: str | None, quantization: dict, exported: dict[str, dict], linear_layers: list[str]) -> list[str]:
    """The export carries Quark's KV-cache group when the recipe asks for one, and not otherwise."""
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


class QuarkAdapter:
    quant_method = "quark"
    checks = ("global_quant_config (dtype, qscheme, group_size, symmetric, is_dynamic) against the scheme; "
              "`weight` dtype (int4 packed eight to an int32), `weight_scale` shape, `weight_zero_point` when "
              "asymmetric, `input_scale` only when static; `exclude`d layers left unquantized; "
              "`kv_cache_quant_config` and k/v `output_scale`")

    def claim(self, quantization_config: dict) -> Claim:
        name = infer_from_quark_config(quantization_config)
        if name is None:
            raise FormatError("global_quant_config", "not a scheme this tool knows; pass --recipe")
        return Claim(get_scheme(name), infer_kv_cache(quantization_config), tuple(quantization_config.get("exclude") or ()))

    def config_problems(self, scheme: SchemeSpec, quantization_config: dict) -> list[str]:
        return check_config(scheme, quantization_config)

    def layer_tensors(self, scheme: SchemeSpec, quantization_config: dict, out_features: int, in_features: int) -> LayerTensors:
        if scheme.weight_granularity == "per_block":
            return block_layer_tensors(scheme, out_features, in_features)
        if scheme.progressive:
            return progressive_layer_tensors(scheme, out_features, in_features)
        shapes, wanted = standard_scale_shapes(scheme, out_features, in_features)
        return LayerTensors(
            weight="weight", weight_dtype=STORED_WEIGHT_DTYPE[scheme.weight_dtype], weight_shape=None,
            scale="weight_scale", scale_shapes=shapes, scale_wanted=wanted,
            zero_point=None if scheme.weight_symmetric else "weight_zero_point",
        )

    def kv_cache_problems(self, kv_cache, quantization_config, exported, linear_layers) -> list[str]:
        return check_kv_cache(kv_cache, quantization_config, exported, linear_layers)


def progressive_layer_tensors(scheme: SchemeSpec, out_features: int, in_features: int) -> LayerTensors:
    """int4_fp8 (W4A8) as Quark exports it and vLLM's QuarkW4A8Fp8MoEMethod loads it: INT4 codes packed eight to an
    int32, `weight_scale` the first step's one FP8 tensor scale, `weight_scale_2` the INT4 step's scale per
    output row (measured on the synthetic Mixtral and Qwen3-MoE: [] and [rows], float32)."""
    return LayerTensors(
        weight="weight", weight_dtype=STORED_WEIGHT_DTYPE[scheme.weight_dtype],
        weight_shape=(out_features, cdiv(in_features * WEIGHT_BITS[scheme.weight_dtype], 32)),
        scale="weight_scale", scale_shapes=((), (1,)), scale_wanted="one FP8 step scale (weight_scale_2: one per row)",
        required=("weight_scale_2",),
    )


def block_layer_tensors(scheme: SchemeSpec, out_features: int, in_features: int) -> LayerTensors:
    """FP4/FP6 codes packed into uint8 rows (two FP4 or four FP6 codes per 1 or 3 bytes), one scale
    per block of each row (e8m0 bytes or FP8), and NVFP4's FP32 tensor scales `weight_scale_2`
    (and `input_scale_2` for its activations)."""
    blocks = cdiv(in_features, scheme.block_size)
    required = ("weight_scale_2",) if scheme.global_scale else ()
    if scheme.global_scale and scheme.activation_granularity == "per_block":
        required += ("input_scale_2",)
    return LayerTensors(
        weight="weight", weight_dtype=STORED_WEIGHT_DTYPE[scheme.weight_dtype],
        weight_shape=(out_features, in_features * WEIGHT_BITS[scheme.weight_dtype] // 8),
        scale="weight_scale", scale_shapes=((out_features, blocks),),
        scale_wanted=f"{out_features}x{blocks} {scheme.scale_dtype} block scales",
        scale_dtype=STORED_BLOCK_SCALE_DTYPE[scheme.scale_dtype], required=required,
    )


ADAPTER = QuarkAdapter()
