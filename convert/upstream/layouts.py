"""Layout changes between the haiku parameter tree and the grok_torch state dict.

Each change is one small function on numpy arrays (or torch tensors: only swapaxes/reshape and
elementwise ops are used), named after what it does, with both shapes in its docstring. Every
function has an inverse, so the mapping is total in both directions.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def identity(x):
    """haiku [...] -> torch [...] (embeddings [V, D], RMSNorm scales [D])."""
    return x


def linear_weight_to_torch(w):
    """haiku [D_in, D_out] -> torch [D_out, D_in] (nn.Linear layout); also [E, in, out] -> [E, out, in]."""
    return w.swapaxes(-1, -2)


def linear_weight_to_haiku(w):
    """torch [D_out, D_in] -> haiku [D_in, D_out]; also [E, out, in] -> [E, in, out]."""
    return w.swapaxes(-1, -2)


def scales_to_torch(s):
    """haiku scales [G, D_out] -> torch [D_out, G]; also [E, G, out] -> [E, out, G].

    G is 1 (per output channel) or the number of groups along the contracting (input) axis.
    """
    return s.swapaxes(-1, -2)


def scales_to_haiku(s):
    """torch scales [D_out, G] -> haiku [G, D_out]; also [E, out, G] -> [E, G, out]."""
    return s.swapaxes(-1, -2)


def router_to_torch(w):
    """haiku router [D, E] -> torch [E, D]."""
    return w.swapaxes(-1, -2)


def router_to_haiku(w):
    """torch router [E, D] -> haiku [D, E]."""
    return w.swapaxes(-1, -2)


# name -> (to_torch, to_haiku): the layout column of the name table refers to these by name.
LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "identity": (identity, identity),
    "linear": (linear_weight_to_torch, linear_weight_to_haiku),
    "router": (router_to_torch, router_to_haiku),
}
SCALES_LAYOUT = (scales_to_torch, scales_to_haiku)


def dequantize_torch_layout(weight, scales):
    """int8 weight [..., out, in] and scales [..., out, G] -> float32 weight [..., out, in].

    The input axis is split into G contiguous groups, group g scaled by scales[..., g]. The product of
    an int8 and a bf16 value is exact in float32, so rounding the result once to bf16 reproduces
    upstream's `weight.astype(bf16) * scales` bit for bit.
    """
    *lead, out_features, in_features = weight.shape
    groups = scales.shape[-1]
    if scales.shape[:-1] != tuple(weight.shape[:-1]) or in_features % groups:
        raise ValueError(f"scales {tuple(scales.shape)} do not fit weight {tuple(weight.shape)}: expected "
                         f"[..., {out_features}, G] with {in_features} divisible by G")
    if isinstance(weight, np.ndarray):
        w = weight.astype(np.float32).reshape(*lead, out_features, groups, in_features // groups)
        s = np.asarray(scales).astype(np.float32)[..., None]
    else:  # torch tensor
        import torch

        w = weight.to(torch.float32).reshape(*lead, out_features, groups, in_features // groups)
        s = scales.to(torch.float32)[..., None]
    return (w * s).reshape(*lead, out_features, in_features)


def dequantize_haiku_layout(weight, scales):
    """int8 weight [..., in, out] and scales [..., G, out] -> float32 [..., in, out] (upstream's rule)."""
    return linear_weight_to_haiku(
        dequantize_torch_layout(linear_weight_to_torch(weight), scales_to_torch(scales)))
