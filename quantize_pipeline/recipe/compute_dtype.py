"""The dtype a model computes in when the recipe says `model.dtype: auto`.

bfloat16 where the hardware multiplies it natively: GPUs, and CPUs with AVX-512 BF16 or AMX
(x86) or BF16 (Arm). Elsewhere torch emulates bf16 matmuls: on an AVX2-only EPYC, 1024x1024
matmuls ran at 0.85 GFLOP/s in bf16 against 99 in fp32 (2 threads), and vLLM's CPU build
prefilled 6x slower, so float32 is the faster and the more exact choice there.
Read from /proc/cpuinfo and the GPU device nodes: recipe parsing never imports torch.
"""

from __future__ import annotations

import functools
from pathlib import Path

GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd")
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512/AMX; "bf16": Arm Features


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool(NATIVE_BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags))


def gpu_present() -> bool:
    return any(Path(node).exists() for node in GPU_DEVICE_NODES)


def auto_dtype(device: str, flags: frozenset[str] | None = None, gpu: bool | None = None) -> str:
    """The concrete dtype for `model.dtype: auto` given `resources.device` (auto, cpu, cuda, rocm)."""
    on_gpu = device in ("cuda", "rocm") or (device == "auto" and (gpu_present() if gpu is None else gpu))
    if on_gpu or cpu_has_native_bf16(flags):
        return "bfloat16"
    return "float32"
