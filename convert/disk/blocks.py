"""Split an array's C-order bytes into blocks, so a tensor is written without a second full-size copy.

A block is `array[index]` for an index from `block_indices`: a run of rows of the last two axes under
fixed leading indices (e.g. one expert's rows), so the blocks in order are exactly the tensor's C-order
bytes. Transposed views (`w.swapaxes(-1, -2)`) are blocked the same way: only each block is copied.
"""

from __future__ import annotations

import math
import sys
import threading
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
    if step >= 64:
        step -= step % 8  # blocks start on whole 8-row groups: aligned words for a transposed source
    for lead_index in np.ndindex(*lead):
        for start in range(0, rows, step):
            yield (*lead_index, slice(start, min(start + step, rows)))


TILE = 128


class Scratch:
    """One reusable uint8 buffer for copies that are consumed before the next is made (blocks streamed to a
    file): it grows to the largest request and is never given back, so the kernel does not fault in and zero
    fresh pages for every block (a quarter of a conversion's CPU time before it was reused)."""

    def __init__(self) -> None:
        self.buffer = np.empty(0, dtype=np.uint8)

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous array of `shape` and `dtype` over the start of the buffer (contents undefined)."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if self.buffer.nbytes < nbytes:
            self.buffer = np.empty(0, dtype=np.uint8)  # let the old one go before taking the new one
            self.buffer = np.empty(nbytes, dtype=np.uint8)
        return self.buffer[:nbytes].view(dtype).reshape(shape)


def contiguous(array: np.ndarray, scratch: Scratch | None = None) -> np.ndarray:
    """`array` as a C-contiguous array: itself if it already is, else a copy, made in `scratch` if given
    (valid until its next use) or in new memory. A transposed view (the last two axes swapped) of 1-, 2- or
    4-byte elements is transposed in 8-byte words (`_transpose_words`; int8 on the 2-core benchmark machine:
    0.2 GB/s in tiles, 0.55 GB/s in numpy words, 0.85 GB/s in torch words); what does not fit whole words is
    copied tile by tile (TILE x TILE)."""
    if array.flags.c_contiguous:
        return array
    out = np.empty(array.shape, dtype=array.dtype) if scratch is None else scratch.array(array.shape, array.dtype)
    if array.ndim < 2 or array.strides[-1] == array.dtype.itemsize:
        np.copyto(out, array)
        return out
    rows, cols = array.shape[-2:]
    n = 8 // array.dtype.itemsize if array.dtype.itemsize in _WORD_SWAPS else 0
    fast = (n and array.strides[-2] == array.dtype.itemsize and rows >= n and cols >= n
            and sys.byteorder == "little")  # the word shifts assume element k at bits k * 8 * itemsize
    for lead in np.ndindex(*array.shape[:-2]):
        source, target = array[lead], out[lead]
        done_rows, done_cols = 0, 0
        if fast:
            done_rows, done_cols = rows - rows % n, cols - cols % n
            _transpose_words(source[:done_rows, :done_cols].swapaxes(0, 1), target[:done_rows, :done_cols])
        _copy_tiles(source[done_rows:], target[done_rows:])  # the strips left over
        _copy_tiles(source[:done_rows, done_cols:], target[:done_rows, done_cols:])
    return out


def _copy_tiles(source: np.ndarray, target: np.ndarray) -> None:
    rows, cols = source.shape
    for r in range(0, rows, TILE):
        for c in range(0, cols, TILE):
            target[r:r + TILE, c:c + TILE] = source[r:r + TILE, c:c + TILE]


# In-register transposes of an n x n block of elements held as n 64-bit words (word k = row k): swap
# the off-diagonal half-blocks, then quarter-blocks, ... (shift in bits, mask of the kept low parts,
# word pairs). n = 8 for 1-byte elements, 4 for 2-byte, 2 for 4-byte.
_SWAP_32 = (32, 0x00000000FFFFFFFF)
_SWAP_16 = (16, 0x0000FFFF0000FFFF)
_SWAP_8 = (8, 0x00FF00FF00FF00FF)
_WORD_SWAPS = {
    1: ((*_SWAP_32, ((0, 4), (1, 5), (2, 6), (3, 7))), (*_SWAP_16, ((0, 2), (1, 3), (4, 6), (5, 7))),
        (*_SWAP_8, ((0, 1), (2, 3), (4, 5), (6, 7)))),
    2: ((*_SWAP_32, ((0, 2), (1, 3))), (*_SWAP_16, ((0, 1), (2, 3)))),
    4: ((*_SWAP_32, ((0, 1),)),),
}
_WORD_TILE = (256, 8192)  # words along a source row per tile, words per tile (the fastest measured in numpy)


