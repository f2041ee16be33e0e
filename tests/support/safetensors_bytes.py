"""Where a tensor's bytes lie inside a safetensors file, read from the header by hand: for tests that flip
or cut those bytes on purpose (the project reads safetensors only through the library)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def tensor_byte_range(path: Path, name: str) -> tuple[int, int]:
    """(first byte, end) of tensor `name`'s data in the file at `path`."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    begin, end = header[name]["data_offsets"]
    return 8 + header_len + begin, 8 + header_len + end


def read_header(path: Path) -> tuple[dict, bytes]:
    """(header JSON, data bytes) of a safetensors file."""
    raw = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + header_len]), raw[8 + header_len:]


def write_with_header(path: Path, header: dict | bytes, data: bytes) -> None:
    """Write a safetensors file from a header (a dict, or raw JSON bytes) and data bytes, as given."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)
