"""The converted directory: the one on-disk format that grok-torch writes and reads back.

A converted directory holds

- `model-0000k-of-0000N.safetensors`: the tensors, in grok_torch's names and layout; each shard's
  `__metadata__` holds `format: "pt"` (what safetensors tooling expects), `weight_format`, `source` and
  `grok_torch_version`;
- `model.safetensors.index.json`: `{"metadata": {"total_size": <data bytes>, "weight_format": ...,
  "sha256": {file name: sha256 of the file, for every shard and config.json}}, "weight_map": {tensor name:
  shard file}}` (written for one shard too; directories written before the sha256 were recorded load, but
  cannot be verified);
- `tokenizer.model`: the release's tokenizer, when convert found one beside the source (its sha256 and
  origin are in config.json's "tokenizer");
- `config.json`:

      {
        "format": "grok-torch-converted",        # marks a directory grok-torch wrote
        "format_version": 1,
        "weight_format": "int8" | "bf16" | "bf16-plain" | "fp32",   # grok_torch.weight_layouts
        "grok_torch_version": "0.1.0",
        "source": "/abs/path/to/ckpt-0",
        "grok_config": {...GrokConfig.to_dict()...},
        "quantized": {"layers.0.attn.q_proj.weight": true, ...},  # every linear weight: int8+scales or not
                                                   # (bf16: true for the MoE down projections only)
        "tokenizer": {"file": "tokenizer.model", "sha256": "...", "source": "/abs/path"} | null
      }

This module owns the names and the contents of those files. Writers (the converter) take the names,
`config_values`, `shard_metadata` and `index_text` from here; every reader (`grok_torch.load`, inspect,
verify, the exporters) opens a directory with `ConvertedDir`, the one strict reader: a directory is untrusted
input (downloaded from a hub, say), so everything in it is checked before a tensor is handed out (see
ConvertedDir). Every refusal is a `LoadError` naming the file, and the tensor or field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from grok_torch.config import ConfigError, GrokConfig
from grok_torch.dtypes import SAFETENSORS_CODES, SAFETENSORS_NAMES, dtype_name, numpy_dtype, torch_to_numpy
from grok_torch.untrusted_files import parse_json, read_json, require_regular_file, type_name
from grok_torch.weight_layouts import KEEPS_EXACT_PRODUCTS, exact_product_weights, keeps_exact_products

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"  # the release's SentencePiece model, copied by convert when found
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{index:05d}-of-{count:05d}.safetensors"
SHARD_FILE_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
FORMAT_MARKER = "grok-torch-converted"
FORMAT_VERSION = 1
WEIGHT_FORMATS = ("int8", "bf16", "bf16-plain", "fp32")  # grok_torch.weight_layouts says what each holds
INDEX_SHA256 = "sha256"  # the index metadata's key of {file name: sha256} (every shard and config.json)


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
    converter's: {"weight_format": ..., INDEX_SHA256: {file name: sha256}}) joins total_size."""
    index = {"metadata": {"total_size": total_size, **(metadata or {})}, "weight_map": weight_map}
    return json.dumps(index, indent=2) + "\n"


def sha256_file(path: str | os.PathLike, on_bytes: Callable[[int], None] | None = None, block: int = 16 << 20) -> str:
    """sha256 of a file's bytes, read in blocks (`on_bytes(n)` after each, for a progress bar)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(block):
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return digest.hexdigest()


# ---- reading: everything checked before a tensor is handed out --------------------------------------------------

# (name, Python type(s), what it must be) of config.json's top-level fields; grok_config and quantized are
# checked below, unknown fields are ignored (a later version's additions).
_CONFIG_FIELDS = (("format_version", int, "an integer"), ("weight_format", str, "a string"),
                  ("grok_torch_version", str, "a string"), ("source", (str, type(None)), "a string or null"),
                  ("grok_config", dict, "an object"), ("quantized", dict, "an object"))
_TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}  # of a tensor's entry in a safetensors header
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FLOAT_WEIGHT_DTYPES = {"bf16": ("bfloat16",), "bf16-plain": ("bfloat16",), "fp32": ("float32",)}  # a float
# linear weight, per weight_format
_OTHER_DTYPES = ("float32", "bfloat16")  # embedding, norms, router: what the model computes with


@dataclass(frozen=True)
class ConvertedConfig:
    """A converted directory's config.json, checked: the model config and how its weights are stored."""

    path: Path
    weight_format: str
    config: GrokConfig
    quantized: dict[str, bool]
    source: str | None
    values: dict[str, Any]  # the whole file
    sha256: str = ""  # of the file's bytes as read