def _transpose_words(source: np.ndarray, target: np.ndarray) -> None:
    """target[...] = source.T for 2D `source` [R, C] with contiguous rows and `target` [C, R] with
    contiguous rows, R and C multiples of n = 8 // itemsize.

    Both are viewed as 64-bit words, n elements each: source word [i, k, j] holds row n*i + k, columns
    n*j .. n*j + n - 1. The n words of block (i, j) are transposed in place with shifts and masks, after
    which word k holds column n*j + k, rows n*i .. n*i + n - 1: that is target word [j, k, i]. Work goes
    tile by tile, so the n word planes of a tile stay in cache.
    """
    itemsize = source.dtype.itemsize
    n = 8 // itemsize
    rows, cols = source.shape
    ni_total, nj_total = rows // n, cols // n
    if ni_total == 0 or nj_total == 0:
        return
    words = _word_view(source, ni_total, n, nj_total)
    out_words = _word_view(target, nj_total, n, ni_total)
    if _transpose_words_torch(words, out_words, itemsize):
        return
    nj = min(nj_total, _WORD_TILE[0])
    ni = max(1, min(ni_total, _WORD_TILE[1] // nj))
    planes = np.empty((n + 1, ni, nj), dtype=np.uint64)
    stages = [(np.uint64(shift), np.uint64(mask), pairs) for shift, mask, pairs in _WORD_SWAPS[itemsize]]
    for i0 in range(0, ni_total, ni):
        i1 = min(i0 + ni, ni_total)
        for j0 in range(0, nj_total, nj):
            j1 = min(j0 + nj, nj_total)
            w = planes[:, :i1 - i0, :j1 - j0]
            for k in range(n):
                w[k] = words[i0:i1, k, j0:j1]
            t = w[n]
            for shift, mask, pairs in stages:
                for p, q in pairs:  # swap the high part of word p with the low part of word q
                    np.right_shift(w[p], shift, out=t)
                    np.bitwise_xor(t, w[q], out=t)
                    np.bitwise_and(t, mask, out=t)
                    np.bitwise_xor(w[q], t, out=w[q])
                    np.left_shift(t, shift, out=t)
                    np.bitwise_xor(w[p], t, out=w[p])
            for k in range(n):
                out_words[j0:j1, k, i0:i1] = w[k].T


_TORCH_WORD_TILE = (512, 32768)  # words along a source row per tile, words per tile (fastest measured)


def _transpose_words_torch(words: np.ndarray, out_words: np.ndarray, itemsize: int) -> bool:
    """`_transpose_words` with torch's integer ops, when torch is importable and both word views have
    whole-word strides (else False, and numpy does it). int64 stands in for uint64: an arithmetic right shift
    only changes high bits, which the masks clear.

    Each stage swaps all of its word pairs in one op per step: at half-size h the n words are grouped as
    [n / 2h, 2, h], and word (a, 0, c) pairs with (a, 1, c) - the pairs `_WORD_SWAPS` lists. 15 ops per
    8-byte tile instead of 72 (int8 on the benchmark machine: 0.97 -> 1.4 GB/s on 2 threads)."""
    if any(s % 8 for s in (*words.strides, *out_words.strides)):
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the package
        return False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only source (e.g. a memory map) is only read here
        source = torch.from_numpy(words.view(np.int64))
    target = torch.from_numpy(out_words.view(np.int64))
    ni_total, n, nj_total = source.shape
    nj = min(nj_total, _TORCH_WORD_TILE[0])
    ni = max(1, min(ni_total, _TORCH_WORD_TILE[1] // nj))
    planes = torch.empty((n, ni, nj), dtype=torch.int64)
    spare = torch.empty((n // 2, ni, nj), dtype=torch.int64)
    stages = [(shift, mask - (1 << 64) if mask >= 1 << 63 else mask) for shift, mask, _ in _WORD_SWAPS[itemsize]]
    for i0 in range(0, ni_total, ni):
        i1 = min(i0 + ni, ni_total)
        for j0 in range(0, nj_total, nj):
            j1 = min(j0 + nj, nj_total)
            w = planes[:, :i1 - i0, :j1 - j0]
            w.copy_(source[i0:i1, :, j0:j1].transpose(0, 1))
            half = n // 2
            for shift, mask in stages:
                pairs = w.unflatten(0, (n // (2 * half), 2, half))
                p, q = pairs[:, 0], pairs[:, 1]  # swap the high part of each word p with the low part of its q
                t = spare[:, :i1 - i0, :j1 - j0].unflatten(0, (n // (2 * half), half))
                torch.bitwise_right_shift(p, shift, out=t)
                t.bitwise_xor_(q).bitwise_and_(mask)
                q.bitwise_xor_(t)
                p.bitwise_xor_(t.bitwise_left_shift_(shift))
                half //= 2
            target[j0:j1, :, i0:i1].copy_(w.permute(2, 0, 1))
    return True


def import_torch_in_background() -> threading.Thread | None:
    """Start importing torch (about 2 s) on a thread, so that it is loaded by the first transpose when a
    conversion begins with tensors that need none (the embedding); join the thread before exiting. None if
    torch is loaded already."""
    if "torch" in sys.modules:
        return None

    def load() -> None:
        try:
            import torch  # noqa: F401
        except ImportError:  # pragma: no cover - the transposes fall back to numpy
            pass

    thread = threading.Thread(target=load, name="import torch", daemon=True)
    thread.start()
    return thread


def _word_view(array: np.ndarray, blocks: int, n: int, width: int) -> np.ndarray:
    """A 2D array with contiguous rows as 64-bit words [blocks of n rows, n, words per row] (a view)."""
    row_stride = array.strides[0]
    return np.lib.stride_tricks.as_strided(array.view(np.uint64), shape=(blocks, n, width),
                                           strides=(n * row_stride, row_stride, 8))


def iter_c_blocks(array: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """C-contiguous blocks of `array` (any strides) whose bytes, concatenated, are `array`'s C-order bytes."""
    for index in block_indices(array.shape, array.dtype.itemsize, chunk_bytes):
        yield contiguous(array[index])


def nbytes_of(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def as_bytes(block: np.ndarray) -> memoryview:
    """A C-contiguous block's raw bytes without a copy (bf16 has no buffer-protocol format, so view as uint8)."""
    return memoryview(contiguous(block).reshape(-1).view(np.uint8))
