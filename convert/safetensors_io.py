"""A hand-written, streaming, sharded safetensors writer, and a header-only reader.

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

from convert.blocks import as_bytes
from convert.raw_checkpoint import numpy_dtype
from convert.shard_file import ShardFileWriter

INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{index:05d}-of-{count:05d}.safetensors"
SHARD_FILE_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
MAX_HEADER_BYTES = 100 << 20

# numpy dtype name <-> safetensors dtype code
DTYPE_CODES = {
    "bool": "BOOL", "int8": "I8", "uint8": "U8", "int16": "I16", "uint16": "U16", "int32": "I32",
    "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16", "bfloat16": "BF16",
    "float32": "F32", "float64": "F64",
}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}


class SafetensorsError(ValueError):
    """A safetensors file or converted directory that is malformed or inconsistent (names the file)."""


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
        if tensor.dtype not in DTYPE_CODES:
            raise ValueError(f"{tensor.name}: dtype {tensor.dtype} has no safetensors code")
        header[tensor.name] = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
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
    return [(SHARD_FILE.format(index=number, count=len(shards)),
             len(shard_header(shard, metadata)) + sum(t.nbytes for t in shard), shard)
            for number, shard in enumerate(shards, start=1)]


def index_text(files: list[tuple[str, int, list[TensorToWrite]]], index_metadata: dict[str, object] | None = None) -> str:
    """The `model.safetensors.index.json` of the shards `files` (as `plan_shard_files` gives them)."""
    weight_map = {tensor.name: name for name, _, shard in files for tensor in shard}
    total = sum(tensor.nbytes for _, _, shard in files for tensor in shard)
    index = {"metadata": {"total_size": total, **(index_metadata or {})}, "weight_map": weight_map}
    return json.dumps(index, indent=2) + "\n"


def write_sharded_safetensors(out_dir: str | os.PathLike, tensors: list[TensorToWrite], *,
                              max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, metadata: dict[str, str] | None = None,
                              index_metadata: dict[str, object] | None = None,
                              on_bytes: Callable[[int], None] | None = None,
                              reuse_shard: Callable[[Path, int], bool] | None = None,
                              on_shard: Callable[[Path, int, str], None] | None = None) -> list[Path]:
    """Write `tensors` as shards + index into the existing directory `out_dir`; returns the shard paths.

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
    (out_dir / INDEX_FILE).write_text(index_text(files, index_metadata))
    return paths


# ---- reading headers -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredTensor:
    """A tensor in a safetensors file, from its header: where its bytes are, without reading them."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in `file`
    nbytes: int


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, StoredTensor]]:
    """(metadata, {name: StoredTensor}) from one file's header, checking it against the file size: offsets
    contiguous from 0 and covering the data exactly, byte counts matching dtype and shape."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            prefix = file.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors file")
            header_len = struct.unpack("<Q", prefix)[0]
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(f"{path}: header length {header_len} exceeds the file ({size} bytes)")
            raw = file.read(header_len)
    except OSError as err:
        raise SafetensorsError(f"{path}: cannot read: {err.strerror or err}") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"{path}: header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors, spans = {}, []
    for name, spec in header.items():
        tensors[name] = _stored_tensor(path, name, spec, data_start)
        spans.append((spec["data_offsets"][0], spec["data_offsets"][1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise SafetensorsError(f"{path}: tensor {name} starts at {begin}, expected {end} (hole or overlap)")
        end = stop
    if data_start + end != size:
        raise SafetensorsError(f"{path}: data is {size - data_start} bytes but the header describes {end}")
    return metadata, tensors


def _stored_tensor(path: Path, name: str, spec: object, data_start: int) -> StoredTensor:
    ok = (isinstance(spec, dict) and spec.get("dtype") in DTYPE_NAMES and isinstance(spec.get("shape"), list)
          and all(isinstance(d, int) and d >= 0 for d in spec["shape"])
          and isinstance(spec.get("data_offsets"), list) and len(spec["data_offsets"]) == 2
          and all(isinstance(o, int) and o >= 0 for o in spec["data_offsets"]))
    if not ok:
        raise SafetensorsError(f"{path}: tensor {name}: malformed header entry {spec!r}")
    dtype, shape = DTYPE_NAMES[spec["dtype"]], tuple(spec["shape"])
    begin, end = spec["data_offsets"]
    nbytes = math.prod(shape) * numpy_dtype(dtype).itemsize
    if end - begin != nbytes:
        raise SafetensorsError(f"{path}: tensor {name}: {end - begin} bytes for {dtype}{list(shape)}, "
                               f"expected {nbytes}")
    return StoredTensor(name, dtype, shape, path, data_start + begin, nbytes)


def list_safetensors_dir(directory: str | os.PathLike) -> dict[str, StoredTensor]:
    """All tensors of a sharded directory, from the index and the shard headers (no data read). The index
    must list exactly the tensors the shards hold, and every shard in the directory must be indexed."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SafetensorsError(f"{index_path}: cannot read the safetensors index: {err}") from None
    tensors: dict[str, StoredTensor] = {}
    for file_name in sorted(set(weight_map.values())):
        if not SHARD_FILE_RE.match(str(file_name)):
            raise SafetensorsError(f"{index_path}: weight_map names {file_name!r}, not a shard file name")
        _, stored = read_safetensors_header(directory / file_name)
        for name, tensor in stored.items():
            if weight_map.get(name) != file_name:
                raise SafetensorsError(f"{directory / file_name}: holds {name}, which the index maps to "
                                       f"{weight_map.get(name)!r}")
            tensors[name] = tensor
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise SafetensorsError(f"{index_path}: tensor(s) {', '.join(missing[:5])} missing from their shard files")
    unindexed = sorted(p.name for p in directory.iterdir() if SHARD_FILE_RE.match(p.name)
                       and p.name not in set(weight_map.values()))
    if unindexed:
        raise SafetensorsError(f"{directory}: shard file(s) {', '.join(unindexed)} are not in {INDEX_FILE}")
    total = index.get("metadata", {}).get("total_size")
    if total is not None and total != sum(t.nbytes for t in tensors.values()):
        raise SafetensorsError(f"{index_path}: metadata.total_size {total} but the shards hold "
                               f"{sum(t.nbytes for t in tensors.values())} bytes")
    return tensors


def load_tensor(tensor: StoredTensor) -> np.ndarray:
    """Read one tensor into a new array (one buffer)."""
    array = np.empty(tensor.shape, dtype=numpy_dtype(tensor.dtype))
    view = memoryview(array.reshape(-1).view(np.uint8))
    with open(tensor.file, "rb", buffering=0) as file:
        file.seek(tensor.offset)
        done = 0
        while done < tensor.nbytes:
            n = file.readinto(view[done:])
            if not n:
                raise SafetensorsError(f"{tensor.file}: truncated inside tensor {tensor.name}")
            done += n
    return array


def map_tensor(tensor: StoredTensor) -> np.ndarray:
    """A read-only memory map of one tensor (no data read until touched)."""
    if tensor.nbytes == 0:
        return np.empty(tensor.shape, dtype=numpy_dtype(tensor.dtype))
    return np.memmap(tensor.file, dtype=numpy_dtype(tensor.dtype), mode="r", offset=tensor.offset,
                     shape=tensor.shape)
