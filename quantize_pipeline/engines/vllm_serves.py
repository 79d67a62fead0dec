"""What the vLLM engine serves, per build (CUDA, ROCm, CPU): `VllmEngine.serves`.

The CPU column is what runs on this machine kind (the slow tests prove the supported entries); the GPU
columns follow vLLM 0.32's Quark loader (`vllm/model_executor/layers/quantization/quark/quark.py`,
`_get_scheme_cls_from_config`) and are marked "per vLLM docs" until verified on such a machine. Data only:
no torch, no vLLM import.
"""

from __future__ import annotations

from quantize_pipeline.engines.names import Build
from quantize_pipeline.engines.support import MEASURED, PER_VLLM_DOCS, PER_VLLM_SOURCE, Support
from quantize_pipeline.recipe import schemes
from quantize_pipeline.recipe.compute_dtype import cpu_flags
from quantize_pipeline.recipe.schemes import SCHEMES, SchemeSpec

VLLM_BUILDS = (Build.VLLM_CUDA, Build.VLLM_ROCM, Build.VLLM_CPU)


def _int4_wo(group: int) -> dict[str, Support]:
    return {
        "vllm-cuda": Support(True, "QuarkW4A16Int4 (packed int4, bf16/fp16 compute), sm70+", PER_VLLM_DOCS),
        "vllm-rocm": Support(True, "QuarkW4A16Int4", PER_VLLM_DOCS),
        "vllm-cpu": Support(
            True, f"QuarkW4A16Int4; group size {group} must divide the model's hidden sizes", MEASURED if group == 64 else PER_VLLM_DOCS
        ),
    }


# The block formats (OCP MX, NVFP4), per vLLM 0.32's Quark loader (quark.py: _is_nvfp4, _is_w4a8_mxfp4_fp8,
# _is_w_ocp_mx_a_x) and its kernel registry (kernels/linear/__init__.py: _POSSIBLE_MXFP4/MXFP6/NVFP4_KERNELS,
# which list CUDA, ROCm and XPU kernels and none for the CPU).
_NO_CPU_BLOCK_KERNEL = "vLLM's CPU build has no {kind} linear kernel (\"Failed to find a kernel that can implement the {kind} linear layer\")"
BLOCK_FORMAT_SUPPORT: dict[str, tuple[str, str, str, bool]] = {
    # scheme: (vllm-cuda, vllm-rocm, vllm-cpu refusal, the CPU refusal measured here)
    "mxfp4": ("QuarkOCP_MX: FlashInfer/Marlin MXFP4 kernels where the GPU has them (Blackwell), vLLM's emulation "
              "otherwise", "QuarkOCP_MX: AITER MXFP4 GEMM on MI350/MI355 (gfx950), emulation on MI300",
              _NO_CPU_BLOCK_KERNEL.format(kind="MXFP4"), True),
    "mxfp4_weight_only": ("QuarkOCP_MX (weight-only MXFP4)", "QuarkOCP_MX: AITER MXFP4 on MI350/MI355, emulation on MI300",
                          _NO_CPU_BLOCK_KERNEL.format(kind="MXFP4"), True),
    "mxfp6_e3m2": ("QuarkOCP_MX: Humming MXFP6 kernel or emulation", "QuarkOCP_MX: MXFP6 emulation",
                   _NO_CPU_BLOCK_KERNEL.format(kind="MXFP6"), True),
    "mxfp6_e2m3": ("QuarkOCP_MX: Humming MXFP6 kernel or emulation", "QuarkOCP_MX: MXFP6 emulation",
                   _NO_CPU_BLOCK_KERNEL.format(kind="MXFP6"), False),
    "mxfp4_mxfp6_e2m3": ("QuarkOCP_MX: MXFP4 weights, MXFP6 activations", "QuarkOCP_MX: MXFP4 weights, MXFP6 "
                         "activations (AITER on MI350/MI355)", _NO_CPU_BLOCK_KERNEL.format(kind="MXFP4"), False),
    "mxfp4_fp8": ("QuarkW4A8_MXFP4_FP8 in emulation", "QuarkW4A8_MXFP4_FP8: AITER gemm_a8wfp4 on MI350/MI355, "
                  "emulation elsewhere", "QuarkW4A8_MXFP4_FP8 loads, then generation raises "
                  "\"dq_uint8_mxfp4_to_half is only implemented in CUDA devices\"", True),
    "nvfp4": ("QuarkNVFP4: CUTLASS/FlashInfer NVFP4 GEMM on Blackwell (sm100+), Marlin W4A16 on older GPUs, "
              "emulation otherwise", "QuarkNVFP4: emulation", _NO_CPU_BLOCK_KERNEL.format(kind="NVFP4"), True),
}


