"""A scheme in Quark's words, both ways: the Quark config a SchemeSpec quantizes with (built with Quark's own
spec classes and LLM templates; Quark imported only when a config is built), and the scheme an exported
`quantization_config` claims (read back by `check`, `verify` and the transformers engine).

The scheme itself is recipe/schemes.py's SchemeSpec: this is the one place that speaks Quark's vocabulary
for it (dtype and qscheme names, per_group blocks, progressive and scale-quantized stages).
"""

from __future__ import annotations

import dataclasses

from quantize_pipeline.recipe.schema import ALGORITHMS, Recipe
from quantize_pipeline.recipe.schemes import (
    ACTIVATION_DTYPES,
    BLOCK_DTYPES,
    BLOCK_SCALE_DTYPES,
    PER_BLOCK_DTYPES,
    WEIGHT_DTYPES,
    WEIGHT_GRANULARITIES,
    SchemeSpec,
    explicit_scheme,
)

# --- building: SchemeSpec -> Quark's config -------------------------------------------------------


# Quark's *Spec helper class per (dtype, granularity). Per-token activations are Quark's
# per-channel spec with ch_axis=1 on a [tokens, hidden] input, as its own ptpc_fp8 does.
_SPEC_CLASS_NAMES = {
    ("int8", "per_tensor"): "Int8PerTensorSpec", ("int8", "per_channel"): "Int8PerChannelSpec",
    ("int8", "per_group"): "Int8PerGroupSpec",
    ("uint8", "per_tensor"): "Uint8PerTensorSpec", ("uint8", "per_channel"): "Uint8PerChannelSpec",
    ("uint8", "per_group"): "Uint8PerGroupSpec",
    ("int4", "per_tensor"): "Int4PerTensorSpec", ("int4", "per_channel"): "Int4PerChannelSpec",
    ("int4", "per_group"): "Int4PerGroupSpec",
    ("uint4", "per_tensor"): "Uint4PerTensorSpec", ("uint4", "per_channel"): "Uint4PerChannelSpec",
    ("uint4", "per_group"): "Uint4PerGroupSpec",
    ("fp8_e4m3", "per_tensor"): "FP8E4M3PerTensorSpec", ("fp8_e4m3", "per_channel"): "FP8E4M3PerChannelSpec",
}


def _tensor_spec(dtype: str, granularity: str, *, symmetric: bool, dynamic: bool, group_size: int | None = None,
                 activation: bool = False, float_scale_type: bool = True):
    """One Quark QTensorConfig, built with Quark's own helper classes and the arguments its templates use."""
    from quark.torch.quantization.config import config as quark_config

    qscheme = "per_channel" if granularity == "per_token" else granularity
    spec_class = getattr(quark_config, _SPEC_CLASS_NAMES[(dtype, qscheme)])
    arguments: dict = {"is_dynamic": dynamic}
    if dtype != "fp8_e4m3":  # Quark's FP8 specs are symmetric (no zero point)
        arguments["symmetric"] = symmetric
    elif qscheme == "per_tensor":  # as Quark's fp8 template passes them (its mxfp4_fp8 leaves scale_type unset)
        arguments.update(observer_method="min_max", **({"scale_type": "float"} if float_scale_type else {}))
    if qscheme == "per_channel":
        arguments["ch_axis"] = 1 if activation else 0
    elif qscheme == "per_group":
        arguments.update(ch_axis=-1, group_size=group_size)
    return spec_class(**arguments).to_quantization_spec()


# Quark's OCP MX spec class per element dtype (blocks of 32, e8m0 scales).
_MX_SPEC_CLASS_NAMES = {
    "fp4_e2m1": "OCP_MXFP4Spec", "fp6_e3m2": "OCP_MXFP6E3M2Spec", "fp6_e2m3": "OCP_MXFP6E2M3Spec",
}


def _block_spec(dtype: str, scheme: SchemeSpec, *, dynamic: bool):
    """A per_block QTensorConfig as Quark's mxfp*/nvfp4 templates build one."""
    from quark.torch.quantization.config import config as quark_config

    if scheme.scale_dtype == "e8m0":
        return getattr(quark_config, _MX_SPEC_CLASS_NAMES[dtype])(ch_axis=-1, is_dynamic=dynamic).to_quantization_spec()
    # NVFP4: FP4 per block of 16 with float scales, themselves quantized to FP8 E4M3 under one static
    # FP32 scale per tensor (Quark's ScaleQuantSpec, as its nvfp4 template).
    return quark_config.ScaleQuantSpec(
        first_stage=quark_config.FP4PerGroupSpec(ch_axis=-1, group_size=scheme.block_size, is_dynamic=dynamic,
                                                 scale_type="float32"),
        second_stage=quark_config.FP8E4M3PerTensorSpec(observer_method="min_max", is_dynamic=False,
                                                       scale_type="float32"),
    ).to_quantization_spec()


