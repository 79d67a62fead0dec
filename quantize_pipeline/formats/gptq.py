"""GPTQ checkpoints (`quant_method: gptq`: AutoGPTQ / GPTQModel, vLLM's `gptq` and `gptq_marlin` loaders).

Stored per layer, input dim first: `qweight` I32 [in * bits / 32, out], `qzeros` I32
[groups, out * bits / 32] (always, symmetric too), `scales` [groups, out], `g_idx` [in]
(the group of each input channel; it matters with `desc_act`). `group_size: -1` is one
group per output channel. Only decoder-block linear layers are quantized (lm_head stays dense).
"""

from __future__ import annotations

from dataclasses import replace

from quantize_pipeline.formats.base import Claim, FormatError, LayerTensors, cdiv, claim_problems, weight_only
from quantize_pipeline.recipe.schemes import WEIGHT_BITS, SchemeSpec, explicit_scheme

BITS = (4, 8)


def packed_int_scheme(bits, group_size, symmetric: bool, where: str) -> SchemeSpec:
    """GPTQ/AWQ weights: packed integers with a zero point, per group (or per channel with -1)."""
    if bits not in BITS:
        raise FormatError(f"{where}bits", f"{bits!r} (read: {', '.join(map(str, BITS))})")
    if not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        raise FormatError(f"{where}group_size", f"{group_size!r} is not a group size")
    per_group = group_size != -1
    return explicit_scheme(
        weight_dtype=f"int{bits}" if symmetric else f"uint{bits}",
        weight_granularity="per_group" if per_group else "per_channel",
        group_size=group_size if per_group else None, weight_symmetric=symmetric,
    )


def input_major_tensors(scheme: SchemeSpec, out_features: int, in_features: int, *, pack_input: bool) -> LayerTensors:
    """GPTQ packs along the input dim of qweight, AWQ along the output dim; both pack qzeros along output."""
    pack = 32 // WEIGHT_BITS[scheme.weight_dtype]
    groups = in_features // scheme.group_size if scheme.group_size else 1
    weight_shape = (cdiv(in_features, pack), out_features) if pack_input else (in_features, cdiv(out_features, pack))
    return LayerTensors(
        weight="qweight", weight_dtype="I32", weight_shape=weight_shape,
        scale="scales", scale_shapes=((groups, out_features),), scale_wanted=f"{groups}x{out_features} group scales",
        zero_point="qzeros", zero_point_shape=(groups, cdiv(out_features, pack)),
    )


class GPTQAdapter:
    quant_method = "gptq"
    checks = ("`bits`, `group_size`, `sym` read into the scheme; `qweight` I32 [in·bits/32, out], `qzeros` "
              "[groups, out·bits/32], `scales` [groups, out]; `g_idx` present with `desc_act`; lm_head dense")

    def claim(self, quantization_config: dict) -> Claim:
        if quantization_config.get("dynamic"):
            raise FormatError("dynamic", "per-module overrides are not read yet")
        spec = packed_int_scheme(quantization_config.get("bits"), quantization_config.get("group_size"),
                                 quantization_config.get("sym", True) is not False, "")
        return Claim(spec, None, () if quantization_config.get("lm_head") else ("lm_head",))

    def config_problems(self, scheme: SchemeSpec, quantization_config: dict) -> list[str]:
        return claim_problems(self, scheme, quantization_config)

    def layer_tensors(self, scheme: SchemeSpec, quantization_config: dict, out_features: int, in_features: int) -> LayerTensors:
        weight_only(scheme, "GPTQ")
        tensors = input_major_tensors(scheme, out_features, in_features, pack_input=True)
        if quantization_config.get("desc_act"):
            return replace(tensors, required=("g_idx",))
        return tensors

    def kv_cache_problems(self, kv_cache, quantization_config, exported, linear_layers) -> list[str]:
        return [f"GPTQ checkpoints carry no KV-cache scales, but kv_cache is {kv_cache!r}"] if kv_cache else []


ADAPTER = GPTQAdapter()
