"""AWQ checkpoints (`quant_method: awq`: AutoAWQ's GEMM layout, vLLM's `awq` / `awq_marlin` loaders).

Stored per layer: `qweight` I32 [in, out * bits / 32] (packed along the output dim, in
AWQ's interleaved order), `qzeros` I32 [groups, out * bits / 32], `scales` [groups, out].
`modules_to_not_convert` lists the layers left dense (lm_head always is).
"""

from __future__ import annotations

from quantize_pipeline.formats.base import Claim, FormatError, LayerTensors, claim_problems, weight_only
from quantize_pipeline.formats.gptq import input_major_tensors, packed_int_scheme
from quantize_pipeline.recipe.schemes import SchemeSpec


class AWQAdapter:
    quant_method = "awq"
    checks = ("`bits`, `group_size`, `zero_point` read into the scheme (GEMM `version` only); `qweight` I32 "
              "[in, out·bits/32], `qzeros` [groups, out·bits/32], `scales` [groups, out]; "
              "`modules_to_not_convert` and lm_head dense")

    def claim(self, quantization_config: dict) -> Claim:
        version = str(quantization_config.get("version", "gemm")).lower()
        if version != "gemm":
            raise FormatError("version", f"{version!r}: only AutoAWQ's GEMM layout is read")
        spec = packed_int_scheme(quantization_config.get("bits"), quantization_config.get("group_size"),
                                 quantization_config.get("zero_point", True) is False, "")
        dense = tuple(quantization_config.get("modules_to_not_convert") or ())
        return Claim(spec, None, ("lm_head", *dense))

    def config_problems(self, scheme: SchemeSpec, quantization_config: dict) -> list[str]:
        return claim_problems(self, scheme, quantization_config)

    def layer_tensors(self, scheme: SchemeSpec, quantization_config: dict, out_features: int, in_features: int) -> LayerTensors:
        weight_only(scheme, "AWQ")
        return input_major_tensors(scheme, out_features, in_features, pack_input=False)

    def kv_cache_problems(self, kv_cache, quantization_config, exported, linear_layers) -> list[str]:
        return [f"AWQ checkpoints carry no KV-cache scales, but kv_cache is {kv_cache!r}"] if kv_cache else []


ADAPTER = AWQAdapter()
