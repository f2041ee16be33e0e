"""The one way to get a model: from a converted directory (`load`) or from tensors (`from_state_dict`).

The model is built on the meta device and its tensors are assigned, not copied: from a converted
directory each is a view of a private memory map of its shard (read through the safetensors library),
so nothing is read until used, and int8 weights stay int8 unless float weights are asked for (then
each linear is dequantized on its own, with upstream's rounding; grok_torch.weight_layouts).
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
from grok_torch.weight_layouts import FLOAT_WEIGHT_DTYPE, keeps_int8

__all__ = ["load", "from_state_dict", "load_rank", "LoadError"]

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
    """Bring every linear (the router aside) to the float format `weights` (grok_torch.weight_layouts):
    int8 ones dequantized with upstream's rounding, float ones cast. "bf16" keeps the exact-product linears
    (the MoE down projections) int8 + scales, since bf16 cannot hold the product upstream uses; a float one
    cannot become that (LoadError: the int8 values are not stored)."""
    from grok_torch.linear import Linear

    dtype = getattr(torch, FLOAT_WEIGHT_DTYPE[weights])
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or name.endswith(".router"):  # the router is fp32 in every format
            continue
        exact = not module.dequant_rounds_to_bf16
        if keeps_int8(weights, exact) and module.quantized:
            continue
        if keeps_int8(weights, exact) and module.weight.dtype == torch.float32:
            raise LoadError(f"{name}.weight is stored as fp32; \"{weights}\" weights keep that exact int8 x scale "
                            f"product as int8 + scales, which cannot be recovered from fp32; load with weights="
                            f"\"fp32\" or \"bf16-plain\"")
        if module.weight.dtype != dtype or module.quantized:
            dense = module.materialize(dtype)
            module._set_format(dtype)
            module.weight = nn.Parameter(dense, requires_grad=False)


def _convert_weights(model: Grok, weights: str | None, where: str) -> None:
    """Bring the linear layers to `weights`: None keeps what is stored; "bf16", "bf16-plain", "fp32" dequantize
    int8 ones (bf16 keeps the MoE down projections int8) and cast float ones; "int8" needs int8 to be stored:
    float weights cannot become int8 here, nor can bf16-plain become bf16 (its down projections were rounded)."""
    if weights is None or weights == model.weights:
        return
    if weights == "bf16" and model.weights == "bf16-plain":
        raise LoadError(f"{where} stores bf16-plain weights, whose MoE down projections were rounded to bf16; the "
                        f"bf16 format keeps their exact int8 x scale product, which is lost there; load with "
                        f"weights=None (as stored) or weights=\"bf16-plain\"")
    if weights == "int8":
        raise LoadError(f"{where} stores {model.weights} weights, which cannot be loaded as int8 (grok-torch does not "
                        f"quantize); load with weights=None (as stored) or weights=\"{model.weights}\"")
    convert_linear_weights(model, weights)


def from_state_dict(state: dict[str, torch.Tensor], config: GrokConfig, *, weights: str | None = None,
                    dtype: str = "bf16", numerics: str | Numerics | None = None,
                    device: str | torch.device | None = None, where: str = "state dict") -> Grok:
    """A Grok model holding exactly the tensors of `state` (assigned, not copied).

    weights: None keeps each linear as `state` has it (int8 + scales, or float); "bf16", "bf16-plain", "fp32"
    dequantize the int8 ones with upstream's rounding (grok_torch.weight_layouts: "bf16" keeps the MoE down
    projections int8 + scales, so it is as faithful as int8); "int8" requires them to be int8. `dtype` is the
    compute dtype, `numerics` the numerics mode (grok_torch.numerics; "fast" by default, "upstream" for
    upstream's bits).
    Missing, unexpected or mistyped tensors raise LoadError naming them (`where` says whose they are).
    """
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise LoadError(f"weights must be one of {', '.join(WEIGHT_FORMATS)} or None, got {weights!r}")
    model = Grok(config, weights="int8", dtype=dtype, numerics=numerics, device="meta")
    _fill(model, state, weights=weights, dtype=dtype, where=where)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _fill(model: Grok, state: dict[str, torch.Tensor], *, weights: str | None, dtype: str, where: str) -> None:
    """Assign `state` to the meta-built `model` (checked first), then bring it to the compute dtype and
    `weights`: the one filling step of from_state_dict and of a rank's load."""
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


def load(path: str | os.PathLike, *, weights: str | None = None, dtype: str = "bf16",
         numerics: str | Numerics | None = None, device: str | torch.device = "cpu", verify: bool = False,
         threads: int | None = None, tp: int | None = None) -> Grok:
    """Build a Grok model from a converted directory.

    weights: None (the default) keeps what the directory stores: int8 + bf16 scales for an int8
    conversion (weight-only quantized matmuls); "bf16" (the MoE down projections kept int8 + scales: as
    faithful as int8), "bf16-plain" (all bf16: less faithful) or "fp32" dequantize them; "int8" requires an int8
    directory. dtype: the compute dtype, "bf16" or "fp32". numerics: the numerics mode (grok_torch.numerics;
    "fast" by default, "upstream" for upstream's bits). threads: torch's CPU threads from now on (None: one
    per physical core, grok_torch.threads; with tp, None keeps the rank's share). The directory is read by
    ConvertedDir, which
    checks everything but the tensor data before anything is used (a directory that is not a valid
    conversion, a config.json that differs from the sha256 the converter recorded, missing, unexpected or
    mistyped tensors: LoadError naming the file and the tensor or field); verify=True also checks every
    shard's sha256 against the index (reading every byte once first).

    device: "cpu", "cuda" (cuda:LOCAL_RANK under torch.distributed, else cuda:0) or "cuda:N"; off the CPU
    each tensor is read straight onto the device (load_rank). tp=W: inside an initialised process group of
    W ranks (torchrun, or grok_torch.distributed.launch), this rank's shard of the model (grok_torch.tp),
    reading only its own slices; `model(tokens)` still returns the full logits on every rank.
    """
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise LoadError(f"weights must be one of {', '.join(WEIGHT_FORMATS)} or None, got {weights!r}")
    from grok_torch.threads import set_threads

    if threads is not None or tp is None:  # a tensor-parallel rank keeps its share of the cores (distributed.py)
        set_threads(threads)
    if tp is not None or torch.device(device).type != "cpu":
        return load_rank(path, tp=tp or 1, weights=weights, dtype=dtype, numerics=numerics, device=device,
                         verify=verify)
    directory = ConvertedDir(path, verify=verify)
    state = {name: directory.tensor(name) for name in directory.tensors}
    return from_state_dict(state, directory.config.config, weights=weights, dtype=dtype, numerics=numerics, device=device,
                           where=str(Path(path)))


# ---- one rank's slices, straight onto its device ---------------------------------------------------------

def _world(tp: int):
    """(rank, local rank, group) of this process for degree `tp`; W=1 needs no process group."""
    import torch.distributed as dist

    from grok_torch.distributed import DistributedError

    if tp == 1:  # the whole model in this process, whatever group it may be in
        return 0, int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        raise DistributedError(f"tp={tp} needs an initialised process group of {tp} ranks (run under torchrun "
                               f"--nproc-per-node {tp}, or `grok-torch generate --tp {tp}` on one machine)")
    if dist.get_world_size() != tp:
        raise DistributedError(f"tp={tp}, but the process group has {dist.get_world_size()} ranks")
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def _outcome(step):
    """(value, None) or (None, the one-line error) of step(): a rank's failure, to be agreed on (any
    exception: one that escaped would leave the other ranks waiting in the agreement)."""
    try:
        return step(), None
    except Exception as err:
        return None, str(err)


def _stored_formats(model: Grok, directory: ConvertedDir) -> None:
    """Make each meta-built Linear int8 or float as the directory stores it, before sharding (a float
    linear has no scale groups to split)."""
    from grok_torch.linear import Linear

    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.quantized and f"{name}.scales" not in directory.tensors:
            stored = directory.tensors.get(f"{name}.weight")
            if stored is not None and stored.dtype in ("float32", "bfloat16"):
                module._set_format(torch.float32 if stored.dtype == "float32" else torch.bfloat16)


def _read_slices(directory: ConvertedDir, model: Grok, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of the (sharded, meta) model read from the directory: only this rank's slice of each,
    from the shard's memory map, onto `device` (safetensors get_slice: no full tensor is made)."""
    from safetensors import safe_open

    from grok_torch.tp import layout, shard_index

    config = model.config
    lay = model.tp.layout if model.tp is not None else layout(config, 1, 0)
    handles: dict[str, object] = {}
    state = {}
    for name, stored in directory.tensors.items():
        if stored.file.name not in handles:
            handles[stored.file.name] = safe_open(str(stored.file), framework="pt", device=str(device))
        index = shard_index(name, stored.shape, config, lay)
        part = handles[stored.file.name].get_slice(name)[index if index is not None else ...]
        state[name] = part.to(device)
    return state


def load_rank(path: str | os.PathLike, *, tp: int = 1, weights: str | None = None, dtype: str = "bf16",
              numerics: str | Numerics | None = None, device: str | torch.device = "cpu",
              verify: bool = False) -> Grok:
    """This rank's model of degree `tp` from a converted directory, each tensor's own slice read onto the
    device. Every step that can fail on one rank alone ends in an agreement, so all ranks raise the same
    error (naming the ranks) instead of some waiting forever: the directory (a missing shard file), the
    config (the same on every rank), the device (more ranks than devices), the slices."""
    import json

    from grok_torch import distributed
    from grok_torch.distributed import rank_device
    from grok_torch.tp import shard

    rank, local_rank = _world(tp)

    def agree(error: str | None, what: str) -> None:
        if tp > 1:
            distributed.agree(error, what)
        elif error:
            raise LoadError(error)

    def check_same(value: str, what: str) -> None:
        if tp > 1:
            distributed.check_same(value, what)
    directory, error = _outcome(lambda: ConvertedDir(path, verify=verify))
    agree(error, f"opening {path}")
    config = directory.config.config
    check_same(json.dumps(config.to_dict(), sort_keys=True), "model config (config.json)")
    target, error = _outcome(lambda: rank_device(device, local_rank))
    agree(error, "choosing the device")
    if target.type == "cuda":
        torch.cuda.set_device(target)  # NCCL's collectives run on the current device
    model = Grok(config, weights="int8", dtype=dtype, numerics=numerics, device="meta")
    _stored_formats(model, directory)
    if tp > 1:
        import torch.distributed as dist

        shard(model, rank, tp, dist.group.WORLD)
    state, error = _outcome(lambda: _read_slices(directory, model, target))
    agree(error, f"reading rank {rank}'s slices of {path}")
    _fill(model, state, weights=weights, dtype=dtype, where=str(Path(path)))
    return model.eval()
