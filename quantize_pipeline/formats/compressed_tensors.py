"""compressed-tensors checkpoints (`quant_method: compressed-tensors`): llm-compressor's output,
most published FP8/W8A8/W4A16 models.

The config is parsed with compressed-tensors' own pydantic models (`QuantizationConfig`,
`QuantizationScheme`, `QuantizationArgs`); what each `format` stores follows its compressors:
- `int-quantized` / `float-quantized` / `naive-quantized`: `weight` as I8 (any int num_bits
  <= 8, one value per byte) or F8_E4M3, `weight_scale`, `weight_zero_point` when asymmetric;
- `pack-quantized`: `weight_packed` (32 // num_bits values per int32 along the input dim),
  `weight_shape`, `weight_scale`, `weight_zero_point` packed along the output dim when asymmetric;
- `input_scale` for static activations; `weight_g_idx` with group activation ordering;
- `kv_cache_scheme`: `k_scale` and `v_scale` on each attention module.
"""

from __future__ import annotations

from quantize_pipeline.formats.base import (
    Claim,
    FormatError,
    LayerTensors,
    cdiv,
    claim_problems,
    integer_range,
    standard_scale_shapes,
)
from quantize_pipeline.recipe.schemes import SchemeSpec, explicit_scheme

# Formats whose weight is stored one value per element, in the dtype of the quantization type.
UNPACKED_FORMATS = ("int-quantized", "float-quantized", "naive-quantized")
PACKED_FORMATS = ("pack-quantized",)
WEIGHT_STRATEGIES = {"tensor": "per_tensor", "channel": "per_channel", "group": "per_group"}
ACTIVATION_STRATEGIES = {"tensor": "per_tensor", "token": "per_token"}


def parse(quantization_config: dict):
    """compressed-tensors' own QuantizationConfig (FormatError naming the field when invalid)."""
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    try:
        return QuantizationConfig.model_validate(quantization_config)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise FormatError(".".join(str(part) for part in error["loc"]), error["msg"]) from None


def _dtype(args, where: str, allowed: tuple[str, ...]) -> str:
    kind = getattr(args.type, "value", args.type)
    dtype = f"int{args.num_bits}" if kind == "int" else "fp8_e4m3" if (kind, args.num_bits) == ("float", 8) else None
    if dtype not in allowed:
        raise FormatError(f"{where}.num_bits", f"{kind} with {args.num_bits} bits is not a dtype the recipe language has")
    return dtype


def _strategy(args, where: str, table: dict[str, str]) -> str:
    strategy = getattr(args.strategy, "value", args.strategy)
    if strategy not in table:
        raise FormatError(f"{where}.strategy", f"{strategy!r} is not read yet (known: {', '.join(table)})")
    return table[strategy]


def scheme_of(group, where: str) -> SchemeSpec:
    """The SchemeSpec a compressed-tensors QuantizationScheme spells out."""
    weights, activations = group.weights, group.input_activations
    if weights is None:
        raise FormatError(f"{where}.weights", "missing: activation-only schemes are not read")
    if weights.dynamic:
        raise FormatError(f"{where}.weights.dynamic", "dynamic weight scales are not a stored checkpoint")
    granularity = _strategy(weights, f"{where}.weights", WEIGHT_STRATEGIES)
    arguments = dict(
        weight_dtype=_dtype(weights, f"{where}.weights", ("int8", "int4", "fp8_e4m3")),
        weight_granularity=granularity,
        group_size=weights.group_size if granularity == "per_group" else None,
        weight_symmetric=bool(weights.symmetric),
    )
    if activations is not None:
        if activations.dynamic not in (True, False):  # "local" (NVFP4's global scale) is not a recipe concept
            raise FormatError(f"{where}.input_activations.dynamic", f"{activations.dynamic!r} is not read")
        arguments.update(
            activation_dtype=_dtype(activations, f"{where}.input_activations", ("int8", "fp8_e4m3")),
            activation_granularity=_strategy(activations, f"{where}.input_activations", ACTIVATION_STRATEGIES),
            activation_static=not activations.dynamic,
            activation_symmetric=bool(activations.symmetric),
        )
    return explicit_scheme(**arguments)