def layer_config(scheme: SchemeSpec):
    """The Quark QLayerConfig of a (non-progressive) scheme, from its fields alone."""
    from quark.torch.quantization.config.config import QLayerConfig

    if scheme.weight_granularity == "per_block":
        weight = _block_spec(scheme.weight_dtype, scheme, dynamic=False)
    else:
        weight = _tensor_spec(scheme.weight_dtype, scheme.weight_granularity, symmetric=scheme.weight_symmetric,
                              dynamic=False, group_size=scheme.group_size)
    if scheme.weight_only:
        return QLayerConfig(weight=weight)
    if scheme.activation_granularity == "per_block":
        activation = _block_spec(scheme.activation_dtype, scheme, dynamic=True)
    else:
        activation = _tensor_spec(scheme.activation_dtype, scheme.activation_granularity,
                                  symmetric=scheme.activation_symmetric, dynamic=not scheme.activation_static,
                                  activation=True, float_scale_type=scheme.weight_granularity != "per_block")
    return QLayerConfig(weight=weight, input_tensors=activation)


def _register_scheme(scheme: SchemeSpec) -> None:
    """Make a scheme outside Quark's template vocabulary (int8_per_channel, explicit forms) known to it."""
    from quark.torch import LLMTemplate

    if scheme.quark_scheme is None and scheme.name not in LLMTemplate.get_supported_schemes():
        LLMTemplate.register_scheme(scheme.name, layer_config(scheme))


def _template_for(model_type: str):
    from quark.torch import LLMTemplate

    if model_type in LLMTemplate.list_available():
        return LLMTemplate.get(model_type)
    # An architecture Quark has no template for: the common HF attention names.
    return LLMTemplate(model_type=model_type, kv_layers_name=["*k_proj", "*v_proj"], q_layer_name="*q_proj")


def quark_scheme_name(scheme: SchemeSpec) -> str:
    return scheme.quark_scheme or scheme.name


def algorithm_configs(recipe: Recipe, template) -> dict | None:
    """The recipe's algorithm options applied over the template's default config for the model type."""
    from quark.torch.quantization.config.algo_configs import get_algo_config

    name, options = recipe.quantization.algorithm_name, recipe.quantization.algorithm_options
    if name is None or not options:
        return None
    default = template.algo_config.get(name) or get_algo_config(name, template.model_type)
    if default is None:  # no template default for this architecture: Quark's class defaults
        from quark.torch.quantization.config import config as quark_config

        default = getattr(quark_config, ALGORITHMS[name].quark_config_class)()
    return {name: dataclasses.replace(default, **options)}


def build_quark_config(recipe: Recipe, model_type: str, excluded_layers: list[str], overrides: dict[str, SchemeSpec]):
    for scheme in (recipe.scheme, *overrides.values()):
        _register_scheme(scheme)
    template = _template_for(model_type)
    return template.get_config(
        scheme=quark_scheme_name(recipe.scheme),
        algorithm=recipe.quantization.algorithm_name,
        kv_cache_scheme=recipe.quantization.kv_cache,
        exclude_layers=excluded_layers,
        layer_config={name: quark_scheme_name(scheme) for name, scheme in overrides.items()} or None,
        algo_configs=algorithm_configs(recipe, template),
    )


def quark_layer_configs(quark_config) -> list[tuple]:
    """(name, QLayerConfig) for every layer config of a Quark QConfig: the global one, then by layer name
    pattern, then by module type."""
    return [("global", quark_config.global_quant_config), *quark_config.layer_quant_config.items(),
            *quark_config.layer_type_quant_config.items()]


# --- reading: an exported quantization_config -> the scheme it claims ---------------------------------


# Quark's dtype names for ours (Quark says "fp4" for FP4 E2M1).
QUARK_DTYPE = {dtype: dtype for dtype in (*WEIGHT_DTYPES, *ACTIVATION_DTYPES)} | {"fp4_e2m1": "fp4"}
FROM_QUARK_DTYPE = {quark: ours for ours, quark in QUARK_DTYPE.items()}


def quark_stages(entry) -> tuple[dict | None, dict | None]:
    """(element config, scale config) of a Quark weight/input_tensors entry. A list is either a
    scale-quantized pair (NVFP4: the FP4 element spec, then an `is_scale_quant` FP8 spec for its
    scales) or progressive steps (int4_fp8: the last step is what is stored)."""
    if isinstance(entry, list):
        if len(entry) == 2 and isinstance(entry[1], dict) and entry[1].get("is_scale_quant"):
            return entry[0], entry[1]
        return (entry[-1] if entry else None), None
    return (entry if isinstance(entry, dict) else None), None


