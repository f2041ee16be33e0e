"""QuantizedWeight8bit: upstream's int8 weight + bf16 scales pair, as plain numpy (no JAX)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class QuantizedWeight8bit:
    """Upstream's quantized leaf: `weight` int8 [..., in, out], `scales` bfloat16 [..., G, out].

    The raw checkpoint pickles name this class `__main__.QuantizedWeight8bit`; the converter reads
    and writes it without importing anything of upstream's.
    """

    weight: np.ndarray
    scales: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)


def quantize_int8(weight: np.ndarray, groups: int = 1) -> QuantizedWeight8bit:
    """float [..., in, out] -> QuantizedWeight8bit(int8 [..., in, out], bf16 scales [..., G, out]).

    Symmetric per (input group, output column): scale = bf16(max|w| / 127) over the group's rows,
    weight = round(w / scale) clipped to [-127, 127]. Used to make random checkpoints in the
    official format; upstream's own checkpoint was quantized by xAI with the same layout.
    """
    import ml_dtypes

    *lead, n_in, n_out = weight.shape
    if n_in % groups:
        raise ValueError(f"input size {n_in} is not divisible by {groups} scale groups")
    w = np.asarray(weight, dtype=np.float32).reshape(*lead, groups, n_in // groups, n_out)
    scales = (np.abs(w).max(axis=-2) / 127.0).astype(ml_dtypes.bfloat16)  # [..., G, out]
    safe = np.where(scales == 0, 1.0, scales.astype(np.float32))[..., None, :]
    q = np.clip(np.rint(w / safe), -127, 127).astype(np.int8).reshape(*lead, n_in, n_out)
    return QuantizedWeight8bit(weight=q, scales=scales)
