"""The interface every format adapter implements, and the checks they share."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

from quantize_pipeline.recipe.schemes import SchemeSpec

Shape = tuple[int, ...]


class FormatError(ValueError):
    """A quantization_config this tool cannot read as a scheme: `field` names where."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"quantization_config.{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Claim:
    """What a checkpoint's quantization_config says it is, in the recipe's language."""

    scheme: SchemeSpec
    kv_cache: str | None = None  # "fp8" or None
    exclude: tuple[str, ...] = ()  # the ignore list, as recipe layer patterns (names, globs, `re:`)


@dataclass(frozen=True)
class LayerTensors:
    """The tensors one quantized linear layer stores in a format (names relative to the layer)."""

    weight: str  # "weight", "weight_packed", "qweight"
    weight_dtype: str  # safetensors header dtype
    weight_shape: Shape | None  # None: not checked (layouts we do not spell out)
    scale: str  # "weight_scale", "scales", "weight_scale_inv"
    scale_shapes: tuple[Shape, ...]  # any of these is accepted
    scale_wanted: str  # the accepted shapes in words, for the message
    zero_point: str | None = None  # required when set
    zero_point_shape: Shape | None = None
    required: tuple[str, ...] = ()  # other tensors that must be there ("weight_shape")
    # Sub-byte integers stored one per byte (compressed-tensors int-quantized with num_bits < 8):
    # the header cannot tell int4 from int8 there, so verify reads the values.
    value_range: tuple[int, int] | None = None
    input_scale: str = "input_scale"  # stored for static activation scales only
    scale_dtype: str | None = None  # safetensors dtype the scale must have (block scales); None: not checked


class FormatAdapter(Protocol):
    quant_method: str
    # What verify checks for this format, in words (recorded in verify.json).
    checks: str

    def claim(self, quantization_config: dict) -> Claim: ...

    def config_problems(self, scheme: SchemeSpec, quantization_config: dict) -> list[str]: ...

    def layer_tensors(
        self, scheme: SchemeSpec, quantization_config: dict, out_features: int, in_features: int,
    ) -> LayerTensors: ...

    def kv_cache_problems(
        self, kv_cache: str | None, quantization_config: dict, exported: dict[str, dict], linear_layers: list[str],
    ) -> list[str]: ...


def scheme_differences(claimed: SchemeSpec, expected: SchemeSpec) -> list[str]:
    """Field-by-field differences between the scheme a config claims and the one expected."""
    names = [f.name for f in fields(SchemeSpec) if f.name not in ("name", "description", "quark_scheme")]
    return [
        f"config says {name} {getattr(claimed, name)!r}, expected {getattr(expected, name)!r}"
        for name in names if getattr(claimed, name) != getattr(expected, name)
    ]


def claim_problems(adapter: FormatAdapter, scheme: SchemeSpec, quantization_config: dict) -> list[str]:
    """config_problems for formats whose whole config is read by `claim`."""
    try:
        claimed = adapter.claim(quantization_config).scheme
    except FormatError as exc:
        return [str(exc)]
    return scheme_differences(claimed, scheme)


def cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def weight_only(scheme: SchemeSpec, what: str) -> None:
    if not scheme.weight_only:
        raise FormatError("activations", f"{what} stores weight-only schemes, not {scheme.name}")


def standard_scale_shapes(scheme: SchemeSpec, out_features: int, in_features: int) -> tuple[tuple[Shape, ...], str]:
    """Scale shapes of formats that store scales output-row first (Quark, compressed-tensors, FP8)."""
    if scheme.weight_granularity == "per_block":
        raise FormatError("scheme", f"{scheme.name}: block formats (MX, NVFP4) are verified in Quark exports only")
    if scheme.weight_granularity == "per_tensor":
        return ((), (1,)), "one scale"
    if scheme.weight_granularity == "per_channel":
        return ((out_features,), (out_features, 1)), f"one scale per output row ({out_features})"
    groups = in_features // scheme.group_size
    return ((out_features, groups), (groups, out_features)), f"{out_features}x{groups} group scales"
