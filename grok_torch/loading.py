"""Load a converted directory (sharded safetensors + config.json) into a grok_torch model, lazily.

The model is built on the meta device; every tensor is a view of a private memory map of its
safetensors file, so nothing is read until used, and int8 weights stay int8 unless bf16/fp32
weights are asked for (then each linear is dequantized on its own, with upstream's rounding).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from grok_torch.config import GrokConfig
from grok_torch.model import Grok

SAFETENSORS_DTYPES = {"I8": torch.int8, "BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16,
                      "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8}
INDEX_FILE = "model.safetensors.index.json"


class LoadError(ValueError):
    """A converted directory that cannot be loaded; the message names the file or tensor."""


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict) of a safetensors file, without reading its data."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise LoadError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", head)
        if size > 100 * 2**20:
            raise LoadError(f"{path}: safetensors header of {size} bytes is implausibly large")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LoadError(f"{path}: unreadable safetensors header: {err}") from err
    return 8 + size, header


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file as a view of a private (copy-on-write) memory map."""
    data_start, header = read_safetensors_header(path)
    file_size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=file_size)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise LoadError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        itemsize = torch.empty(0, dtype=dtype).element_size()
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * itemsize or data_start + end > file_size:
            raise LoadError(f"{path}: tensor {name} {list(shape)} {info['dtype']} does not fit its byte range "
                            f"[{begin}, {end}) (file has {file_size - data_start} data bytes)")
        offset = data_start + begin
        if offset % itemsize:
            raise LoadError(f"{path}: tensor {name} is not aligned to its element size")
        tensor = torch.empty(0, dtype=dtype)
        tensor.set_(storage, offset // itemsize, shape)
        tensors[name] = tensor
    return tensors


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a converted directory, from its index (or the single file)."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise LoadError(f"{index}: not a safetensors index ({err})") from err
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise LoadError(f"{path}: shard file(s) named in {INDEX_FILE} are missing: {', '.join(missing)}")
        return [path / f for f in files]
    single = sorted(path.glob("*.safetensors"))
    if not single:
        raise LoadError(f"{path}: no {INDEX_FILE} and no .safetensors file: not a converted grok-torch directory")
    return single


def read_config(path: str | Path) -> tuple[GrokConfig, dict]:
    """(GrokConfig, the whole config.json) of a converted directory."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise LoadError(f"{path}: config.json is missing: not a converted grok-torch directory")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise LoadError(f"{config_file}: {err}") from err
    return GrokConfig.from_dict(meta.get("grok_config", meta)), meta


def convert_linear_weights(model: nn.Module, weights: str) -> None:
    """Turn every int8 linear into float weights ("bf16" or "fp32") with upstream's dequantization."""
    from grok_torch.linear import WEIGHT_FORMATS, Linear

    dtype = WEIGHT_FORMATS[weights]
    for module in model.modules():
        if isinstance(module, Linear) and module.quantized:
            dense = module.materialize(dtype)
            module._set_format(dtype)
            module.weight = nn.Parameter(dense, requires_grad=False)


def load(path: str | Path, *, weights: str = "int8", dtype: str = "bf16", device: str | torch.device = "cpu") -> Grok:
    """Build a Grok model from a converted directory.

    weights: "int8" keeps int8 + bf16 scales where the checkpoint has them (weight-only quantized
    matmuls); "bf16"/"fp32" dequantize them. dtype: the compute dtype, "bf16" or "fp32".
    Missing or unexpected tensors raise LoadError naming them.
    """
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"{path}: not a directory")
    if weights not in ("int8", "bf16", "fp32"):
        raise LoadError(f"weights must be int8, bf16 or fp32, got {weights!r}")
    config, _ = read_config(path)
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        for name, tensor in mmap_safetensors(file).items():
            if name in state:
                raise LoadError(f"{file}: tensor {name} appears in more than one shard")
            state[name] = tensor
    model = Grok(config, weights="int8", dtype=dtype, device="meta")
    expected = set(model.state_dict())
    # A float linear has no scales: only weights are required, scales come with int8 weights.
    required = {n for n in expected if not n.endswith(".scales")}
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise LoadError(f"{path}: " + "; ".join(
            part for part in (f"missing tensor(s): {', '.join(missing[:8])}" if missing else "",
                              f"unexpected tensor(s): {', '.join(unexpected[:8])}" if unexpected else "") if part))
    unscaled = sorted(n for n, t in state.items() if t.dtype == torch.int8 and n[: -len("weight")] + "scales" not in state)
    if unscaled:
        raise LoadError(f"{path}: int8 tensor(s) without their scales: {', '.join(unscaled[:8])}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise LoadError(f"{path}: {err}") from err
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:
        raise LoadError(f"{path}: no data for tensor(s): {', '.join(unfilled[:8])}")
    # The embedding is used in the compute dtype (upstream casts it before each use).
    model.embedding.weight = nn.Parameter(model.embedding.weight.to(model.dtype), requires_grad=False)
    if weights != "int8":
        convert_linear_weights(model, weights)
    model.requires_grad_(False)
    return model.to(device).eval()
