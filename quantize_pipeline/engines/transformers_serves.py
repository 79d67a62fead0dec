"""What the transformers engine serves: `TransformersEngine.serves`.

transformers loads any Quark export through Quark's emulation (QParamsLinear): right numbers, slow kernels --
an evaluation engine, not a serving one. Data only: no torch import.
"""

from __future__ import annotations

from quantize_pipeline.engines.names import Build
from quantize_pipeline.engines.support import MEASURED, PER_CT_DOCS, PER_QUARK_DOCS, Support
from quantize_pipeline.recipe.schemes import SCHEMES, SchemeSpec

EMULATION = "Quark emulation in transformers (QParamsLinear): correct, slow; for evaluation"
MEASURED_IN_TRANSFORMERS = ("fp8", "ptpc_fp8", "mxfp4", "nvfp4")  # the slow tests run them
KV_CACHE_SUPPORT = {
    "fp8": Support(True, "Quark emulation quantizes k/v outputs to fp8 (the KV cache itself stays in the model dtype)",
                   PER_QUARK_DOCS),
}
# Other tools' checkpoints: transformers loads them through that format's own integration.
FORMAT_SUPPORT = {
    ("compressed-tensors", "int8_per_channel"): Support(True, "compressed-tensors decompresses to the model dtype on "
                                                        "load", PER_CT_DOCS),
    ("compressed-tensors", "int4_wo_64"): Support(True, "compressed-tensors decompresses to the model dtype on load",
                                                  PER_CT_DOCS),
}


class TransformersServes:
    """Every named scheme and explicit layout, dense or on MoE experts alike (emulation has no per-layer kernels)."""

    builds = (Build.TRANSFORMERS,)
    expert_schemes: tuple[str, ...] = ()
    listed_explicit: tuple[str, ...] = ()
    kv_caches = tuple(KV_CACHE_SUPPORT)
    checkpoint_formats = tuple(FORMAT_SUPPORT)

    def named(self, scheme: str, build: Build, on_experts: bool) -> Support | None:
        if scheme not in SCHEMES:
            return None
        return Support(True, EMULATION, MEASURED if scheme in MEASURED_IN_TRANSFORMERS else PER_QUARK_DOCS)

    def explicit(self, spec: SchemeSpec, build: Build) -> Support:
        return Support(True, EMULATION, PER_QUARK_DOCS)

    def kv_cache(self, kv_cache: str, build: Build) -> Support | None:
        return KV_CACHE_SUPPORT.get(kv_cache)

    def checkpoint_format(self, quant_method: str, scheme: str, build: Build) -> Support | None:
        return FORMAT_SUPPORT.get((quant_method, scheme))


TRANSFORMERS_SERVES = TransformersServes()
