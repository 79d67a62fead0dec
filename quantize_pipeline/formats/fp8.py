"""FP8 checkpoints outside compressed-tensors: `quant_method: fp8` (vLLM's Fp8Config, transformers'
FP8 configs) and `fbgemm_fp8` (transformers' FbgemmFp8Config).

- `fp8` without `weight_block_size`: `weight` F8_E4M3, one `weight_scale` per tensor, and an
  `input_scale` when `activation_scheme: static` (dynamic: computed per call, per tensor).
- `fp8` with `weight_block_size` (DeepSeek-style fine-grained, `weight_scale_inv` per block):
  block-wise weight scales are not a granularity the recipe language has yet, so it is refused
  in one line naming the field.
- `fbgemm_fp8`: `weight` F8_E4M3 with a `weight_scale` per output row, activations FP8 per token,
  dynamic: the recipe's `ptpc_fp8`.
"""

from __future__ import annotations

from quantize_pipeline.formats.base import Claim, FormatError, LayerTensors, claim_problems, standard_scale_shapes
from quantize_pipeline.recipe.schemes import SchemeSpec, explicit_scheme


def _dense_layers(quantization_config: dict) -> tuple[str, ...]:
    names = quantization_config.get("ignored_layers") or quantization_config.get("modules_to_not_convert") or ()
    return tuple(names) if "lm_head" in names else ("lm_head", *names)


class _FP8Adapter:
    def config_problems(self, scheme: SchemeSpec, quantization_config: dict) -> list[str]:
        return claim_problems(self, scheme, quantization_config)

    def layer_tensors(self, scheme: SchemeSpec, quantization_config: dict, out_features: int, in_features: int) -> LayerTensors:
        shapes, wanted = standard_scale_shapes(scheme, out_features, in_features)
        return LayerTensors(
            weight="weight", weight_dtype="F8_E4M3", weight_shape=(out_features, in_features),
            scale="weight_scale", scale_shapes=shapes, scale_wanted=wanted,
        )

    def kv_cache_problems(self, kv_cache, quantization_config, exported, linear_layers) -> list[str]:
        stored = [name for name in exported if name.endswith((".k_scale", ".v_scale"))]
        if kv_cache is None or stored:
            return []
        return [f"kv_cache {kv_cache!r}, but the checkpoint has no k_scale/v_scale tensors"]


class FP8Adapter(_FP8Adapter):
    quant_method = "fp8"
    checks = ("`activation_scheme` read into the scheme (block-wise `weight_block_size` refused); `weight` F8_E4M3, "
              "one `weight_scale`, `input_scale` only when static; `ignored_layers`/`modules_to_not_convert` dense")

    def claim(self, quantization_config: dict) -> Claim:
        if quantization_config.get("weight_block_size"):
            raise FormatError("weight_block_size", f"{quantization_config['weight_block_size']}: block-wise FP8 weight "
                              "scales are not a granularity the recipe language has yet")
        activation = quantization_config.get("activation_scheme", "dynamic")
        if activation not in ("dynamic", "static"):
            raise FormatError("activation_scheme", f"{activation!r} (known: dynamic, static)")
        spec = explicit_scheme(
            weight_dtype="fp8_e4m3", weight_granularity="per_tensor", activation_dtype="fp8_e4m3",
            activation_granularity="per_tensor", activation_static=activation == "static",
        )
        kv_cache = "fp8" if str(quantization_config.get("kv_cache_scheme", "")).startswith("fp8") else None
        return Claim(spec, kv_cache, _dense_layers(quantization_config))


class FbgemmFP8Adapter(_FP8Adapter):
    quant_method = "fbgemm_fp8"
    checks = ("read as `ptpc_fp8`; `weight` F8_E4M3 with one `weight_scale` per output row, no `input_scale`; "
              "`modules_to_not_convert` dense")

    def claim(self, quantization_config: dict) -> Claim:
        spec = explicit_scheme(
            weight_dtype="fp8_e4m3", weight_granularity="per_channel", activation_dtype="fp8_e4m3",
            activation_granularity="per_token", activation_static=False,
        )
        return Claim(spec, None, _dense_layers(quantization_config))


ADAPTERS = (FP8Adapter(), FbgemmFP8Adapter())
