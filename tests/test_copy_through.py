"""Tensors copied through unchanged, file to file in the kernel (quantize/copy_through.py), and the shard writer's
shards of them (numbered first, read back by name)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _sources(folder):
    import torch
    from safetensors.torch import save_file

    first = {"model.embed_tokens.weight": torch.randn(64, 24, dtype=torch.bfloat16),
             "model.norm.weight": torch.rand(24, dtype=torch.float32) + 0.5,
             "model.layers.0.mlp.up_proj.weight": torch.randn(8, 8)}
    second = {"lm_head.weight": torch.randn(48, 24, dtype=torch.float16),
              "counts": torch.arange(7, dtype=torch.int64),
              "scaled": torch.randn(5, 3).to(torch.float8_e4m3fn)}
    save_file(first, str(folder / "a.safetensors"), metadata={"format": "pt"})
    save_file(second, str(folder / "b.safetensors"), metadata={"format": "pt"})
    return first | second


def _equal(left, right) -> bool:
    import torch

    return left.dtype == right.dtype and torch.equal(left.view(torch.uint8), right.view(torch.uint8))


def test_copied_shard_holds_each_tensor_byte_for_byte_in_the_order_given(tmp_path):
    from safetensors.torch import load_file

    from quantize_pipeline.quantize.copy_through import write_copied_shard

    tensors = _sources(tmp_path)
    order = ["scaled", "model.norm.weight", "lm_head.weight", "model.embed_tokens.weight", "counts"]
    sources = {name: tmp_path / ("b.safetensors" if name in ("lm_head.weight", "counts", "scaled") else "a.safetensors")
               for name in order}
    written = write_copied_shard(sources, tmp_path / "out.safetensors")

    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert sorted(loaded) == sorted(order)  # the up_proj of the same source file is not copied
    assert all(_equal(loaded[name], tensors[name]) for name in order)
    assert written == sum(tensors[name].numel() * tensors[name].element_size() for name in order)
    raw = (tmp_path / "out.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert length % 8 == 0 and len(raw) == 8 + length + written  # 8-aligned tensor bytes, nothing after them
    header = json.loads(raw[8:8 + length])
    assert [name for name in header if name != "__metadata__"] == order
    assert header["__metadata__"] == {"format": "pt"}


@pytest.mark.parametrize("code", [errno.EXDEV, errno.ENOSYS])
def test_without_copy_file_range_the_bytes_go_through_a_buffer(tmp_path, monkeypatch, code):
    from safetensors.torch import load_file

    from quantize_pipeline.quantize import copy_through

    tensors = _sources(tmp_path)
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(copy_through.os, "copy_file_range", refuse)
    monkeypatch.setattr(copy_through, "CHUNK_BYTES", 100)  # several reads a tensor
    copy_through.write_copied_shard({"model.embed_tokens.weight": tmp_path / "a.safetensors"}, tmp_path / "o.safetensors")
    assert calls  # tried the kernel's copy first
    assert _equal(load_file(str(tmp_path / "o.safetensors"))["model.embed_tokens.weight"],
                  tensors["model.embed_tokens.weight"])


def test_another_copy_error_is_raised(tmp_path, monkeypatch):
    from quantize_pipeline.quantize import copy_through

    _sources(tmp_path)
    monkeypatch.setattr(copy_through.os, "copy_file_range",
                        lambda *args: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        copy_through.write_copied_shard({"counts": tmp_path / "b.safetensors"}, tmp_path / "o.safetensors")


def test_a_copy_does_not_bring_the_bytes_into_the_process(tmp_path):
    """256 MiB copied: the copying process's peak RSS stays far below it (no torch, no mapping, no buffer)."""
    size = 256 * 2**20
    header = json.dumps({"big": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(tmp_path / "big.safetensors", "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        for _ in range(size // 2**20):
            handle.write(os.urandom(2**20))
    # VmHWM (this process's peak RSS), not ru_maxrss: that one keeps the forking parent's peak across exec.
    job = ("import sys; from pathlib import Path; from quantize_pipeline.quantize.copy_through import "
           "write_copied_shard; folder = Path(sys.argv[1]); "
           "write_copied_shard({'big': folder / 'big.safetensors'}, folder / 'out.safetensors'); "
           "print(next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", job, str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                          check=True)
    assert int(done.stdout.strip()) < size // 4, done.stdout
    from quantize_pipeline.formats.safetensors_header import read_header_and_data_start

    (source, source_start), (copied, copied_start) = (read_header_and_data_start(tmp_path / name)
                                                      for name in ("big.safetensors", "out.safetensors"))
    assert copied == source  # the same name, dtype, shape and byte range
    assert (tmp_path / "big.safetensors").read_bytes()[source_start:] == (
        tmp_path / "out.safetensors").read_bytes()[copied_start:]


def test_shard_writer_numbers_the_copied_shards_first_and_indexes_every_tensor(tmp_path):
    import torch

    from quantize_pipeline.quantize.streaming import CheckpointReader, ShardWriter

    source = tmp_path / "source"
    source.mkdir()
    tensors = _sources(source)
    weight_map = {name: "a.safetensors" if name.startswith("model.") else "b.safetensors" for name in tensors}
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reader = CheckpointReader(source)
    out = tmp_path / "out"
    out.mkdir()
    # 3 KiB shards: the 3 KiB embedding alone, the 2.3 KiB lm_head alone, the norm with the small ones
    writer = ShardWriter(out, max_shard_bytes=3072)
    copied = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "counts", "scaled"]
    writer.copy_through(reader, reader.sizes(copied))
    layer = {"model.layers.0.mlp.up_proj.weight": torch.ones(16, 16)}
    writer.add(layer)
    files = writer.close()

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert files == [f"model-0000{number}-of-00004.safetensors" for number in range(1, 5)]
    assert index == {"counts": files[0], "lm_head.weight": files[0],
                     "model.embed_tokens.weight": files[1], "model.norm.weight": files[2], "scaled": files[2],
                     "model.layers.0.mlp.up_proj.weight": files[3]}
    assert not list(out.glob("*.tmp"))
    read = CheckpointReader(out).read(list(index))
    assert all(_equal(read[name], tensors[name]) for name in copied)
    assert torch.equal(read["model.layers.0.mlp.up_proj.weight"], layer["model.layers.0.mlp.up_proj.weight"])
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert total == sum(tensor.numel() * tensor.element_size() for tensor in [*tensors.values(), *layer.values()]
                        if tensor is not tensors["model.layers.0.mlp.up_proj.weight"])


def test_a_failed_copy_is_raised_by_close(tmp_path, monkeypatch):
    from quantize_pipeline.quantize import streaming

    source = tmp_path / "source"
    source.mkdir()
    _sources(source)
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"counts": "b.safetensors"}}))
    writer = streaming.ShardWriter(tmp_path, max_shard_bytes=10**9)

    def fail(sources, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streaming, "write_copied_shard", fail)
    reader = streaming.CheckpointReader(source)
    writer.copy_through(reader, reader.sizes(["counts"]))
    with pytest.raises(OSError, match="No space left"):
        writer.close()


def test_no_copy_thread_until_something_is_copied_through(tmp_path):
    import torch

    from quantize_pipeline.quantize.streaming import ShardWriter

    writer = ShardWriter(tmp_path)
    writer.add({"a": torch.ones(2)})
    assert writer._copier is None
    assert writer.close() == ["model.safetensors"]
