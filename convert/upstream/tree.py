"""In-memory conversion of a whole parameter tree: haiku tree <-> grok_torch state dict.

For small models (tests, the parity harness, the demo). The streaming converter handles real
checkpoints one tensor at a time with the same name table and layout functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from convert.upstream.param_names import UnknownParameterError, checkpoint_layout
from convert.upstream.quantized import QuantizedWeight8bit
from grok_torch.dtypes import numpy_to_torch, torch_to_numpy

if TYPE_CHECKING:
    from grok_torch.config import GrokConfig


def haiku_tree_to_state_dict(params: dict, config: "GrokConfig") -> dict[str, torch.Tensor]:
    """{module: {param: array | QuantizedWeight8bit}} -> {torch name: tensor}, total both ways.

    Quantized leaves give `<name>.weight` (int8) and `<name>.scales` (bf16); plain leaves keep
    their dtype. A missing or unexpected haiku parameter raises, naming it.
    """
    params = {k.removeprefix("params/"): v for k, v in params.items()}
    expected = {(e.haiku_module, e.haiku_param) for e in checkpoint_layout(config)}
    unexpected = sorted(f"{m}/{p}" for m, leaves in params.items() for p in leaves if (m, p) not in expected)
    if unexpected:
        raise UnknownParameterError(f"unexpected haiku parameter(s) for this config: {', '.join(unexpected[:5])}")
    state: dict[str, torch.Tensor] = {}
    for entry in checkpoint_layout(config):
        leaf = params.get(entry.haiku_module, {}).get(entry.haiku_param)
        if leaf is None:
            raise UnknownParameterError(f"missing haiku parameter {entry.haiku_name}")
        if isinstance(leaf, QuantizedWeight8bit):
            state[entry.torch_name] = numpy_to_torch(entry.to_torch(leaf.weight))
            state[entry.torch_scales_name] = numpy_to_torch(entry.scales_to_torch(leaf.scales))
        else:
            state[entry.torch_name] = numpy_to_torch(entry.to_torch(np.asarray(leaf)))
    return state


def state_dict_to_haiku_tree(state: dict[str, torch.Tensor], config: "GrokConfig") -> dict:
    """{torch name: tensor} -> {module: {param: array | QuantizedWeight8bit}} (the inverse)."""
    known = set()
    tree: dict[str, dict] = {}
    for entry in checkpoint_layout(config):
        if entry.torch_name not in state:
            raise UnknownParameterError(f"missing grok_torch tensor {entry.torch_name}")
        known.add(entry.torch_name)
        weight = entry.to_haiku(torch_to_numpy(state[entry.torch_name]))
        scales_name = entry.torch_scales_name
        if scales_name is not None and scales_name in state:
            known.add(scales_name)
            leaf = QuantizedWeight8bit(np.ascontiguousarray(weight),
                                       np.ascontiguousarray(entry.scales_to_haiku(torch_to_numpy(state[scales_name]))))
        else:
            leaf = np.ascontiguousarray(weight)
        tree.setdefault(entry.haiku_module, {})[entry.haiku_param] = leaf
    unexpected = sorted(set(state) - known)
    if unexpected:
        raise UnknownParameterError(f"unexpected grok_torch tensor(s): {', '.join(unexpected[:5])}")
    return tree