def _block_format(name: str) -> dict[str, Support]:
    cuda, rocm, cpu_refusal, cpu_measured = BLOCK_FORMAT_SUPPORT[name]
    return {
        "vllm-cuda": Support(True, cuda, PER_VLLM_SOURCE),
        "vllm-rocm": Support(True, rocm, PER_VLLM_SOURCE),
        "vllm-cpu": Support(False, cpu_refusal + "; engine: auto evaluates it in transformers",
                            MEASURED if cpu_measured else PER_VLLM_SOURCE),
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
        "vllm-cpu": Support(True, "QuarkW8A8Int8; output quality degrades on small models (the gate must catch it). "
                                  "On AMX CPUs vLLM 0.32 runs it with per-token dynamic activations (its AMX int8 "
                                  "kernel ignores the static input_scale): milder there than the scheme itself",
                            MEASURED),
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
            MEASURED if engine == Build.VLLM_CPU else PER_VLLM_DOCS,
        )
        for engine in VLLM_BUILDS
    },
    **{name: _block_format(name) for name in BLOCK_FORMAT_SUPPORT},
}
# Schemes whose support differs for MoE expert layers: (engine -> Support) for those layers.
MOE_EXPERT_SUPPORT: dict[str, dict[str, Support]] = {
    "int4_fp8": {
        # vLLM 0.32 quark_moe.py: QuarkW4A8Fp8MoEMethod asserts rocm_aiter_ops.is_fused_moe_enabled() (AITER, ROCm).
        "vllm-cuda": Support(False, "QuarkW4A8Fp8MoEMethod needs ROCm's AITER fused MoE (asserted in vLLM 0.32's "
                             "quark_moe.py); no CUDA kernel", PER_VLLM_SOURCE),
        "vllm-rocm": Support(True, "QuarkW4A8Fp8MoEMethod on the experts (AITER fused MoE)", PER_VLLM_SOURCE),
        "vllm-cpu": Support(False, "no CPU kernel for QuarkW4A8Fp8MoEMethod (ROCm AITER only)", PER_VLLM_SOURCE),
    },
    # Measured on the synthetic Mixtral (AVX2-only EPYC, 2026-12-06): vLLM's CPU build served int8 attention with
    # BF16 experts, and refused INT8 experts ("No Int8 MoE backend supports the deployment configuration");
    # its CPU INT8 experts kernel (CPUExpertsInt8) needs AMX per vLLM 0.32's source.
    "int8_per_channel": {
        "vllm-cuda": Support(True, "QuarkW8A8Int8MoEMethod (Triton fused MoE)", PER_VLLM_SOURCE),
        "vllm-rocm": Support(True, "QuarkW8A8Int8MoEMethod (Triton fused MoE)", PER_VLLM_SOURCE),
        "vllm-cpu": Support(False, "no Int8 MoE backend without AMX (measured here: NotImplementedError at load; "
                            "CPUExpertsInt8 needs AMX)", MEASURED),
    },
}

assert set(SUPPORT) <= set(SCHEMES), "compatibility table names an unknown scheme"

# KV cache: Quark's kv_cache_group (fp8 per-tensor scales on k_proj/v_proj outputs) read by
# vLLM as kv_cache_dtype fp8.
KV_CACHE_SUPPORT: dict[str, dict[str, Support]] = {
    "fp8": {
        "vllm-cuda": Support(True, "fp8 KV cache with the export's k/v scales", PER_VLLM_DOCS),
        "vllm-rocm": Support(True, "fp8 KV cache with the export's k/v scales", PER_VLLM_DOCS),
        "vllm-cpu": Support(
            True, "kv_cache_dtype fp8 on the CPU build: loads the export's k/v output scales and generates "
            "(q/prob scales default to 1.0; vLLM warns)", MEASURED,
        ),
    },
}


