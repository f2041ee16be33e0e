"""A streaming, sharded safetensors writer (reading is the safetensors library's, in grok_torch.converted_dir).

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes
of JSON `{"__metadata__": {str: str}, name: {"dtype": "BF16", "shape": [...], "data_offsets": [b, e]}}`
(padded with spaces to a multiple of 8), then the raw little-endian C-order data, offsets relative to its
start. Every shape and dtype is known before any data is read, so shards are planned first, each header
is written, then each tensor's bytes are streamed in blocks: peak memory is about one block.

A sharded output is `model-00001-of-0000N.safetensors` ... plus `model.safetensors.index.json`:
`{"metadata": {"total_size": <bytes of tensor data>, ...}, "weight_map": {name: file}}`. It is written
the same way for N = 1.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from convert.disk.blocks import as_bytes
from convert.disk.shard_file import ShardFileWriter
from grok_torch.converted_dir import INDEX_FILE, index_text, shard_file_name
from grok_torch.dtypes import SAFETENSORS_CODES, numpy_dtype

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000


# ---- sizes --------------------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MB' -> 5e8, '1GiB' -> 2**30, '1.5GB', '1234' (bytes). Decimal and binary units."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _UNITS:
            raise ValueError(f"invalid size {text!r}: expected a number of bytes or a number with a unit "
                             f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 5GB or 500MB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be positive")
    return value


# ---- writing --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorToWrite:
    """One tensor to stream: `chunks()` yields C-contiguous arrays whose bytes, in order, are the tensor."""

    name: str
    dtype: str  # numpy dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize


def plan_shards(tensors: list[TensorToWrite], max_shard_size: int) -> list[list[TensorToWrite]]:
    """Greedy, order-preserving split: a new shard starts when the next tensor would push the data past
    `max_shard_size`; a tensor larger than that gets a shard of its own."""
    shards: list[list[TensorToWrite]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_header(tensors: list[TensorToWrite], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header (space-padded to a multiple of 8) for `tensors` in this order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for tensor in tensors:
        if tensor.dtype not in SAFETENSORS_CODES:
            raise ValueError(f"{tensor.name}: dtype {tensor.dtype} has no safetensors code")
        header[tensor.name] = {"dtype": SAFETENSORS_CODES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_tensor_data(file, tensor: TensorToWrite, on_bytes: Callable[[int], None] | None = None) -> None:
    """Stream one tensor's chunks into `file`, checking dtype, contiguity and the total byte count."""
    expected_dtype = numpy_dtype(tensor.dtype)
    written = 0
    for chunk in tensor.chunks():
        if chunk.dtype != expected_dtype:
            raise ValueError(f"{tensor.name}: chunk of dtype {chunk.dtype}, expected {tensor.dtype}")
        data = as_bytes(chunk)
        file.write(data)
        written += len(data)
        if on_bytes:
            on_bytes(len(data))
    if written != tensor.nbytes:
        raise ValueError(f"{tensor.name}: wrote {written} bytes, expected {tensor.nbytes} for "
                         f"{tensor.dtype}{list(tensor.shape)}")


def plan_shard_files(tensors: list[TensorToWrite], max_shard_size: int,
                     metadata: dict[str, str] | None = None) -> list[tuple[str, int, list[TensorToWrite]]]:
    """(file name, file size in bytes, tensors) of every shard, from shapes and dtypes alone."""
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    shards = plan_shards(tensors, max_shard_size)
    return [(shard_file_name(number, len(shards)),
             len(shard_header(shard, metadata)) + sum(t.nbytes for t in shard), shard)
            for number, shard in enumerate(shards, start=1)]


def shards_index_text(files: list[tuple[str, int, list[TensorToWrite]]],
                      index_metadata: dict[str, object] | None = None) -> str:
    """The `model.safetensors.index.json` of the shards `files` (as `plan_shard_files` gives them)."""
    weight_map = {tensor.name: name for name, _, shard in files for tensor in shard}
    total = sum(tensor.nbytes for _, _, shard in files for tensor in shard)
    return index_text(weight_map, total, index_metadata)


def write_sharded_safetensors(out_dir: str | os.PathLike, tensors: list[TensorToWrite], *,
                              max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, metadata: dict[str, str] | None = None,
                              index_metadata: dict[str, object] | None = None,
                              on_bytes: Callable[[int], None] | None = None,
                              reuse_shard: Callable[[Path, int], bool] | None = None,
                              on_shard: Callable[[Path, int, str], None] | None = None,
                              write_index: bool = True) -> list[Path]:
    """Write `tensors` as shards + index into the existing directory `out_dir`; returns the shard paths.
    (`write_index=False`: the shards only; the caller writes the index, e.g. with their sha256.)

    `reuse_shard(path, size)`, if given, is asked before each shard: True keeps the file already there (a
    finished shard of an interrupted run, checked by the caller) instead of writing it. `on_shard(path, size,
    sha256)`, if given, is called after each shard is written, flushed to disk (fsync) and closed, with the
    size and sha256 of the bytes as they were written."""
    out_dir = Path(out_dir)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names: " + ", ".join(sorted({n for n in names if names.count(n) > 1})))
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    files = plan_shard_files(tensors, max_shard_size, metadata)
    paths = []
    for name, size, shard in files:
        path = out_dir / name
        paths.append(path)
        if reuse_shard is not None and reuse_shard(path, size):
            if on_bytes:
                on_bytes(sum(t.nbytes for t in shard))
            continue
        with ShardFileWriter(path, hash=on_shard is not None) as file:
            file.write(shard_header(shard, metadata))
            for tensor in shard:
                write_tensor_data(file, tensor, on_bytes)
            written, sha256 = file.finish(sync=on_shard is not None)
        if on_shard:
            on_shard(path, written, sha256)
    if write_index:
        (out_dir / INDEX_FILE).write_text(shards_index_text(files, index_metadata))
    return paths
