"""quantize: AMD Quark's LLMTemplate config + ModelQuantizer over the calibration tokens.

Runs in a child process (see worker.py) together with freeze and export, which
need the same in-memory quantized model; each of the three writes its own folder.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from pathlib import Path

from quantize_pipeline.quantize import moe
from quantize_pipeline.recipe import layers
from quantize_pipeline.recipe.schema import ALGORITHMS, Recipe
from quantize_pipeline.recipe.schemes import SchemeSpec


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def algorithm_configs(recipe: Recipe, template) -> dict | None:
    """The recipe's algorithm options applied over the template's default config for the model type."""
    import dataclasses

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
    batches = [torch.tensor([ids], dtype=torch.long) for ids in token_batches]
    with torch.no_grad():
        model = quantizer.quantize_model(model, batches)
    uncalibrated = moe.fill_uncalibrated_expert_scales(model, resolved.model_type)
    say_uncalibrated(uncalibrated)
    summary = write_summary(recipe, resolved, len(batches), out_dir,
                            {**(extra or {}), "experts_without_calibration_tokens": moe.uncalibrated_record(uncalibrated)})
    return model, quantizer, summary