def _only_group(config):
    """The one scheme every config group agrees on (different schemes per layer are not read yet)."""
    groups = list(config.config_groups.items())
    if not groups:
        raise FormatError("config_groups", "empty: nothing is quantized")
    specs = {name: scheme_of(group, f"config_groups.{name}") for name, group in groups}
    layouts = {spec.layout() for spec in specs.values()}
    if len(layouts) > 1:
        raise FormatError("config_groups", f"{len(specs)} groups with different schemes ({', '.join(s.name for s in specs.values())}): "
                          "per-layer schemes are not read yet")
    for name, group in groups:
        if "Linear" not in group.targets:
            raise FormatError(f"config_groups.{name}.targets", f"{group.targets}: only groups targeting 'Linear' are read")
    return groups[0][1], next(iter(specs.values()))


def group_format(config, group) -> str:
    return str(getattr(group.format, "value", group.format) or config.format)


def kv_cache_of(config) -> str | None:
    scheme = config.kv_cache_scheme
    if scheme is None:
        return None
    if (getattr(scheme.type, "value", scheme.type), scheme.num_bits) != ("float", 8):
        raise FormatError("kv_cache_scheme", f"{scheme.type} with {scheme.num_bits} bits: only fp8 KV caches are read")
    return "fp8"


class CompressedTensorsAdapter:
    quant_method = "compressed-tensors"
    checks = ("config parsed by compressed-tensors' `QuantizationConfig`, read back into the scheme; per `format`: "
              "`weight` I8/F8_E4M3 (int-/float-/naive-quantized; sub-8-bit int values read and range-checked) or "
              "`weight_packed` I32 with its packed shape plus `weight_shape` (pack-quantized); `weight_scale` shape "
              "per strategy; `weight_zero_point` (packed) when asymmetric; `input_scale` only when static; "
              "`ignore`d layers left unquantized and every other linear layer quantized; "
              "`kv_cache_scheme` and each attention module's `k_scale`/`v_scale`")

    def claim(self, quantization_config: dict) -> Claim:
        config = parse(quantization_config)
        group, spec = _only_group(config)
        fmt = group_format(config, group)
        if fmt not in UNPACKED_FORMATS + PACKED_FORMATS:
            raise FormatError("format", f"{fmt!r} is not read yet (known: {', '.join(UNPACKED_FORMATS + PACKED_FORMATS)})")
        return Claim(spec, kv_cache_of(config), tuple(config.ignore or ()))

    def config_problems(self, scheme: SchemeSpec, quantization_config: dict) -> list[str]:
        return claim_problems(self, scheme, quantization_config)

    def layer_tensors(self, scheme: SchemeSpec, quantization_config: dict, out_features: int, in_features: int) -> LayerTensors:
        config = parse(quantization_config)
        group, _ = _only_group(config)
        weights = group.weights
        bits = weights.num_bits
        shapes, wanted = standard_scale_shapes(scheme, out_features, in_features)
        groups = in_features // scheme.group_size if scheme.group_size else 1
        required = ("weight_g_idx",) if getattr(weights.actorder, "value", weights.actorder) == "group" else ()
        if group_format(config, group) in PACKED_FORMATS:
            pack = 32 // bits
            return LayerTensors(
                weight="weight_packed", weight_dtype="I32", weight_shape=(out_features, cdiv(in_features, pack)),
                scale="weight_scale", scale_shapes=shapes, scale_wanted=wanted,
                zero_point=None if scheme.weight_symmetric else "weight_zero_point",
                zero_point_shape=None if scheme.weight_symmetric else (cdiv(out_features, pack), groups),
                required=("weight_shape", *required),
            )
        is_float = scheme.weight_dtype == "fp8_e4m3"
        return LayerTensors(
            weight="weight", weight_dtype="F8_E4M3" if is_float else "I8", weight_shape=(out_features, in_features),
            scale="weight_scale", scale_shapes=shapes, scale_wanted=wanted,
            zero_point=None if scheme.weight_symmetric else "weight_zero_point",
            zero_point_shape=None,
            required=required,
            value_range=None if is_float or bits >= 8 else integer_range(bits, signed=True),
        )

    def kv_cache_problems(self, kv_cache, quantization_config, exported, linear_layers) -> list[str]:
        try:
            claimed = kv_cache_of(parse(quantization_config))
        except FormatError as exc:
            return [str(exc)]
        if claimed != kv_cache:
            return [f"config's kv_cache_scheme says {claimed!r}, expected {kv_cache!r}"]
        if kv_cache is None:
            return []
        attention = sorted({layer.rsplit(".", 1)[0] for layer in linear_layers if layer.endswith("k_proj")})
        missing = [f"{module}.{name}" for module in attention for name in ("k_scale", "v_scale") if f"{module}.{name}" not in exported]
        return [f"{missing[0]}: missing for the fp8 KV cache (+{len(missing) - 1} more)"] if missing else []


ADAPTER = CompressedTensorsAdapter()
