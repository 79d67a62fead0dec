"""AMD Quark exports (`quant_method: quark`): what this pipeline itself writes.

The config names dtypes and qschemes in Quark's vocabulary (`global_quant_config.weight`,
`input_tensors`, `kv_cache_quant_config`); the tensors are `weight`, `weight_scale`,
`weight_zero_point`, `input_scale`, and `output_scale` on k/v projections for the KV cache.
"""

from __future__ import annotations

from pipeline.formats.base import Claim, FormatError, LayerTensors, standard_scale_shapes
from pipeline.schemes import STORED_WEIGHT_DTYPE, WEIGHT_DTYPES, SchemeSpec, get_scheme, infer_from_quark_config, infer_kv_cache

# How Quark's quantization_config names our granularities.
QUARK_QSCHEME = {"per_tensor": "per_tensor", "per_channel": "per_channel", "per_group": "per_group", "per_token": "per_channel"}
QUARK_DTYPE = {dtype: dtype for dtype in WEIGHT_DTYPES}
# Quark's kv_cache_group: the k/v projection outputs get an fp8 per-tensor scale.
KV_CACHE_DTYPE = {"fp8": "fp8_e4m3"}


def check_config(scheme: SchemeSpec, quantization: dict) -> list[str]:
    """Problems in a Quark quantization_config against the scheme."""
    problems = []
    if quantization.get("quant_method") != "quark":
        problems.append(f"quant_method is {quantization.get('quant_method')!r}, expected 'quark'")
    global_config = quantization.get("global_quant_config") or {}
    weight = global_config.get("weight") or {}
    if isinstance(weight, list):  # progressive: the last step is what is stored
        weight = weight[-1] if weight else {}
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
        shapes, wanted = standard_scale_shapes(scheme, out_features, in_features)
        return LayerTensors(
            weight="weight", weight_dtype=STORED_WEIGHT_DTYPE[scheme.weight_dtype], weight_shape=None,
            scale="weight_scale", scale_shapes=shapes, scale_wanted=wanted,
            zero_point=None if scheme.weight_symmetric else "weight_zero_point",
        )

    def kv_cache_problems(self, kv_cache, quantization_config, exported, linear_layers) -> list[str]:
        return check_kv_cache(kv_cache, quantization_config, exported, linear_layers)


ADAPTER = QuarkAdapter()
