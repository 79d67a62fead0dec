"""Which engine can serve which scheme, and why: checked before any heavy work.

The vLLM CPU column is what runs on this machine kind (the slow tests prove the
supported entries); the GPU columns follow vLLM 0.32's Quark loader
(`vllm/model_executor/layers/quantization/quark/quark.py`, `_get_scheme_cls_from_config`)
and are marked "per vLLM docs" until verified on such a machine. Data only: no
torch, no vLLM import.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from pipeline.schemes import SCHEMES

VLLM_ENGINES = ("vllm-cuda", "vllm-rocm", "vllm-cpu")
TRANSFORMERS = "transformers"
ENGINES = (*VLLM_ENGINES, TRANSFORMERS)
MEASURED = "measured here"
PER_VLLM_DOCS = "per vLLM docs"
PER_QUARK_DOCS = "per Quark docs"
# transformers loads any Quark export through Quark's emulation (QParamsLinear): right
# numbers, slow kernels -- an evaluation engine, not a serving one.
EMULATION = "Quark emulation in transformers (QParamsLinear): correct, slow; for evaluation"
MEASURED_IN_TRANSFORMERS = ("fp8", "ptpc_fp8")


@dataclass(frozen=True)
class Support:
    supported: bool
    reason: str
    source: str  # MEASURED or PER_VLLM_DOCS


def _int4_wo(group: int) -> dict[str, Support]:
    return {
        "vllm-cuda": Support(True, "QuarkW4A16Int4 (packed int4, bf16/fp16 compute), sm70+", PER_VLLM_DOCS),
        "vllm-rocm": Support(True, "QuarkW4A16Int4", PER_VLLM_DOCS),
        "vllm-cpu": Support(
            True, f"QuarkW4A16Int4; group size {group} must divide the model's hidden sizes", MEASURED if group == 64 else PER_VLLM_DOCS
        ),
    }


SUPPORT: dict[str, dict[str, Support]] = {
    "int8_per_channel": {
        "vllm-cuda": Support(True, "QuarkW8A8Int8 (per-channel W, per-token dynamic A), sm75+", PER_VLLM_DOCS),
        "vllm-rocm": Support(True, "QuarkW8A8Int8", PER_VLLM_DOCS),
        "vllm-cpu": Support(True, "QuarkW8A8Int8 with real int8 CPU kernels", MEASURED),
    },
    "int8_per_tensor": {
        "vllm-cuda": Support(True, "QuarkW8A8Int8 (static per-tensor W and A), sm75+", PER_VLLM_DOCS),
        "vllm-rocm": Support(True, "QuarkW8A8Int8", PER_VLLM_DOCS),
        "vllm-cpu": Support(True, "QuarkW8A8Int8; output quality degrades on small models (the gate must catch it)", MEASURED),
    },
    "fp8": {
        "vllm-cuda": Support(True, "QuarkW8A8Fp8 (static per-tensor), sm89+ (Ada, Hopper)", PER_VLLM_DOCS),
        "vllm-rocm": Support(True, "QuarkW8A8Fp8 (fp8 fnuz on MI300)", PER_VLLM_DOCS),
        "vllm-cpu": Support(False, "no CPU kernel for static per-tensor FP8 activations (_C::static_scaled_fp8_quant)", MEASURED),
    },
    "ptpc_fp8": {
        "vllm-cuda": Support(True, "QuarkW8A8Fp8 (per-channel W, per-token dynamic A), sm89+", PER_VLLM_DOCS),
        "vllm-rocm": Support(True, "QuarkW8A8Fp8 (PTPC is the ROCm-recommended FP8 layout)", PER_VLLM_DOCS),
        "vllm-cpu": Support(True, "QuarkW8A8Fp8 emulated in bf16 on CPU: runs, slowly", MEASURED),
    },
    **{f"int4_wo_{group}": _int4_wo(group) for group in (32, 64, 128)},
    "int4_fp8": {
        engine: Support(
            False,
            "vLLM 0.32 serves Quark's W4A8 int4/fp8 layout only in MoE layers (QuarkW4A8Fp8MoEMethod); "
            "its dense Quark loader accepts multi-entry weight configs only for NVFP4",
            MEASURED if engine == "vllm-cpu" else PER_VLLM_DOCS,
        )
        for engine in VLLM_ENGINES
    },
}
# Schemes whose support differs for MoE expert layers: (engine -> Support) for those layers.
MOE_EXPERT_SUPPORT: dict[str, dict[str, Support]] = {
    "int4_fp8": {
        "vllm-cuda": Support(True, "QuarkW4A8Fp8MoEMethod on the experts", PER_VLLM_DOCS),
        "vllm-rocm": Support(True, "QuarkW4A8Fp8MoEMethod on the experts", PER_VLLM_DOCS),
        "vllm-cpu": Support(False, "no CPU kernel for QuarkW4A8Fp8MoEMethod", PER_VLLM_DOCS),
        TRANSFORMERS: Support(True, EMULATION, PER_QUARK_DOCS),
    },
}

for _scheme, _engines in SUPPORT.items():
    _engines[TRANSFORMERS] = Support(True, EMULATION, MEASURED if _scheme in MEASURED_IN_TRANSFORMERS else PER_QUARK_DOCS)

assert set(SUPPORT) <= set(SCHEMES), "compatibility table names an unknown scheme"


def support(scheme: str, engine: str, *, moe_experts_only: bool = False) -> Support:
    """Can `engine` serve `scheme`? Unknown pairs are refused, never guessed.

    moe_experts_only: the scheme is applied to MoE expert layers only (everything
    else excluded or overridden), where some layouts have their own kernels.
    """
    table = MOE_EXPERT_SUPPORT if moe_experts_only and scheme in MOE_EXPERT_SUPPORT else SUPPORT
    entry = table.get(scheme, {}).get(engine)
    return entry or Support(False, f"{scheme} on {engine} is not in the compatibility table", PER_VLLM_DOCS)


def installed_vllm_engine() -> str | None:
    """The vLLM build installed here, from package metadata (importing vLLM takes seconds)."""
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        try:
            importlib.metadata.version("vllm-cpu")
        except importlib.metadata.PackageNotFoundError:
            return None
        return "vllm-cpu"
    if "rocm" in version:
        return "vllm-rocm"
    if "cpu" in version:
        return "vllm-cpu"
    return "vllm-cuda"
