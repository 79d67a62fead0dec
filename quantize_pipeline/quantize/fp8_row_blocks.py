"""Quark's per-tensor FP8 real quantization, taken in row blocks: the same bytes, in cache.

Quark's exporter turns each per-tensor FP8 weight into its stored bytes with three whole-tensor passes
(`inputs / scale`, clamp, cast: `hw_emulation_interface.real_quantize_fp8_per_tensor_with_scale`). On a 14B
MLP weight (13824 x 5120 bf16) that is 0.12 s; the same function on blocks of ~1M elements, each block's
three passes staying in the CPU's cache, 0.06 s (AVX-512 EPYC): about 12 s of a calibrated 14B streaming run's
export. Each output element depends on its input element and the one scale alone, so the bytes are Quark's
(tests/test_fp8_row_blocks.py compares them). While `row_blocks()` is open, Quark's module-level per-tensor
functions (looked up at each call by `real_quantize_fp8_e4m3` / `_e5m2`) are the blocked ones.
"""

from __future__ import annotations

import contextlib

# Elements per block: ~1M (2 MiB of bf16 in, 4 MiB at most for the float32 quotient), as data_free's blocks.
BLOCK_ELEMENTS = 1 << 20
FUNCTION_NAMES = ("real_quantize_fp8_e4m3_per_tensor_with_scale", "real_quantize_fp8_e5m2_per_tensor_with_scale")


def blocked(quantize, block_elements: int = BLOCK_ELEMENTS):
    """`quantize(inputs, scale)` applied to row blocks of `inputs` into one output tensor."""
    import torch

    def quantize_in_blocks(inputs, scale):
        if inputs.dim() < 2 or inputs.numel() <= block_elements or (torch.is_tensor(scale) and scale.numel() != 1):
            return quantize(inputs, scale)
        rows = max(1, block_elements // (inputs.numel() // inputs.shape[0]))
        first = quantize(inputs[:rows], scale)
        out = torch.empty(inputs.shape, dtype=first.dtype, device=first.device)
        out[:rows] = first
        for start in range(rows, inputs.shape[0], rows):
            out[start:start + rows] = quantize(inputs[start:start + rows], scale)
        return out

    return quantize_in_blocks


@contextlib.contextmanager
def row_blocks(block_elements: int = BLOCK_ELEMENTS):
    """Quark's per-tensor FP8 real quantization in row blocks while open; Quark's own functions after."""
    from quark.torch.kernel.hw_emulation import hw_emulation_interface as kernels

    originals = {name: getattr(kernels, name) for name in FUNCTION_NAMES}
    for name, function in originals.items():
        setattr(kernels, name, blocked(function, block_elements))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(kernels, name, function)
