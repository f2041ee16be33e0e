"""The one way to get a model: from a converted directory (`load`) or from tensors (`from_state_dict`).

The model is built on the meta device and its tensors are assigned, not copied: from a converted
directory each is a view of a private memory map of its shard (read through the safetensors library),
so nothing is read until used, and int8 weights stay int8 unless bf16/fp32 weights are asked for (then
each linear is dequantized on its own, with upstream's rounding).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from grok_torch.config import GrokConfig
from grok_torch.converted_dir import WEIGHT_FORMATS, ConvertedDir, LoadError
from grok_torch.model import COMPUTE_DTYPES, Grok
from grok_torch.numerics import Numerics

__all__ = ["load", "from_state_dict", "LoadError"]

# What the model can use, per kind of tensor (a linear weight without scales is a float weight).
_FLOAT = (torch.float32, torch.bfloat16)
_ALLOWED_DTYPES = {"weight_int8": (torch.int8,), "weight_float": _FLOAT, "scales": (torch.bfloat16,), "other": _FLOAT}


def _kind(name: str, state: dict[str, torch.Tensor], expected: set[str]) -> str:
    if name.endswith(".scales"):
        return "scales"
    if name[: -len("weight")] + "scales" in expected:  # a linear's weight
        return "weight_int8" if name[: -len("weight")] + "scales" in state else "weight_float"
    return "other"


def _check_state(state: dict[str, torch.Tensor], model: Grok, where: str) -> None:
    """Names and dtypes of `state` against `model` (built on the meta device); LoadError naming them."""
    expected = set(model.state_dict())
    # A float linear has no scales: only weights are required, scales come with int8 weights.
    required = {n for n in expected if not n.endswith(".scales")}
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise LoadError(f"{where}: " + "; ".join(
            part for part in (f"missing tensor(s): {', '.join(missing[:8])}" if missing else "",
                              f"unexpected tensor(s): {', '.join(unexpected[:8])}" if unexpected else "") if part))
    for name, tensor in state.items():
        kind = _kind(name, state, expected)
        if kind == "scales" and name[: -len("scales")] + "weight" not in state:
            raise LoadError(f"{where}: {name} without its weight")
        if kind == "weight_float" and tensor.dtype == torch.int8:
            raise LoadError(f"{where}: int8 tensor {name} without its scales")
        if tensor.dtype not in _ALLOWED_DTYPES[kind]:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in _ALLOWED_DTYPES[kind])
            raise LoadError(f"{where}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; "
                            f"the model uses {allowed} there")


def convert_linear_weights(model: nn.Module, weights: str) -> None:
    """Turn every int8 linear into float weights ("bf16" or "fp32") with upstream's dequantization."""
    from grok_torch.linear import WEIGHT_DTYPES, Linear

    dtype = WEIGHT_DTYPES[weights]
    for module in model.modules():
        if isinstance(module, Linear) and module.quantized:
            dense = module.materialize(dtype)
            module._set_format(dtype)
            module.weight = nn.Parameter(dense, requires_grad=False)


def _convert_weights(model: Grok, weights: str | None, where: str) -> None:
    """Bring the linear layers to `weights`: None keeps what is stored; "bf16"/"fp32" dequantize int8 ones
    (and cast float ones); "int8" needs int8 to be stored: float weights cannot become int8 here."""
    if weights is None or weights == model.weights:
        return
    if weights == "int8":
        raise LoadError(f"{where} stores {model.weights} weights, which cannot be loaded as int8 (grok-torch does not "
                        f"quantize); load with weights=None (as stored) or weights=\"{model.weights}\"")
    convert_linear_weights(model, weights)


def from_state_dict(state: dict[str, torch.Tensor], config: GrokConfig, *, weights: str | None = None,
                    dtype: str = "bf16", numerics: str | Numerics | None = None,
                    device: str | torch.device | None = None, where: str = "state dict") -> Grok:
    """A Grok model holding exactly the tensors of `state` (assigned, not copied).

    weights: None keeps each linear as `state` has it (int8 + scales, or float); "bf16"/"fp32" dequantize
    the int8 ones with upstream's rounding; "int8" requires them to be int8. `dtype` is the compute dtype,
    `numerics` the numerics mode (grok_torch.numerics; "fast" by default, "upstream" for upstream's bits).
    Missing, unexpected or mistyped tensors raise LoadError naming them (`where` says whose they are).
    """
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise LoadError(f"weights must be one of {', '.join(WEIGHT_FORMATS)} or None, got {weights!r}")
    model = Grok(config, weights="int8", dtype=dtype, numerics=numerics, device="meta")
    _check_state(state, model, where)
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise LoadError(f"{where}: {err}") from None
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:
        raise LoadError(f"{where}: no data for tensor(s): {', '.join(unfilled[:8])}")
    # The embedding is used in the compute dtype (upstream casts it before each use).
    model.embedding.weight = nn.Parameter(model.embedding.weight.to(COMPUTE_DTYPES[dtype]), requires_grad=False)
    _convert_weights(model, weights, where)
    model.requires_grad_(False)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load(path: str | os.PathLike, *, weights: str | None = None, dtype: str = "bf16",
         numerics: str | Numerics | None = None, device: str | torch.device = "cpu", verify: bool = False,
         threads: int | None = None) -> Grok:
    """Build a Grok model from a converted directory.

    weights: None (the default) keeps what the directory stores: int8 + bf16 scales for an int8
    conversion (weight-only quantized matmuls); "bf16"/"fp32" dequantize them; "int8" requires an int8
    directory. dtype: the compute dtype, "bf16" or "fp32". numerics: the numerics mode (grok_torch.numerics;
    "fast" by default, "upstream" for upstream's bits). threads: torch's CPU threads from now on (None: one
    per physical core, grok_torch.threads). The directory is read by ConvertedDir, which
    checks everything but the tensor data before anything is used (a directory that is not a valid
    conversion, a config.json that differs from the sha256 the converter recorded, missing, unexpected or
    mistyped tensors: LoadError naming the file and the tensor or field); verify=True also checks every
    shard's sha256 against the index (reading every byte once first).
    """
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise LoadError(f"weights must be one of {', '.join(WEIGHT_FORMATS)} or None, got {weights!r}")
    from grok_torch.threads import set_threads

    set_threads(threads)
    directory = ConvertedDir(path, verify=verify)
    state = {name: directory.tensor(name) for name in directory.tensors}
    return from_state_dict(state, directory.config.config, weights=weights, dtype=dtype, numerics=numerics, device=device,
                           where=str(Path(path)))