# vLLM 0.32's CPU attention (v1/attention/backends/cpu_attn.py) raises "FP8 KV cache on CPU requires
# x86 with AVX-512 or AMX." at load on an AVX2-only CPU: refused there, before anything runs.
NO_CPU_FP8_KV_CACHE = Support(
    False, "vLLM 0.32's CPU attention has no FP8 KV cache without AVX-512 or AMX (this CPU: AVX2 only; "
    "\"FP8 KV cache on CPU requires x86 with AVX-512 or AMX\" in vLLM's cpu_attn); use engine: auto "
    "(transformers evaluates it)", PER_VLLM_SOURCE,
)


# Measured on an AMX CPU without AMX-FP8 (Sapphire Rapids class): vLLM 0.32 serves FP8 W8A8 with
# per-token activations through ChannelWiseTorchFP8ScaledMMLinearKernel (torch._scaled_mm), at about
# one generated token a minute on SmolLM2-135M; its own AMX-FP8 kernel needs Diamond Rapids.
SLOW_CPU_FP8 = Support(
    False, "on this AMX CPU without AMX-FP8, vLLM 0.32 runs FP8 W8A8 through torch._scaled_mm at ~1 token/minute "
    "(measured); use engine: auto (transformers evaluates it)", MEASURED,
)


# On CPUs without AVX-512 (AVX2 only) the pipeline computes in float32 and vLLM's FP8 W8A8 CPU path was
# not measured: refused for vLLM (never guessed), evaluated by transformers.
UNMEASURED_CPU_FP8 = Support(
    False, "FP8 W8A8 in vLLM 0.32's CPU build was not measured on a CPU without AVX-512 (this one: AVX2, float32 "
    "compute); on an AMX CPU without AMX-FP8 it ran at ~1 token/minute; use engine: auto (transformers evaluates it)",
    MEASURED,
)


def cpu_fp8_refusal() -> Support | None:
    """Why vLLM's CPU build should not serve FP8 activations on this CPU (None: it may)."""
    flags = cpu_flags()
    if "amx_fp8" in flags:
        return None
    if "amx_tile" in flags:
        return SLOW_CPU_FP8
    return None if "avx512f" in flags else UNMEASURED_CPU_FP8


# Measured on an AVX2-only EPYC (2026-12-02): serving a QuarkW4A16Int4 export failed at load with
# "'_C' object has no attribute 'cpu_gemm_wna16'": vllm-cpu 0.32 builds its int4 weight-only GEMM only
# for AVX-512 CPUs. Passed on AVX-512/AMX machines (tests/test_schemes_end_to_end.py).
NO_CPU_WNA16 = Support(
    False, "vLLM 0.32's CPU build has no int4 weight-only kernel on this CPU (AVX2 only: _C.cpu_gemm_wna16 "
    "is missing, measured); use engine: auto (transformers evaluates it)", MEASURED,
)


def cpu_wna16_refusal(spec: SchemeSpec) -> Support | None:
    """Why vLLM's CPU build cannot serve int4/uint4 weight-only layers here (None: it can)."""
    if spec.activation_dtype is None and spec.weight_dtype in ("int4", "uint4") and "avx512f" not in cpu_flags():
        return NO_CPU_WNA16
    return None


def fp8_too_slow_on_this_cpu() -> bool:
    return cpu_fp8_refusal() is not None


def vllm_cpu_refusal(spec: SchemeSpec) -> Support | None:
    """Why vLLM's CPU build on this CPU should not serve a layout its loader takes (None: it may)."""
    return cpu_wna16_refusal(spec) or (cpu_fp8_refusal() if spec.activation_dtype == "fp8_e4m3" else None)


# Explicit forms measured on this machine kind's vLLM CPU build.
MEASURED_EXPLICIT_ON_CPU: dict[str, str] = {
    # tests/test_schemes_end_to_end.py
    "w-uint4-per_group64-asym": "QuarkW4A16Int4 with zero points (asymmetric W4A16)",
    # one-off run of recipes/smollm2-135m-int8-asym-act.yaml (not in CI: it shares every kernel but
    # the activation zero point with int8_per_channel, which CI runs)
    "w-int8-per_channel-sym+a-int8-per_token-dynamic-asym":
        "QuarkW8A8Int8 with asymmetric per-token activations (int8 kernels with a zero point)",
}


