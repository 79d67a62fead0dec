"""streaming.fault_in: tensors safetensors maps from a file are read into memory by the call (on streaming's
read-ahead thread), not when the calibration first touches them; also where the kernel refuses the madvise."""

from __future__ import annotations

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantize_pipeline.quantize import streaming

MIB = 2**20


@pytest.mark.parametrize("advice", [streaming.MADV_POPULATE_READ, -1])  # -1: EINVAL, as on a kernel without it
def test_mapped_tensors_are_resident_after_fault_in(tmp_path, advice):
    path = tmp_path / "shard.safetensors"
    save_file({"a": torch.ones(16 * MIB, dtype=torch.bfloat16), "b": torch.arange(8 * MIB, dtype=torch.float32)},
              str(path))
    process = psutil.Process()
    opened = process.memory_info().rss
    with safe_open(path, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    before = process.memory_info().rss
    assert before - opened < 8 * MIB  # mapped, not read: why fault_in is needed
    streaming.fault_in(tensors, advice)
    assert process.memory_info().rss - before > 0.9 * 64 * MIB  # 32 MiB of bf16 + 32 MiB of float32
    assert torch.equal(tensors["b"][-3:], torch.arange(8 * MIB - 3, 8 * MIB, dtype=torch.float32))
