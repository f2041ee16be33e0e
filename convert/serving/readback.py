"""Read a serving export back into grok_torch's state-dict names: the inverse of convert.serving.exporter.

    export = read_export("/data/grok-1-vllm")        # ServingExport(engine, weights, config, state)
    model = grok_torch.from_state_dict(export.state, export.config)

The export's own config.json (its "grok_torch" entry) says which engine, weight format and GrokConfig it
was written for. Every tensor name is mapped back through that engine's table (convert.serving.names); the
set of names, their dtypes and shapes must be exactly what an export of that config holds (missing or
unexpected tensors raise, naming them). Per-expert tensors are stacked into `[E, out, in]` again; a
compressed-tensors linear is unpacked to its int8 values and upstream's scales (each group-128 scale must
repeat its upstream group's), so an int8 export reads back as the int8 conversion it came from, bit for
bit; SGLang's lm_head must equal the embedding it repeats. Reads everything into memory: for tests and
small models (the engines read the real one).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from convert.serving.compressed import check_groups, unpack_int8, unrepeat_scales
from convert.serving.exporter import PlannedTensor, plan_export
from grok_torch.config import GrokConfig
from grok_torch.converted_dir import CONFIG_FILE, INDEX_FILE, LoadError
from grok_torch.dtypes import dtype_name, numpy_to_torch, torch_to_numpy

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ServingExport:
    path: Path
    engine: str
    weights: str
    config: GrokConfig
    state: dict[str, "torch.Tensor"]  # grok_torch names: what grok_torch.from_state_dict takes
    tensors: dict[str, "torch.Tensor"]  # the export's own names, as stored


def read_engine_tensors(path: Path) -> dict[str, "torch.Tensor"]:
    """Every tensor of the export's shards, by the name the index gives it (the safetensors library reads)."""
    from safetensors import safe_open

    index = json.loads((path / INDEX_FILE).read_text())
    tensors = {}
    for file_name in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / file_name), framework="pt") as shard:
            for name in shard.keys():
                if index["weight_map"].get(name) != file_name:
                    raise LoadError(f"{path / file_name}: holds {name}, which the index maps elsewhere")
                tensors[name] = shard.get_tensor(name)
    missing = sorted(set(index["weight_map"]) - set(tensors))
    if missing:
        raise LoadError(f"{path / INDEX_FILE}: tensor(s) {', '.join(missing[:5])} missing from their shard files")
    return tensors


def _check_against_plan(path: Path, tensors: dict, planned: list[PlannedTensor]) -> None:
    expected = {p.name: p for p in planned}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LoadError(f"{path}: " + "; ".join(part for part in (
            f"missing tensor(s): {', '.join(missing[:8])}" if missing else "",
            f"unexpected tensor(s): {', '.join(unexpected[:8])}" if unexpected else "") if part))
    for name, plan in expected.items():
        got = (dtype_name(tensors[name].dtype), tuple(tensors[name].shape))
        if got != (plan.dtype, plan.shape):
            raise LoadError(f"{path}: tensor {name} is {got[0]}{list(got[1])}, expected {plan.dtype}{list(plan.shape)}")


def read_export(path: str | os.PathLike) -> ServingExport:
    """The export at `path`, read back into grok_torch names (see the module docstring); LoadError naming
    the file or tensor when it is not an export grok-torch wrote or does not hold what one holds."""
    import torch

    path = Path(path)
    try:
        values = json.loads((path / CONFIG_FILE).read_text())
        provenance = values["grok_torch"]
        engine, weights = provenance["engine"], provenance["weights"]
        config = GrokConfig.from_dict(provenance["grok_config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LoadError(f"{path / CONFIG_FILE}: not a grok-torch serving export ({err})") from None
    tensors = read_engine_tensors(path)
    quantized = {name: weights == "int8" for name in _linear_names(config)}
    planned = plan_export(config, engine, weights, quantized)
    _check_against_plan(path, tensors, planned)

    parts: dict[str, dict] = {}  # grok_torch name -> {expert or None: {role: tensor}}
    copies: dict[str, list[str]] = {}  # grok_torch name -> the engine names it was written to
    for plan in planned:
        entry = plan.of.source
        parts.setdefault(entry.torch_name, {}).setdefault(plan.of.expert, {})[plan.role] = tensors[plan.name]
        if plan.role in ("float", "weight_packed"):
            copies.setdefault(entry.torch_name, []).append(plan.name)
    by_name = {p.of.source.torch_name: p.of.source for p in planned}
    state = {}
    for name, experts in parts.items():
        entry = by_name[name]
        if None in experts and len(copies[name]) > 1:  # SGLang's lm_head: the embedding again
            first, *others = copies[name]
            for other in others:
                if not torch.equal(_bits(tensors[first]), _bits(tensors[other])):
                    raise LoadError(f"{path}: {other} differs from {first}; grok_torch's output head is the embedding")
        order = sorted(experts, key=lambda e: -1 if e is None else e)
        pieces = [experts[e] for e in order]
        if "float" in pieces[0]:
            value = [p["float"] for p in pieces]
            state[name] = torch.stack(value) if order[0] is not None else value[0]
            continue
        repeats = check_groups(entry)
        weight, scales = [], []
        for e, p in zip(order, pieces):
            shape = tuple(p["weight_shape"].tolist())
            if shape != entry.torch_shape[-2:]:
                raise LoadError(f"{path}: weight_shape of {name} (expert {e}) is {list(shape)}, expected "
                                f"{list(entry.torch_shape[-2:])}")
            weight.append(numpy_to_torch(unpack_int8(torch_to_numpy(p["weight_packed"]))))
            try:
                scales.append(numpy_to_torch(unrepeat_scales(torch_to_numpy(p["weight_scale"]), repeats)))
            except ValueError as err:
                raise LoadError(f"{path}: {name} (expert {e}): {err}") from None
        stacked = order[0] is not None
        state[name] = torch.stack(weight) if stacked else weight[0]
        state[entry.torch_scales_name] = torch.stack(scales) if stacked else scales[0]
    return ServingExport(path, engine, weights, config, state, tensors)


def _bits(tensor: "torch.Tensor") -> "torch.Tensor":
    """bf16 compared by its bits (torch.equal on bf16 would call -0.0 and 0.0 equal)."""
    import torch

    return tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor


def _linear_names(config: GrokConfig) -> list[str]:
    from convert.upstream.param_names import checkpoint_layout

    return [entry.torch_name for entry in checkpoint_layout(config) if entry.quantizable]
