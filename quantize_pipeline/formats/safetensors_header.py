"""Read safetensors headers (dtype, shape) without loading tensors or importing torch."""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 2**20


def read_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype": "I8", "shape": [..], "data_offsets": [begin, end]} for one .safetensors file
    (offsets from the end of the header: see read_header_and_data_start)."""
    return read_header_and_data_start(path)[0]


def read_header_and_data_start(path: Path) -> tuple[dict[str, dict], int]:
    """read_header's tensors, and the file offset where their bytes start (the header's end)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: truncated safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: implausible safetensors header size {length}")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def read_folder(folder: Path) -> dict[str, dict]:
    """All tensors of all *.safetensors files in a model folder."""
    tensors: dict[str, dict] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(read_header(path))
    return tensors


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))
