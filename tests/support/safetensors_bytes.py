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
