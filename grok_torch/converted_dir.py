"""The converted directory: the one on-disk format that grok-torch writes and reads back.

A converted directory holds

- `model-0000k-of-0000N.safetensors`: the tensors, in grok_torch's names and layout; each shard's
  `__metadata__` holds `format: "pt"` (what safetensors tooling expects), `weight_format`, `source` and
  `grok_torch_version`;
- `model.safetensors.index.json`: `{"metadata": {"total_size": <data bytes>, "weight_format": ...},
  "weight_map": {tensor name: shard file}}` (written for one shard too);
- `tokenizer.model`: the release's tokenizer, when convert found one beside the source (its sha256 and
  origin are in config.json's "tokenizer");
- `config.json`:

      {
        "format": "grok-torch-converted",        # marks a directory grok-torch wrote
        "format_version": 1,
        "weight_format": "int8" | "bf16" | "fp32",
        "grok_torch_version": "0.1.0",
        "source": "/abs/path/to/ckpt-0",
        "grok_config": {...GrokConfig.to_dict()...},
        "quantized": {"layers.0.attn.q_proj.weight": true, ...},  # every linear weight: int8+scales or not
        "tokenizer": {"file": "tokenizer.model", "sha256": "...", "source": "/abs/path"} | null
      }

This module owns the names and the contents of those files. Writers (the converter) take the names,
`config_values`, `shard_metadata` and `index_text` from here; every reader (`grok_torch.load`, inspect,
verify, the exporters) opens a directory with `ConvertedDir`, which reads each shard's header with the
safetensors library (offsets covering the data exactly, no overlap or hole) and checks that the index,
the shards and the config agree. Every refusal is a `LoadError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grok_torch.config import GrokConfig
from grok_torch.dtypes import SAFETENSORS_CODES, SAFETENSORS_NAMES, numpy_dtype, torch_to_numpy

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"  # the release's SentencePiece model, copied by convert when found
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{index:05d}-of-{count:05d}.safetensors"
SHARD_FILE_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
FORMAT_MARKER = "grok-torch-converted"
FORMAT_VERSION = 1
WEIGHT_FORMATS = ("int8", "bf16", "fp32")


class LoadError(ValueError):
    """A converted directory that cannot be read or loaded; the message names the file, tensor or field."""


def grok_torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("grok-torch")
    except PackageNotFoundError:
        return "unknown"


def check_weight_format(weight_format: str) -> str:
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weight_format!r}; expected one of {', '.join(WEIGHT_FORMATS)}")
    return weight_format


def is_owned_name(name: str) -> bool:
    """A file name that a converted directory holds (config, index, shards)."""
    return name in (CONFIG_FILE, INDEX_FILE, TOKENIZER_FILE) or bool(SHARD_FILE_RE.match(name))


# ---- writing ----------------------------------------------------------------------------------------------

def config_values(config: GrokConfig, weight_format: str, source: str, quantized: dict[str, bool],
                  tokenizer: dict[str, str] | None = None) -> dict[str, Any]:
    """The contents of config.json; `quantized` maps every linear weight's name to int8+scales or not,
    `tokenizer` describes the copied tokenizer.model ({"file", "sha256", "source"}) or is None."""
    return {"format": FORMAT_MARKER, "format_version": FORMAT_VERSION, "weight_format": check_weight_format(weight_format),
            "grok_torch_version": grok_torch_version(), "source": source, "grok_config": config.to_dict(),
            "quantized": dict(quantized), "tokenizer": tokenizer}


def config_text(values: dict[str, Any]) -> str:
    return json.dumps(values, indent=2) + "\n"


def shard_metadata(weight_format: str, source: str) -> dict[str, str]:
    """Every shard's `__metadata__`."""
    return {"format": "pt", "weight_format": weight_format, "source": source, "grok_torch_version": grok_torch_version()}


def shard_file_name(number: int, count: int) -> str:
    return SHARD_FILE.format(index=number, count=count)