def _type_error(path: Path, field: str, expected: str, value: Any) -> LoadError:
    return LoadError(f"{path}: {field}: expected {expected}, got {type_name(value)} {value!r}"[:400])


def read_config(directory: str | os.PathLike) -> ConvertedConfig:
    """The config.json of a converted directory, checked field by field; LoadError naming file and field."""
    path = Path(directory) / CONFIG_FILE
    values, data = read_json(path, "converted directory's config", LoadError,
                             when_missing="not a converted grok-torch directory")
    if not isinstance(values, dict):
        raise LoadError(f"{path}: not a JSON object ({type_name(values)}); not a converted grok-torch directory")
    if values.get("format") != FORMAT_MARKER:
        raise LoadError(f"{path}: not a grok-torch converted directory (no \"format\": \"{FORMAT_MARKER}\")")
    for field, types, expected in _CONFIG_FIELDS:
        value = values.get(field)
        if field not in values or isinstance(value, bool) or not isinstance(value, types):
            raise _type_error(path, field, expected, value)
    if not 1 <= values["format_version"] <= FORMAT_VERSION:
        raise LoadError(f"{path}: format_version {values['format_version']}; this grok-torch reads 1.."
                        f"{FORMAT_VERSION} (a newer grok-torch wrote it?)")
    if values["weight_format"] not in WEIGHT_FORMATS:
        raise LoadError(f"{path}: weight_format {values['weight_format']!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    try:
        config = GrokConfig.from_dict(values["grok_config"])
    except ConfigError as err:
        raise LoadError(f"{path}: grok_config.{err.field}: {err.problem}" if err.field
                        else f"{path}: grok_config: {err}") from None
    quantized = values["quantized"]
    for name, value in quantized.items():
        if not isinstance(value, bool):
            raise _type_error(path, f"quantized[{name!r}]", "true or false", value)
        if value and values["weight_format"] not in ("int8", *KEEPS_EXACT_PRODUCTS):
            raise LoadError(f"{path}: quantized[{name!r}] is true in a {values['weight_format']} directory "
                            f"(only int8 and bf16 directories store int8 + scales)")
    tokenizer = values.get("tokenizer")  # written since the converter copies the tokenizer: optional
    sha256 = tokenizer.get("sha256") if isinstance(tokenizer, dict) else None
    if tokenizer is not None and not (isinstance(sha256, str) and _SHA256_RE.match(sha256)
                                      and tokenizer.get("file") == TOKENIZER_FILE):
        raise _type_error(path, "tokenizer", f"null or {{\"file\": \"{TOKENIZER_FILE}\", \"sha256\": <64 hex "
                          f"digits>, ...}}", tokenizer)
    return ConvertedConfig(path, values["weight_format"], config, quantized, values["source"], values,
                           hashlib.sha256(data).hexdigest())


def is_converted_dir(path: str | os.PathLike) -> bool:
    """Whether `path` claims to be a converted directory (config.json and the index are there, whatever
    they are: ConvertedDir checks them)."""
    return os.path.lexists(Path(path) / CONFIG_FILE) and os.path.lexists(Path(path) / INDEX_FILE)


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


@dataclass(frozen=True)
class ExpectedTensor:
    """What the model needs under one name: the dtypes it takes there and the shape."""

    dtypes: tuple[str, ...]
    shape: tuple[int, ...]


def _model_spec(config: GrokConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of the state dict of `config`'s model with int8 linears, from the model itself
    (built on the meta device: no memory)."""
    from grok_torch.model import Grok

    return {name: (dtype_name(t.dtype), tuple(t.shape))
            for name, t in Grok(config, weights="int8", device="meta").state_dict().items()}


def quantizable_weights(spec: dict[str, tuple[str, tuple[int, ...]]]) -> set[str]:
    """The linear weights that can be stored as int8 + scales (what `quantized` must name)."""
    return {_weight_of(name) for name in spec if name.endswith(".scales")}


def expected_tensors(config: GrokConfig, weight_format: str, quantized: dict[str, bool],
                     spec: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> dict[str, ExpectedTensor]:
    """Every tensor of a converted directory of `config`: names and shapes as the model has them, dtypes from
    `weight_format` and `quantized` (which linear weights are int8 + scales; it must name each of
    `quantizable_weights`). `spec`: `_model_spec(config)`, if already built."""
    spec = _model_spec(config) if spec is None else spec
    float_dtypes = _FLOAT_WEIGHT_DTYPES.get(weight_format, ("bfloat16", "float32"))
    expected = {}
    for name, (_, shape) in spec.items():
        if name.endswith(".scales"):
            if quantized[_weight_of(name)]:
                expected[name] = ExpectedTensor(("bfloat16",), shape)
        elif name in quantized:  # a linear weight that can be int8 + scales
            expected[name] = ExpectedTensor(("int8",) if quantized[name] else float_dtypes, shape)
        else:
            expected[name] = ExpectedTensor(_OTHER_DTYPES, shape)
    return expected


def _check_exact_products_only(path: Path, config: GrokConfig, quantized: dict[str, bool]) -> None:
    """A bf16 directory keeps int8 + scales for the exact-product linears (the MoE down projections) only."""
    from grok_torch.model import Grok

    exact = exact_product_weights(Grok(config, weights="int8", device="meta"))
    wrong = sorted(name for name, value in quantized.items() if value and name not in exact)
    if wrong:
        raise LoadError(f"{path}: quantized is true for {_short_list(wrong)} in a bf16 directory, which keeps "
                        f"int8 + scales only for the MoE down projections")


def _weight_of(scales_name: str) -> str:
    return scales_name[: -len("scales")] + "weight"


def _scales_of(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "scales"


def _shown(name: str) -> str:
    """A name read from a file, fit for a one-line message (shortened; quoted if it is not plain text)."""
    return name[:200] if name.isprintable() else repr(name[:200])


def _short_list(names: list[str], limit: int = 5) -> str:
    return ", ".join(map(_shown, names[:limit])) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class _Index:
    weight_map: dict[str, str]
    metadata: dict[str, Any]
    sha256: dict[str, str] | None  # file name -> sha256 recorded by the writer, if any


def _read_index(directory: Path, weight_format: str) -> _Index:
    path = directory / INDEX_FILE
    index, _ = read_json(path, "safetensors index", LoadError, when_missing="not a converted grok-torch directory")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise LoadError(f"{path}: not a safetensors index (no \"weight_map\" of tensor name -> file)")
    metadata = index.get("metadata")
    if not isinstance(metadata, dict):
        raise _type_error(path, "metadata", "an object", metadata)
    total = metadata.get("total_size")
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise _type_error(path, "metadata.total_size", "a byte count", total)
    if metadata.get("weight_format") != weight_format:
        raise LoadError(f"{path}: metadata.weight_format {metadata.get('weight_format')!r}, but {CONFIG_FILE} says "
                        f"{weight_format!r}")
    for file_name in set(weight_map.values()):
        if not SHARD_FILE_RE.match(file_name):
            raise LoadError(f"{path}: weight_map names {file_name[:200]!r}, not a shard file name "
                            f"(model-0000k-of-0000N.safetensors in this directory)")
    sha256 = metadata.get("sha256")
    if sha256 is not None:
        if not isinstance(sha256, dict) or not all(isinstance(v, str) and _SHA256_RE.match(v) for v in sha256.values()):
            raise _type_error(path, "metadata.sha256", "an object of file name -> sha256 (64 hex digits)", sha256)
    return _Index(weight_map, metadata, sha256)


def _shard_sequence(index_path: Path, files: set[str]) -> list[str]:
    """The shard files named by the index, checked to be model-00001-of-N ... model-N-of-N, all of them."""
    if not files:
        raise LoadError(f"{index_path}: weight_map is empty; a converted directory lists every tensor there")
    counts = {int(name[-17:-12]) for name in files}  # "model-00001-of-00008.safetensors" -> 8
    if len(counts) != 1:
        raise LoadError(f"{index_path}: weight_map names shards of {len(counts)} different counts "
                        f"({_short_list(sorted(files))}); one conversion writes model-k-of-N for one N")
    count = counts.pop()
    expected = [shard_file_name(number, count) for number in range(1, count + 1)]
    missing = sorted(set(expected) - files)
    if missing:
        raise LoadError(f"{index_path}: {_short_list(missing)} is missing from weight_map: the shards of one "
                        f"conversion are model-00001-of-N ... model-N-of-N, all of them")
    return expected


class ConvertedDir:
    """A converted directory opened for reading: its config, its index and every shard's header, checked
    against each other and against the model the config describes.

    Checked when opened (each refusal a LoadError naming the file, and the tensor or field): config.json and
    the index field by field (types, ranges; no key twice; only regular files, at most 16 MiB); config.json
    against the sha256 the converter recorded in the index (a changed config is reported as tampered); the
    shards are model-00001-of-N ... model-N-of-N, regular files, holding at least a byte per weight the config
    describes (before anything is built for it); every tensor the model needs and no other, under the name,
    dtype and shape the model expects there (int8 + bf16 scales exactly where `quantized` says so); each
    shard's header through the safetensors library (offsets covering the data exactly, no overlap or hole),
    plus no key twice in it and no unknown field; every tensor in the shard the index maps it to. With
    `verify=True` every shard's sha256 is checked too (reading all of them).

    Tensors are read through the safetensors library: `tensor(name)` is a view of a private memory map of
    its shard (nothing read until used), `block(name, index)` reads one block as numpy (bf16 as
    ml_dtypes.bfloat16), `torch_block(name, index)` the same as a torch tensor.
    """

    def __init__(self, directory: str | os.PathLike, *, verify: bool = False, progress: bool | None = False):
        self.path = Path(directory)
        if not self.path.is_dir():
            raise LoadError(f"{self.path}: not a directory (expected a converted grok-torch directory)")
        self.config = read_config(self.path)
        index = _read_index(self.path, self.config.weight_format)
        self.weight_map = index.weight_map
        self.recorded_sha256 = index.sha256
        self._index_metadata = index.metadata
        shard_names = _shard_sequence(self.path / INDEX_FILE, set(self.weight_map.values()))
        if self.recorded_sha256 is not None and set(self.recorded_sha256) != {CONFIG_FILE, *shard_names}:
            wrong = sorted(set(self.recorded_sha256) ^ {CONFIG_FILE, *shard_names})
            raise LoadError(f"{self.path / INDEX_FILE}: metadata.sha256 must list {CONFIG_FILE} and every shard, "
                            f"exactly; it differs on {_short_list(wrong)}")
        sizes = {name: require_regular_file(self.path / name, "shard file", LoadError,
                                            f"the shard file is named in {INDEX_FILE}").st_size
                 for name in shard_names}
        if self.recorded_sha256 is not None and self.recorded_sha256[CONFIG_FILE] != self.config.sha256:
            raise LoadError(f"{self.path}: {CONFIG_FILE} does not match the sha256 recorded in {INDEX_FILE}: it was "
                            f"changed after grok-torch wrote it (tampered or corrupted); refusing to use it")
        self._check_size(sum(sizes.values()))
        self.expected = self._expected()
        self._handles: dict[str, Any] = {}
        self.shard_metadata: dict[str, dict[str, str]] = {}
        self.tensors: dict[str, StoredTensor] = {}
        for file_name in shard_names:
            self._read_shard(file_name)
        indexed = set(shard_names)
        unindexed = sorted(p.name for p in self.path.iterdir() if SHARD_FILE_RE.match(p.name) and p.name not in indexed)
        if unindexed:
            raise LoadError(f"{self.path}: shard file(s) {', '.join(unindexed)} are not in {INDEX_FILE}")
        stored = sum(t.nbytes for t in self.tensors.values())
        if index.metadata["total_size"] != stored:
            raise LoadError(f"{self.path / INDEX_FILE}: metadata.total_size {index.metadata['total_size']} but the "
                            f"shards hold {stored} bytes")
        if verify:
            mismatches = self.checksum_mismatches(progress)
            if mismatches:
                more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
                raise LoadError(mismatches[0] + more)

    def _check_size(self, shard_bytes: int) -> None:
        """The model the config describes must fit the shards' bytes, and its tensor count the index's, before
        the model is built to learn its names (so a config of 10**4 wide layers costs nothing to refuse)."""
        config = self.config.config
        try:
            config.check_stored_bytes(shard_bytes, f"the {len(set(self.weight_map.values()))} shard file(s)")
        except ConfigError as err:
            raise LoadError(f"{self.config.path}: grok_config: {err}") from None
        least = 2 + 12 * config.num_layers  # embedding, final norm; per layer 7 linears, 4 norms, the router
        if len(self.weight_map) < least:
            raise LoadError(f"{self.path / INDEX_FILE}: weight_map lists {len(self.weight_map)} tensors; a model of "
                            f"{config.num_layers} layers has at least {least}")

    def _expected(self) -> dict[str, ExpectedTensor]:
        config, quantized = self.config.config, self.config.quantized
        spec = _model_spec(config)
        scaled = quantizable_weights(spec)
        if set(quantized) != scaled:
            wrong = sorted(set(quantized) ^ scaled)
            raise LoadError(f"{self.config.path}: quantized must name every linear weight of the model, exactly; it "
                            f"differs on {_short_list(wrong)}")
        index_path = self.path / INDEX_FILE
        if keeps_exact_products(self.config.weight_format):
            _check_exact_products_only(self.config.path, config, quantized)
        for name in sorted(scaled):
            if _scales_of(name) in self.weight_map and not quantized[name]:
                raise LoadError(f"{index_path}: {name} is stored as int8 + scales, but {CONFIG_FILE}'s quantized map "
                                f"says it is not")
            if _scales_of(name) not in self.weight_map and quantized[name] and name in self.weight_map:
                raise LoadError(f"{index_path}: {name} is stored without its scales, but {CONFIG_FILE}'s quantized "
                                f"map says int8 + scales")
        expected = expected_tensors(config, self.config.weight_format, quantized, spec)
        missing = sorted(set(expected) - set(self.weight_map))
        unexpected = sorted(set(self.weight_map) - set(expected))
        if missing or unexpected:
            raise LoadError(f"{index_path}: " + "; ".join(part for part in (
                f"tensor(s) the model needs are missing: {_short_list(missing)}" if missing else "",
                f"tensor(s) the model does not have: {_short_list(unexpected)}" if unexpected else "") if part))
        return expected

    def _read_shard(self, file_name: str) -> None:
        from safetensors import SafetensorError, safe_open

        path = self.path / file_name
        try:
            handle = safe_open(str(path), framework="pt")
            names = list(handle.keys())
            metadata = handle.metadata() or {}
            stored = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in
                      ((name, handle.get_slice(name)) for name in names)}
        except (SafetensorError, OSError) as err:
            raise LoadError(f"{path}: not a valid safetensors file: {err}") from None
        self._check_header_json(path, set(names))
        if metadata.get("weight_format") != self.config.weight_format:
            raise LoadError(f"{path}: __metadata__ says weight_format {metadata.get('weight_format')!r}, but "
                            f"{CONFIG_FILE} says {self.config.weight_format!r}")
        self.shard_metadata[file_name] = metadata
        for name, (code, shape) in stored.items():
            if self.weight_map.get(name) != file_name:
                raise LoadError(f"{path}: holds {name[:200]!r}, which the index maps to {self.weight_map.get(name)!r}")
            if code not in SAFETENSORS_NAMES:
                raise LoadError(f"{path}: tensor {name} has dtype {code}, which grok-torch does not store")
            dtype, expected = SAFETENSORS_NAMES[code], self.expected[name]
            if dtype not in expected.dtypes:
                raise LoadError(f"{path}: tensor {name} is {dtype}; the model expects {' or '.join(expected.dtypes)} "
                                f"there")
            if shape != expected.shape:
                raise LoadError(f"{path}: tensor {name} has shape {list(shape)}; the model expects shape "
                                f"{list(expected.shape)}")
            self.tensors[name] = StoredTensor(name, dtype, shape, path)
        missing = sorted(name for name, file in self.weight_map.items() if file == file_name and name not in stored)
        if missing:
            raise LoadError(f"{path}: the index maps {_short_list(missing)} to this shard, which does not hold "
                            f"{'it' if len(missing) == 1 else 'them'}")
        self._handles[file_name] = handle

    @staticmethod
    def _check_header_json(path: Path, names: set[str]) -> None:
        """What the library lets through: a key twice in the header (it keeps one of them; another reader may
        keep the other) and unknown fields in a tensor's entry. The header was validated by the library, so
        its length is sane; it is read again here as JSON, not parsed as safetensors a second time."""
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = parse_json(f.read(length), path, "safetensors header", LoadError)
        if not isinstance(header, dict) or set(header) - {"__metadata__"} != names:
            raise LoadError(f"{path}: not a valid safetensors file: the header's names differ from the library's")
        for name in names:
            extra = sorted(set(header[name]) - _TENSOR_FIELDS) if isinstance(header[name], dict) else []
            if extra:
                raise LoadError(f"{path}: tensor {_shown(name)}: unknown field(s) {_short_list(extra)} in its header "
                                f"entry (safetensors has dtype, shape and data_offsets)")

    # -- integrity
    def checksum_mismatches(self, progress: bool | None = False) -> list[str]:
        """Each file whose sha256 differs from the one the converter recorded: every shard (in the index) and
        the copied tokenizer.model (in config.json), reading each; config.json itself was checked when the
        directory was opened. LoadError if the index records nothing."""
        if self.recorded_sha256 is None:
            raise LoadError(f"{self.path / INDEX_FILE} records no sha256 of the files (written by an older "
                            f"grok-torch); there is nothing to verify the directory against")
        from grok_torch.progress import progress_bar

        recorded = {name: (self.recorded_sha256[name], INDEX_FILE) for name in sorted(set(self.weight_map.values()))}
        tokenizer = self.config.values.get("tokenizer")
        if tokenizer is not None:  # the copied tokenizer.model: its sha256 is in config.json (itself checked)
            recorded[TOKENIZER_FILE] = (tokenizer["sha256"], CONFIG_FILE)
        mismatches = []
        for name in list(recorded):
            path = self.path / name
            try:
                require_regular_file(path, "recorded file", LoadError, f"{recorded[name][1]} records its sha256")
            except LoadError as err:
                mismatches.append(str(err))
                del recorded[name]
        total = sum((self.path / name).stat().st_size for name in recorded)
        with progress_bar(total, "verify sha256", progress) as bar:
            for name, (expected, where) in recorded.items():
                actual = sha256_file(self.path / name, bar.update)
                if actual != expected:
                    mismatches.append(f"{self.path / name}: sha256 {actual} does not match the one recorded in "
                                      f"{where} ({expected}): the file changed after grok-torch wrote it")
        return mismatches

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
           "ExpectedTensor", "config_values", "config_text", "shard_metadata", "shard_file_name", "index_text",
           "read_config", "is_converted_dir", "is_owned_name", "check_weight_format", "grok_torch_version",
           "expected_tensors", "sha256_file", "INDEX_SHA256"]
