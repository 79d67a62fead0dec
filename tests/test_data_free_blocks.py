"""The data-free fast path hands Quark's file-to-file quantizer a weight's rows in cache-sized blocks
(`data_free._quantize_fast`), in parallel threads: for every scheme that path takes, the blocks give the bytes
of one whole call.
The slow tests in test_data_free.py hold the whole call to the in-memory export; the tiny model's weights are
smaller than one block, so the blocks are checked here."""

from __future__ import annotations

import copy

import pytest
import torch

from quantize_pipeline.formats.quark_config import build_quark_config
from quantize_pipeline.quantize import data_free
from quantize_pipeline.recipe.schema import Recipe

pytestmark = pytest.mark.slow  # imports Quark (its kernels: ~15 s)

LAYER = "model.layers.0.mlp.up_proj"


def _weight_spec(scheme: str):
    recipe = Recipe.model_validate({"name": "blocks", "model": {"source": "org/unused"},
                                    "quantization": {"scheme": scheme, "exclude": ["lm_head"]}})
    return data_free.fast_weight_config(build_quark_config(recipe, "llama", ["lm_head"], {}), LAYER)


@pytest.mark.parametrize("scheme", ["int8_per_channel", "ptpc_fp8", "mxfp4_weight_only", "mxfp4", "mxfp6_e2m3"])
def test_weight_rows_in_blocks_quantize_to_the_bytes_of_one_call(scheme):
    spec = _weight_spec(scheme)
    assert spec is not None, f"{scheme} no longer takes the file-to-file path"
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(301, 128, generator=generator) * 0.05).to(torch.bfloat16)  # 301: a ragged last block
    weight[7] *= 40  # one row far larger: a block boundary must not share its scale
    assert data_free._rows_independent(spec, weight)
    whole = data_free._quantize_fast(LAYER, weight, spec, "llama", torch.bfloat16, chunk_elements=10 ** 9)
    serial = data_free._quantize_fast(LAYER, weight, spec, "llama", torch.bfloat16, chunk_elements=128 * 16)
    with data_free._block_workers() as workers:  # as the data-free path runs them: on parallel threads
        parallel = data_free._quantize_fast(LAYER, weight, spec, "llama", torch.bfloat16, chunk_elements=128 * 16,
                                            workers=workers)
    for blocks in (serial, parallel):
        assert sorted(whole) == sorted(blocks) and f"{LAYER}.weight" in whole
        for name in whole:
            assert whole[name].dtype == blocks[name].dtype and whole[name].shape == blocks[name].shape, name
            assert torch.equal(whole[name].view(torch.uint8), blocks[name].view(torch.uint8)), name


def test_a_per_channel_scale_over_input_columns_is_not_cut_into_row_blocks():
    spec = copy.deepcopy(_weight_spec("int8_per_channel"))
    assert data_free._rows_independent(spec, torch.zeros(4, 4))
    spec.ch_axis = 1
    assert not data_free._rows_independent(spec, torch.zeros(4, 4))