def vllm_quark_class(spec: SchemeSpec) -> tuple[str | None, str]:
    """(vLLM Quark scheme class, why) for a layout, following vLLM 0.32's `_get_scheme_cls_from_config`
    rules for dense layers; class None: the loader has no scheme for it (NotImplementedError at load)."""
    w, a = spec.weight_dtype, spec.activation_dtype
    if spec.weight_granularity == "per_block":
        return _block_quark_class(spec)
    if spec.progressive:
        return None, "multi-entry (progressive) weight configs are served only for NVFP4"
    if a is None:
        if w in ("int4", "uint4") and spec.weight_granularity == "per_group":
            return "QuarkW4A16Int4", "packed int4/uint4 weights with group scales (zero points when asymmetric)"
        if w in ("int4", "uint4"):
            return None, "QuarkW4A16Int4 needs weight.group_size: int4/uint4 weight-only must be per_group"
        return None, f"no weight-only scheme for {w} weights (vLLM's Quark loader serves int4/uint4 weight-only only)"
    if w == "int8" and a == "int8":
        if spec.weight_granularity == "per_group":
            return None, "QuarkW8A8Int8 takes per_tensor or per_channel weights, not per_group"
        if not spec.weight_symmetric:
            return None, "QuarkW8A8Int8 takes symmetric weights only"
        if spec.activation_granularity == "per_tensor" and not spec.activation_static:
            return None, "QuarkW8A8Int8 takes static per-tensor or dynamic per-token activations, not dynamic per-tensor"
        return "QuarkW8A8Int8", "int8 W8A8 (symmetric and asymmetric activations)"
    if w == "fp8_e4m3" and a == "fp8_e4m3":
        return "QuarkW8A8Fp8", "FP8 W8A8 (per-tensor or per-channel weights)"
    return None, f"no scheme for {w} weights with {a} activations (vLLM's Quark loader pairs int8/int8 and fp8/fp8)"


def _block_quark_class(spec: SchemeSpec) -> tuple[str | None, str]:
    """vLLM 0.32's Quark loader on block formats: NVFP4 needs NVFP4 activations (_is_nvfp4); OCP MX weights
    take no activation quantization, MX/FP8 dynamic activations, or (MXFP4 only) static per-tensor FP8."""
    a = spec.activation_dtype
    if spec.global_scale:
        if a == "fp4_e2m1" and spec.activation_granularity == "per_block":
            return "QuarkNVFP4", "NVFP4 weights and activations"
        return None, "NVFP4 weights are served only with NVFP4 activations (_is_nvfp4)"
    if a is None or (a in schemes.BLOCK_DTYPES and spec.activation_granularity == "per_block"):
        return "QuarkOCP_MX", "OCP MX weights with MX or no activation quantization"
    if a == "fp8_e4m3" and spec.activation_static:
        if spec.weight_dtype == "fp4_e2m1" and spec.activation_granularity == "per_tensor":
            return "QuarkW4A8_MXFP4_FP8", "MXFP4 weights with static per-tensor FP8 activations"
        return None, "static FP8 activations over OCP MX weights: MXFP4 weights, per-tensor scales only"
    if a == "fp8_e4m3" and spec.activation_granularity == "per_tensor":
        return "QuarkOCP_MX", "OCP MX weights with dynamic per-tensor FP8 activations"
    return None, f"OCP MX weights take MX, dynamic FP8 or no activation quantization, not {a} {spec.activation_granularity}"


