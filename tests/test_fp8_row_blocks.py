"""Quark's per-tensor FP8 real quantization in row blocks (quantize/fp8_row_blocks.py) gives the bytes of Quark's
whole-tensor call, and Quark's exporter goes through it while `row_blocks()` is open. The tiny model's weights
are smaller than one block, so the end-to-end equality tests would not see a block boundary: checked here."""

from __future__ import annotations

import pytest
import torch

from quantize_pipeline.quantize import fp8_row_blocks

pytestmark = pytest.mark.slow  # imports Quark (its kernels: ~15 s)


def _kernels():
    from quark.torch.kernel.hw_emulation import hw_emulation_interface

    return hw_emulation_interface


def _weight(shape, dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator) * 0.05
    weight.view(-1)[7] = 30.0  # one element past the format's range after scaling: the clamp matters
    weight.view(-1)[-3] = float("-inf") if dtype == torch.float32 else -30.0
    return weight.to(dtype)


@pytest.mark.parametrize("name", fp8_row_blocks.FUNCTION_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale_form", ["0-d float32", "1 float32", "0-d in the weight's dtype", "python float"])
@pytest.mark.parametrize("shape", [(301, 128), (4, 75, 64)])  # 301: a ragged last block; 3-D: fused experts
def test_row_blocks_give_the_bytes_of_quarks_whole_call(name, dtype, scale_form, shape):
    quantize = getattr(_kernels(), name)
    weight = _weight(shape, dtype)
    amax = float(weight.float().abs().nan_to_num(posinf=0, neginf=0).amax()) / 20  # scaled values reach past 448
    scale = {"0-d float32": torch.tensor(amax), "1 float32": torch.tensor([amax]),
             "0-d in the weight's dtype": torch.tensor(amax, dtype=dtype), "python float": amax}[scale_form]
    whole = quantize(weight, scale)
    rows = fp8_row_blocks.blocked(quantize, block_elements=128 * 16)(weight, scale)
    assert rows.dtype == whole.dtype and rows.shape == whole.shape
    assert torch.equal(rows.view(torch.uint8), whole.view(torch.uint8))


def test_a_scale_per_channel_is_handed_to_quark_whole():
    calls = []

    def quantize(inputs, scale):
        calls.append(inputs.shape)
        return inputs.to(torch.float8_e4m3fn)

    fp8_row_blocks.blocked(quantize, block_elements=16)(torch.ones(8, 8), torch.ones(8, 1))
    assert calls == [torch.Size([8, 8])]


def test_quarks_exporter_kernel_goes_through_the_blocks_while_open_and_its_own_after():
    from quark.torch.kernel.hw_emulation.hw_emulation_interface import real_quantize_fp8_e4m3

    kernels = _kernels()
    original = kernels.real_quantize_fp8_e4m3_per_tensor_with_scale
    weight, scale = _weight((100, 100), torch.bfloat16), torch.tensor(0.01)
    expected = real_quantize_fp8_e4m3(weight, scale, None, "per_tensor", "fp8_e4m3")
    calls = []

    def counted(inputs, scale):
        calls.append(inputs.shape[0])
        return original(inputs, scale)

    kernels.real_quantize_fp8_e4m3_per_tensor_with_scale = counted
    try:
        with fp8_row_blocks.row_blocks(block_elements=1000):  # 10 rows a block
            inside = real_quantize_fp8_e4m3(weight, scale, None, "per_tensor", "fp8_e4m3")
        assert calls == [10] * 10
        assert kernels.real_quantize_fp8_e4m3_per_tensor_with_scale is counted  # restored on exit
    finally:
        kernels.real_quantize_fp8_e4m3_per_tensor_with_scale = original
    assert torch.equal(inside.view(torch.uint8), expected.view(torch.uint8))