def index_text(weight_map: dict[str, str], total_size: int, metadata: dict[str, Any] | None = None) -> str:
    """The `model.safetensors.index.json` text for `weight_map` {tensor name: shard file}; `metadata` (the
    converter's: {"weight_format": ...}) joins total_size."""
    index = {"metadata": {"total_size": total_size, **(metadata or {})}, "weight_map": weight_map}
    return json.dumps(index, indent=2) + "\n"


# ---- reading ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvertedConfig:
    """A converted directory's config.json, checked: the model config and how its weights are stored."""

    path: Path
    weight_format: str
    config: GrokConfig
    quantized: dict[str, bool]
    source: str | None
    values: dict[str, Any]  # the whole file


def _read_json(path: Path, what: str) -> Any:
    _require_regular_file(path, what)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoadError(f"{path}: cannot read the {what}: {err}") from None


def _require_regular_file(path: Path, what: str, when_missing: str = "not a converted grok-torch directory") -> None:
    """Only regular files (or links to them) are read: a FIFO would block forever, a device never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise LoadError(f"{path.parent}: {path.name} is missing: {when_missing}") from None
    except OSError as err:
        raise LoadError(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        raise LoadError(f"{path}: the {what} is not a regular file")


def read_config(directory: str | os.PathLike) -> ConvertedConfig:
    """The config.json of a converted directory; LoadError naming the file if it is not one."""
    path = Path(directory) / CONFIG_FILE
    values = _read_json(path, "converted directory's config")
    if not isinstance(values, dict) or values.get("format") != FORMAT_MARKER:
        raise LoadError(f"{path}: not a grok-torch converted directory (no \"format\": \"{FORMAT_MARKER}\")")
    if values.get("weight_format") not in WEIGHT_FORMATS:
        raise LoadError(f"{path}: weight_format {values.get('weight_format')!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    if not isinstance(values.get("grok_config"), dict):
        raise LoadError(f"{path}: grok_config is missing or not an object")
    try:
        config = GrokConfig.from_dict(values["grok_config"])
    except (TypeError, ValueError) as err:
        raise LoadError(f"{path}: grok_config: {err}") from None
    quantized = values.get("quantized", {})
    if not isinstance(quantized, dict):
        raise LoadError(f"{path}: quantized is not an object")
    return ConvertedConfig(path, values["weight_format"], config, quantized, values.get("source"), values)


def is_converted_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / INDEX_FILE).is_file()


@dataclass(frozen=True)
class StoredTensor:
    """A tensor in a shard, from its header: name, dtype (numpy's name), shape, file; no data read."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize


class ConvertedDir:
    """A converted directory opened for reading: its config, its index and every shard's header, checked.

    Tensors are read through the safetensors library: `tensor(name)` is a view of a private memory map of
    its shard (nothing read until used), `block(name, index)` reads one block as numpy (bf16 as
    ml_dtypes.bfloat16), `torch_block(name, index)` the same as a torch tensor.
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory)
        if not self.path.is_dir():
            raise LoadError(f"{self.path}: not a directory (expected a converted grok-torch directory)")
        self.config = read_config(self.path)
        self.weight_map = self._read_index()
        self._handles: dict[str, Any] = {}
        self.shard_metadata: dict[str, dict[str, str]] = {}
        self.tensors: dict[str, StoredTensor] = {}
        for file_name in sorted(set(self.weight_map.values())):
            self._read_shard(file_name)
        missing = sorted(set(self.weight_map) - set(self.tensors))
        if missing:
            raise LoadError(f"{self.path / INDEX_FILE}: tensor(s) {', '.join(missing[:5])} missing from their "
                            f"shard files")
        indexed = set(self.weight_map.values())
        unindexed = sorted(p.name for p in self.path.iterdir() if SHARD_FILE_RE.match(p.name) and p.name not in indexed)
        if unindexed:
            raise LoadError(f"{self.path}: shard file(s) {', '.join(unindexed)} are not in {INDEX_FILE}")
        total = self._index_metadata.get("total_size")
        stored = sum(t.nbytes for t in self.tensors.values())
        if total is not None and total != stored:
            raise LoadError(f"{self.path / INDEX_FILE}: metadata.total_size {total} but the shards hold {stored} bytes")

    def _read_index(self) -> dict[str, str]:
        path = self.path / INDEX_FILE
        index = _read_json(path, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LoadError(f"{path}: not a safetensors index (no \"weight_map\" of tensor name -> file)")
        metadata = index.get("metadata", {})
        self._index_metadata = metadata if isinstance(metadata, dict) else {}
        for file_name in set(weight_map.values()):
            if not SHARD_FILE_RE.match(file_name):
                raise LoadError(f"{path}: weight_map names {file_name!r}, not a shard file name "
                                f"(model-0000k-of-0000N.safetensors in this directory)")
        return weight_map

    def _read_shard(self, file_name: str) -> None:
        from safetensors import SafetensorError, safe_open

        path = self.path / file_name
        _require_regular_file(path, "shard file", f"the shard file is named in {INDEX_FILE}")
        try:
            handle = safe_open(str(path), framework="pt")
            names = list(handle.keys())
            self.shard_metadata[file_name] = handle.metadata() or {}
            specs = {name: handle.get_slice(name) for name in names}
            stored = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in specs.items()}
        except (SafetensorError, OSError) as err:
            raise LoadError(f"{path}: not a valid safetensors file: {err}") from None
        for name, (code, shape) in stored.items():
            if code not in SAFETENSORS_NAMES:
                raise LoadError(f"{path}: tensor {name} has dtype {code}, which grok-torch does not store")
            if self.weight_map.get(name) != file_name:
                raise LoadError(f"{path}: holds {name}, which the index maps to {self.weight_map.get(name)!r}")
            self.tensors[name] = StoredTensor(name, SAFETENSORS_NAMES[code], shape, path)
        self._handles[file_name] = handle

    # -- data
    def _handle(self, name: str):
        if name not in self.tensors:
            raise LoadError(f"{self.path}: no tensor {name}")
        file = self.tensors[name].file
        if file.name not in self._handles:  # unmapped by close(): map it again
            from safetensors import safe_open

            self._handles[file.name] = safe_open(str(file), framework="pt")
        return self._handles[file.name]

    def tensor(self, name: str) -> "torch.Tensor":
        """The whole tensor, a view of a private memory map of its shard (read when touched)."""
        return self._handle(name).get_tensor(name)

    def torch_block(self, name: str, index: tuple = (...,)) -> "torch.Tensor":
        """`tensor[index]` read into memory (index: ints and slices, as numpy takes them)."""
        return self._handle(name).get_slice(name)[index if index != () else ...]

    def block(self, name: str, index: tuple = (...,)) -> np.ndarray:
        """`tensor[index]` as a numpy array (bfloat16 as ml_dtypes.bfloat16)."""
        return torch_to_numpy(self.torch_block(name, index))

    def close(self) -> None:
        """Unmap every shard: the pages read so far stop counting as this process's memory once no tensor
        read from them is alive. A later read maps its shard again (a long job calls this between blocks)."""
        self._handles.clear()

    def __enter__(self) -> "ConvertedDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["CONFIG_FILE", "INDEX_FILE", "SHARD_FILE", "SHARD_FILE_RE", "FORMAT_MARKER", "FORMAT_VERSION",
           "WEIGHT_FORMATS", "SAFETENSORS_CODES", "LoadError", "ConvertedConfig", "ConvertedDir", "StoredTensor",
           "config_values", "config_text", "shard_metadata", "shard_file_name", "index_text", "read_config",
           "is_converted_dir", "is_owned_name", "check_weight_format", "grok_torch_version"]