def explicit_support(spec: SchemeSpec, engine: Build) -> Support:
    """Support for an explicit form on a vLLM build, from vLLM's Quark loader rules (and, on CPU, what was
    measured)."""
    quark_class, why = vllm_quark_class(spec)
    if quark_class is None:
        return Support(False, f"vLLM's Quark loader: {why}", PER_VLLM_DOCS)
    if engine != Build.VLLM_CPU:
        return Support(True, f"{quark_class}: {why}", PER_VLLM_SOURCE if spec.weight_granularity == "per_block" else PER_VLLM_DOCS)
    if spec.weight_granularity == "per_block":
        return Support(False, f"{quark_class}: vLLM's CPU build has no MX/NVFP4 linear kernel (measured with the named "
                       "block schemes); engine: auto evaluates it in transformers", PER_VLLM_SOURCE)
    if refusal := vllm_cpu_refusal(spec):
        return refusal
    if spec.name in MEASURED_EXPLICIT_ON_CPU:
        return Support(True, MEASURED_EXPLICIT_ON_CPU[spec.name], MEASURED)
    if spec.activation_dtype == "fp8_e4m3" and spec.activation_granularity != "per_token":
        return Support(False, "no CPU kernel for per-tensor FP8 activations (_C::static_scaled_fp8_quant, "
                       "measured with fp8; dynamic per-tensor not measured)", MEASURED)
    if spec.weight_granularity == "per_group" and spec.group_size not in (32, 64, 128):
        return Support(False, f"{quark_class}: group size {spec.group_size} not measured on the CPU build "
                       "(measured: 64; 32 and 128 per vLLM docs)", PER_VLLM_DOCS)
    return Support(True, f"{quark_class} (the loader accepts this layout; its CPU kernel not measured here)", PER_VLLM_DOCS)


# Checkpoints in other formats (`check` on them; quantize_pipeline.formats reads their configs): vLLM serves
# them through its own loader for that format, so support is per (format, scheme).
# The vllm-cpu entries were measured here (tests/test_formats_real.py builds them with compressed-tensors).
FORMAT_SUPPORT: dict[tuple[str, str], dict[str, Support]] = {
    ("compressed-tensors", "int8_per_channel"): {
        "vllm-cuda": Support(True, "CompressedTensorsW8A8Int8, sm75+", PER_VLLM_DOCS),
        "vllm-rocm": Support(True, "CompressedTensorsW8A8Int8", PER_VLLM_DOCS),
        "vllm-cpu": Support(True, "CompressedTensorsW8A8Int8 on CPUInt8ScaledMMLinearKernel (llm-compressor's W8A8)", MEASURED),
    },
    ("compressed-tensors", "int4_wo_64"): {
        "vllm-cuda": Support(True, "CompressedTensorsWNA16 (Marlin), sm80+", PER_VLLM_DOCS),
        "vllm-rocm": Support(True, "CompressedTensorsWNA16", PER_VLLM_DOCS),
        "vllm-cpu": Support(True, "CompressedTensorsWNA16 on CPUWNA16LinearKernel (pack-quantized W4A16, groups of 64)", MEASURED),
    },
}


class VllmServes:
    """vLLM's declaration: the tables above, and on the CPU build what this CPU's kernels allow."""

    builds = VLLM_BUILDS
    expert_schemes = tuple(MOE_EXPERT_SUPPORT)
    listed_explicit = tuple(MEASURED_EXPLICIT_ON_CPU)
    kv_caches = tuple(KV_CACHE_SUPPORT)
    checkpoint_formats = tuple(FORMAT_SUPPORT)

    def named(self, scheme: str, build: Build, on_experts: bool) -> Support | None:
        table = MOE_EXPERT_SUPPORT if on_experts and scheme in MOE_EXPERT_SUPPORT else SUPPORT
        entry = table.get(scheme, {}).get(build)
        if entry is not None and entry.supported and build == Build.VLLM_CPU and (refusal := vllm_cpu_refusal(SCHEMES[scheme])):
            return refusal
        return entry

    def explicit(self, spec: SchemeSpec, build: Build) -> Support:
        return explicit_support(spec, build)

    def kv_cache(self, kv_cache: str, build: Build) -> Support | None:
        entry = KV_CACHE_SUPPORT.get(kv_cache, {}).get(build)
        if entry is not None and entry.supported and build == Build.VLLM_CPU and kv_cache == "fp8" \
                and not {"avx512f", "amx_tile"} & cpu_flags():
            return NO_CPU_FP8_KV_CACHE
        return entry

    def checkpoint_format(self, quant_method: str, scheme: str, build: Build) -> Support | None:
        return FORMAT_SUPPORT.get((quant_method, scheme), {}).get(build)


VLLM_SERVES = VllmServes()
