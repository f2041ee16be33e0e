"""Split an array's C-order bytes into blocks, so a tensor is written without a second full-size copy.

A block is `array[index]` for an index from `block_indices`: a run of rows of the last two axes under
fixed leading indices (e.g. one expert's rows), so the blocks in order are exactly the tensor's C-order
bytes. Transposed views (`w.swapaxes(-1, -2)`) are blocked the same way: only each block is copied.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

CHUNK_BYTES = 64 << 20  # ~64 MiB per block: large enough for fast I/O, small next to one MoE tensor


def block_indices(shape: tuple[int, ...], itemsize: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple]:
    """Index tuples that cut an array of `shape` into C-order blocks of about `chunk_bytes` (at least one row).

    [N] -> (slice(r0, r1),) ...;  [..., R, C] -> (*lead, slice(r0, r1)) for each lead index in C order.
    """
    if len(shape) == 0:
        yield ()
        return
    if len(shape) == 1:
        step = max(1, chunk_bytes // max(1, itemsize))
        for start in range(0, shape[0], step):
            yield (slice(start, min(start + step, shape[0])),)
        return
    *lead, rows, cols = shape
    step = max(1, chunk_bytes // max(1, cols * itemsize))
    for lead_index in np.ndindex(*lead):
        for start in range(0, rows, step):
            yield (*lead_index, slice(start, min(start + step, rows)))


TILE = 128


def contiguous(array: np.ndarray) -> np.ndarray:
    """`array` as a C-contiguous array: itself if it already is; a transposed view is copied tile by tile
    (TILE x TILE over the last two axes), about twice as fast as numpy's plain strided copy."""
    if array.flags.c_contiguous:
        return array
    if array.ndim < 2 or array.strides[-1] == array.dtype.itemsize:
        return np.ascontiguousarray(array)
    out = np.empty(array.shape, dtype=array.dtype)
    rows, cols = array.shape[-2:]
    for lead in np.ndindex(*array.shape[:-2]):
        source, target = array[lead], out[lead]
        for r in range(0, rows, TILE):
            for c in range(0, cols, TILE):
                target[r:r + TILE, c:c + TILE] = source[r:r + TILE, c:c + TILE]
    return out


def iter_c_blocks(array: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """C-contiguous blocks of `array` (any strides) whose bytes, concatenated, are `array`'s C-order bytes."""
    for index in block_indices(array.shape, array.dtype.itemsize, chunk_bytes):
        yield contiguous(array[index])


def nbytes_of(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def as_bytes(block: np.ndarray) -> memoryview:
    """A C-contiguous block's raw bytes without a copy (bf16 has no buffer-protocol format, so view as uint8)."""
    return memoryview(contiguous(block).reshape(-1).view(np.uint8))
