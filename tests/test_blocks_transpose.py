"""convert.disk.blocks.contiguous: the word-wise transposes (torch and numpy) against numpy's own copy."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import convert.disk.blocks as blocks
from convert.disk.blocks import block_indices, contiguous

DTYPES = (np.int8, np.uint8, ml_dtypes.bfloat16, np.int16, np.float32, np.float64)
SHAPES = ((8, 8), (16, 24), (9, 17), (3, 5), (64, 48), (7, 8), (8, 7), (2, 40, 56), (3, 33, 65), (2, 344, 64),
          (1, 1), (0, 8))
SLICES = ((...,), (..., slice(1, None), slice(None)), (..., slice(None), slice(3, None)),
          (..., slice(2, None), slice(1, -1)), (..., slice(8, None), slice(None)))


@pytest.mark.parametrize("use_torch", [True, False], ids=["torch", "numpy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_transposed_views_copy_exactly(dtype, use_torch, monkeypatch):
    if not use_torch:
        monkeypatch.setattr(blocks, "_transpose_words_torch", lambda *args: False)
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        base = rng.integers(-100, 100, size=shape).astype(dtype)
        for index in SLICES:
            view = base.swapaxes(-1, -2)[index]
            got = contiguous(view)
            assert got.flags.c_contiguous and got.dtype == view.dtype and got.shape == view.shape
            assert got.tobytes() == np.ascontiguousarray(view).tobytes(), (shape, index)


@pytest.mark.parametrize("use_torch", [True, False], ids=["torch", "numpy"])
def test_converter_sized_blocks_of_an_expert_stack(use_torch, monkeypatch):
    """[E, in, out] int8 -> [E, out, in] blocks as the converter cuts them (tiles smaller than a block)."""
    if not use_torch:
        monkeypatch.setattr(blocks, "_transpose_words_torch", lambda *args: False)
    monkeypatch.setattr(blocks, "_WORD_TILE", (16, 64))
    monkeypatch.setattr(blocks, "_TORCH_WORD_TILE", (16, 64))
    weight = np.random.default_rng(1).integers(-127, 128, size=(2, 200, 344), dtype=np.int8)
    view = weight.swapaxes(-1, -2)
    pieces = [contiguous(view[index]).tobytes() for index in block_indices(view.shape, 1, 200 * 72)]
    assert b"".join(pieces) == np.ascontiguousarray(view).tobytes()


def test_blocks_start_on_whole_word_groups():
    starts = [index[-1].start for index in block_indices((4, 32768, 6144), 1, 64 << 20)]
    assert all(start % 8 == 0 for start in starts)
    assert max(b - a for a, b in zip(starts, starts[1:]) if b > a) <= (64 << 20) // 6144


def test_copies_made_in_a_scratch_buffer_reuse_its_memory():
    """The converter's blocks are made in one reused buffer: same bytes as a new copy, in the same memory."""
    from convert.disk.blocks import Scratch

    scratch = Scratch()
    rng = np.random.default_rng(2)
    first = rng.integers(-127, 128, size=(64, 48), dtype=np.int8).swapaxes(0, 1)
    got = contiguous(first, scratch)
    assert got.tobytes() == np.ascontiguousarray(first).tobytes() and np.shares_memory(got, scratch.buffer)
    buffer = scratch.buffer
    for view in (rng.standard_normal((8, 24)).astype(np.float32).T,  # smaller: the same buffer
                 rng.standard_normal((40,)).astype(np.float32)[::2]):  # strided 1-D: a plain copy
        got = contiguous(view, scratch)
        assert got.tobytes() == np.ascontiguousarray(view).tobytes() and got.dtype == view.dtype
        assert scratch.buffer is buffer and np.shares_memory(got, buffer)
    bigger = rng.integers(0, 9, size=(128, 64), dtype=np.int16).T
    assert contiguous(bigger, scratch).tobytes() == np.ascontiguousarray(bigger).tobytes()
    assert scratch.buffer.nbytes == bigger.nbytes  # grown to the largest request
    whole = np.arange(12).reshape(3, 4)
    assert contiguous(whole, scratch) is whole  # already C-contiguous: no copy at all
