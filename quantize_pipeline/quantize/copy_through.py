"""Tensors copied through unchanged (embeddings, norms, an excluded lm_head), file to file in the kernel.

A safetensors file is an 8-byte header length, a JSON header and the tensors' bytes, so a shard of tensors
kept as the checkpoint stores them is a new header and byte ranges of the checkpoint's shards. They are copied
with copy_file_range(2): never mapped into this process (no RSS), no Python-side copy. Why (issue #26): streaming
copied the 14B shape's embeddings and lm_head (2.9 GB) at the end, read whole into memory, after every layer;
copied in the kernel, they go on a thread while the layers are calibrated.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

from quantize_pipeline.formats.safetensors_header import read_header_and_data_start

CHUNK_BYTES = 64 * 2**20  # one copy_file_range call (and the fallback's read/write)


def copy_range(source: int, target: int, offset: int, count: int) -> None:
    """`count` bytes of the file `source` from `offset`, appended at `target`'s position."""
    try:
        while count > 0:
            copied = os.copy_file_range(source, target, min(count, CHUNK_BYTES), offset)
            if copied == 0:
                raise ValueError(f"file ended {count} bytes early")
            offset, count = offset + copied, count - copied
    except OSError as error:  # a kernel or file system without it: the same bytes through a buffer
        if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        while count > 0:
            block = os.pread(source, min(count, CHUNK_BYTES), offset)
            if not block:
                raise ValueError(f"file ended {count} bytes early") from error
            view = memoryview(block)
            while view:
                view = view[os.write(target, view):]
            offset, count = offset + len(block), count - len(block)


def write_copied_shard(sources: dict[str, Path], path: Path) -> int:
    """A safetensors file at `path` holding each tensor `name` of the file `sources[name]`, byte for byte, in
    that order. Returns the tensors' bytes."""
    headers: dict[Path, tuple[dict, int]] = {}
    entries, offset = {}, 0
    for name, source in sources.items():
        if source not in headers:
            headers[source] = read_header_and_data_start(source)
        begin, end = headers[source][0][name]["data_offsets"]
        entries[name] = {"dtype": headers[source][0][name]["dtype"], "shape": headers[source][0][name]["shape"],
                         "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the tensors' bytes start 8-aligned, as safetensors writes them
    with open(path, "wb") as target:
        target.write(struct.pack("<Q", len(header)) + header)
        target.flush()
        for name, source in sources.items():
            table, data_start = headers[source]
            begin, end = table[name]["data_offsets"]
            with open(source, "rb") as handle:
                copy_range(handle.fileno(), target.fileno(), data_start + begin, end - begin)
    return offset
