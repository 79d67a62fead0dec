"""Quark's observers take per-row min and max as torch.amin and torch.amax on CPU (quantize/row_min_max.py): the
values, the scales and the exported bytes must be the ones torch.aminmax gives."""

from __future__ import annotations

import importlib

import pytest
import torch

from quantize_pipeline.quantize import row_min_max

FAST = row_min_max.TorchWithRowMinMax(torch)
LAYER = "model.layers.0.mlp.up_proj"


def _awkward(dtype) -> torch.Tensor:
    """Rows with NaN, infinities, signed zeros, a constant row, and random values."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 33, generator=generator)
    x[1, 5] = float("nan")
    x[2, 0], x[2, 9] = float("inf"), float("-inf")
    x[3] = 0.0
    x[4] = -0.0
    x[5, ::2] = -0.0
    x[5, 1::2] = 0.0
    x[6] = 3.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("keepdim", [False, True])
def test_min_and_max_over_a_dim_are_torch_aminmaxs_values(dtype, dim, keepdim):
    x = _awkward(dtype)
    expected = torch.aminmax(x, dim=dim, keepdim=keepdim)
    got = FAST.aminmax(x, dim=dim, keepdim=keepdim)
    assert isinstance(got, torch.return_types.aminmax)
    for want, have in ((expected.min, got.min), (expected.max, got.max)):
        assert want.dtype == have.dtype and want.shape == have.shape
        assert torch.equal(want.isnan(), have.isnan())
        compared = ~want.isnan()
        assert torch.equal(want[compared], have[compared])  # -0.0 == 0.0: which zero a row of both gives may differ


def test_without_a_dim_and_every_other_name_are_torchs_own():
    x = _awkward(torch.float32)[[0, 6]]
    whole = FAST.aminmax(x)
    assert torch.equal(whole.min, torch.aminmax(x).min) and torch.equal(whole.max, torch.aminmax(x).max)
    assert FAST.float32 is torch.float32 and FAST.round is torch.round and FAST.Tensor is torch.Tensor


@pytest.mark.slow  # imports Quark (its kernels: ~15 s)
@pytest.mark.parametrize("scheme", ["int8_per_channel", "ptpc_fp8", "int4_wo_128"])
def test_quark_exports_the_same_bytes_with_and_without_it(scheme, monkeypatch):
    from quantize_pipeline.formats.quark_config import build_quark_config
    from quantize_pipeline.quantize import data_free
    from quantize_pipeline.recipe.schema import Recipe

    row_min_max.install()
    row_min_max.install()  # once: not wrapped twice
    observers = importlib.import_module(row_min_max.OBSERVER_MODULE)
    assert isinstance(observers.torch, row_min_max.TorchWithRowMinMax)
    assert observers.torch._torch is torch

    recipe = Recipe.model_validate({"name": "rows", "model": {"source": "org/unused"},
                                    "quantization": {"scheme": scheme, "exclude": ["lm_head"]}})
    quark_config = build_quark_config(recipe, "llama", ["lm_head"], {})
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(96, 256, generator=generator) * 0.05).to(torch.bfloat16)
    weight[3] *= 30
    weight[5, :128] = 0.0
    weight[6] = 0.0
    weight[6, ::3] = -0.0  # a row of signed zeros: which zero min and max give must not reach the bytes

    def export() -> dict:
        spec = data_free.fast_weight_config(quark_config, LAYER)
        if spec is not None:
            return data_free._quantize_fast(LAYER, weight, spec, "llama", torch.bfloat16, chunk_elements=256 * 16)
        tensors, _ = data_free._quantize_modules({LAYER: (weight, None)}, quark_config, "llama", torch.bfloat16)
        return tensors

    with_rows = export()
    with monkeypatch.context() as patch:
        patch.setattr(observers, "torch", torch)  # Quark as shipped
        stock = export()
    assert sorted(with_rows) == sorted(stock) and f"{LAYER}.weight" in stock
    for name in stock:
        assert stock[name].dtype == with_rows[name].dtype and stock[name].shape == with_rows[name].shape, name
        assert torch.equal(stock[name].view(-1).view(torch.uint8), with_rows[name].view(-1).view(torch.uint8)), name