def block_scale_of(element: dict, scale_stage: dict | None) -> tuple[str | None, bool]:
    """(scale dtype, global scale) of a Quark per_group element config over FP4/FP6 elements:
    e8m0 scales (OCP MX), or FP8 E4M3 scales quantized per tensor (NVFP4)."""
    if scale_stage is not None:
        fp8_per_tensor = scale_stage.get("dtype") == "fp8_e4m3" and scale_stage.get("qscheme") == "per_tensor"
        return ("fp8_e4m3", True) if fp8_per_tensor else (None, False)
    return ("e8m0", False) if element.get("scale_format") == "e8m0" else (None, False)


def infer_from_quark_config(quantization_config: dict) -> str | None:
    """The recipe scheme an exported Quark `quantization_config` claims to be (a named scheme, or
    an explicit-form name), or None."""
    global_config = quantization_config.get("global_quant_config") or {}
    weight, activation = global_config.get("weight"), global_config.get("input_tensors")
    if isinstance(weight, list) and quark_stages(weight)[1] is None:  # progressive (two-step) weights: int4_fp8
        return "int4_fp8" if weight and weight[-1].get("dtype") in ("int4", "uint4") else None
    weight, weight_scale = quark_stages(weight)
    if weight is None:
        return None
    return _explicit_from_quark(weight, weight_scale, activation)


# Quark writes a per-token activation scale as qscheme per_channel (ch_axis 1 on [tokens, hidden]);
# FP4/FP6 blocks as per_group with the block as group_size.
_QUARK_ACTIVATION_QSCHEME = {"per_tensor": "per_tensor", "per_channel": "per_token", "per_group": "per_block"}


def _explicit_from_quark(weight: dict, weight_scale: dict | None, activation) -> str | None:
    """The scheme (named when it is one) whose fields a Quark weight/input_tensors config spells out."""
    weight_dtype, granularity = FROM_QUARK_DTYPE.get(weight.get("dtype")), weight.get("qscheme")
    if weight_dtype not in WEIGHT_DTYPES or granularity not in WEIGHT_GRANULARITIES or weight.get("is_dynamic"):
        return None
    arguments: dict = dict(weight_dtype=weight_dtype, weight_symmetric=weight.get("symmetric", True) is not False)
    if weight_dtype in BLOCK_DTYPES or (granularity == "per_group" and weight.get("scale_format") == "e8m0"):
        scale_dtype, global_scale = block_scale_of(weight, weight_scale)
        if granularity != "per_group" or scale_dtype is None or BLOCK_SCALE_DTYPES[scale_dtype] != weight.get("group_size"):
            return None
        arguments.update(weight_granularity="per_block", block_size=weight["group_size"], scale_dtype=scale_dtype,
                         global_scale=global_scale)
    else:
        group_size = weight.get("group_size") if granularity == "per_group" else None
        if granularity == "per_group" and not isinstance(group_size, int):
            return None
        arguments.update(weight_granularity=granularity, group_size=group_size)
    if activation:
        activation, activation_scale = quark_stages(activation)
        activation_dtype = FROM_QUARK_DTYPE.get((activation or {}).get("dtype"))
        if activation_dtype not in ACTIVATION_DTYPES:
            return None
        activation_granularity = _QUARK_ACTIVATION_QSCHEME.get(activation.get("qscheme"))
        if activation_granularity is None or (activation_granularity == "per_token" and not activation.get("is_dynamic")):
            return None
        if activation_dtype in BLOCK_DTYPES and activation_granularity != "per_block":
            return None
        if activation_granularity == "per_block" and activation_dtype not in PER_BLOCK_DTYPES:
            return None
        if activation_granularity == "per_block" and (
            arguments["weight_granularity"] != "per_block" or activation.get("group_size") != arguments["block_size"]
            or block_scale_of(activation, activation_scale) != (arguments["scale_dtype"], arguments["global_scale"])
        ):
            return None
        arguments.update(
            activation_dtype=activation_dtype, activation_granularity=activation_granularity,
            activation_static=not activation.get("is_dynamic"),
            activation_symmetric=activation.get("symmetric", True) is not False,
        )
    return explicit_scheme(**arguments).name


def infer_kv_cache(quantization_config: dict) -> str | None:
    """The recipe kv_cache an export's Quark kv_cache_quant_config claims: fp8, or None."""
    groups = quantization_config.get("kv_cache_quant_config") or {}
    dtypes = {((group or {}).get("output_tensors") or {}).get("dtype") for group in groups.values()}
    return "fp8" if dtypes == {"fp8_e4m3"} else None
