"""`model.dtype: auto`: bf16 where the hardware multiplies it natively, float32 on other CPUs."""

from __future__ import annotations

import pytest

from quantize_pipeline.recipe import compute_dtype
from quantize_pipeline.recipe.schema import Recipe

AVX2_EPYC = frozenset({"avx", "avx2", "fma", "f16c"})
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
NEOVERSE_V1 = frozenset({"asimd", "sve", "bf16", "i8mm"})


@pytest.mark.parametrize(("device", "flags", "gpu", "expected"), [
    ("auto", AVX2_EPYC, False, "float32"),
    ("cpu", AVX2_EPYC, True, "float32"),  # the recipe pins the CPU: a GPU beside it does not count
    ("auto", AVX2_EPYC, True, "bfloat16"),
    ("cuda", AVX2_EPYC, False, "bfloat16"),
    ("rocm", AVX2_EPYC, False, "bfloat16"),
    ("auto", SAPPHIRE_RAPIDS, False, "bfloat16"),
    ("cpu", NEOVERSE_V1, False, "bfloat16"),
    ("cpu", frozenset(), False, "float32"),
])
def test_auto_dtype_follows_the_hardware(device, flags, gpu, expected):
    assert compute_dtype.auto_dtype(device, flags=flags, gpu=gpu) == expected


def _recipe(model: dict, resources: dict | None = None) -> Recipe:
    data = {"name": "t", "model": {"source": "builtin:smollm2-135m-instruct", **model},
            "quantization": {"scheme": "int8_per_channel"}}
    return Recipe.model_validate({**data, **({"resources": resources} if resources else {})})


def test_the_recipe_carries_the_resolved_dtype(monkeypatch):
    monkeypatch.setattr(compute_dtype, "cpu_flags", lambda: AVX2_EPYC)
    monkeypatch.setattr(compute_dtype, "gpu_present", lambda: False)
    assert _recipe({}).model.dtype == "float32"
    assert _recipe({"dtype": "auto"}).model.dtype == "float32"
    assert _recipe({}, {"device": "cuda"}).model.dtype == "bfloat16"
    # An explicit dtype is kept whatever the machine.
    assert _recipe({"dtype": "bfloat16"}).model.dtype == "bfloat16"
    # The hash says what produced a run: a float32 run and a bf16 run differ.
    assert _recipe({}).content_hash() != _recipe({"dtype": "bfloat16"}).content_hash()
    assert _recipe({}).content_hash() == _recipe({"dtype": "float32"}).content_hash()


def test_this_machine_reads_its_own_flags():
    flags = compute_dtype.cpu_flags()
    assert flags, "no CPU flags read from /proc/cpuinfo"
    assert compute_dtype.auto_dtype("cpu") == ("bfloat16" if compute_dtype.cpu_has_native_bf16() else "float32")
