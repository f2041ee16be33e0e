"""Export a converted directory or a grok_torch state dict back to the official raw checkpoint layout.

`dst/ckpt-0/tensor{i:05d}_000`, one pickle per parameter (with `dst/config.json` in upstream field names and,
from a converted directory that has one, `dst/tokenizer.model` beside it) in `checkpoint_layout` order, exactly as upstream's
checkpoint code writes them (protocol 4, see convert.upstream.pickle_writer):

- a linear weight that has scales (int8 `[..., out, in]` + bf16 `[..., out, G]`) becomes a pickled
  `__main__.QuantizedWeight8bit(weight=int8 [..., in, out], scales=bf16 [..., G, out])`; from an int8
  directory converted from the official checkpoint the files are byte-identical to the original ones;
- a linear weight without scales (a bf16-plain/fp32 directory, a bf16 one except its MoE down projections,
  or a float state dict) becomes a plain bf16/fp32 array `[..., in, out]`. Upstream's code loads these, but its MoE only runs quantized experts (with plain
  expert weights it returns its input), so only an int8 export reproduces upstream's model;
- embeddings, norms and the router become fp32 arrays (bf16 input is widened, exactly).

Everything is checked (names, dtypes, shapes) before anything is written; the output is assembled beside
`dst` and renamed into place only when complete.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from convert.disk.blocks import nbytes_of
from convert.disk.output_dir import Destination
from convert.upstream.layouts import scales_to_haiku
from convert.upstream.param_names import ParamEntry, checkpoint_layout
from convert.upstream.pickle_writer import write_array_pickle, write_quantized_pickle
from convert.upstream.raw_checkpoint import PROBLEMS_SHOWN, TENSOR_FILE
from grok_torch.converted_dir import CONFIG_FILE, TOKENIZER_FILE, ConvertedDir
from grok_torch.dtypes import numpy_dtype, torch_to_numpy
from grok_torch.progress import progress_bar

if TYPE_CHECKING:
    from grok_torch.config import GrokConfig


class ExportError(ValueError):
    """The source cannot be exported: missing, extra or mis-shaped tensors, or an inconsistent config."""


PLAIN_LINEAR_DTYPES = ("bfloat16", "float32")
NON_LINEAR_DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class ExportResult:
    dst: Path
    files: int
    quantized: int  # files written as QuantizedWeight8bit
    plain_linear: int  # linear weights written as plain float arrays


# ---- sources ------------------------------------------------------------------------------------------------

def _to_numpy(name: str, value) -> np.ndarray:
    """numpy array or torch tensor (any device; bf16 kept bit-exact via ml_dtypes) -> numpy array."""
    if isinstance(value, np.ndarray):
        return value
    import torch

    if isinstance(value, torch.Tensor):
        return torch_to_numpy(value)
    raise ExportError(f"tensor {name}: a {type(value).__name__}; expected a numpy array or torch tensor")


class _Source:
    """name -> (dtype name, shape) without data, and name -> numpy array on demand."""

    def __init__(self, description: str, specs: dict[str, tuple[str, tuple[int, ...]]], load):
        self.description, self.specs, self.load = description, specs, load


def _dir_source(directory: ConvertedDir) -> _Source:
    specs = {name: (t.dtype, t.shape) for name, t in directory.tensors.items()}
    return _Source(str(directory.path), specs, directory.block)


def _mapping_source(state_dict: Mapping[str, object]) -> _Source:
    arrays = {name: _to_numpy(name, value) for name, value in state_dict.items()}
    specs = {name: (a.dtype.name, tuple(a.shape)) for name, a in arrays.items()}
    return _Source("the state dict", specs, arrays.__getitem__)


# ---- plan -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _FilePlan:
    entry: ParamEntry
    quantized: bool
    dtype: str  # of the (haiku) array or the int8 weight


def _plan(source: _Source, config: "GrokConfig", strict: bool) -> list[_FilePlan]:
    layout = checkpoint_layout(config)
    problems, plans = [], []
    for entry in layout:
        spec = source.specs.get(entry.torch_name)
        scales = source.specs.get(entry.torch_scales_name) if entry.quantizable else None
        if spec is None:
            problems.append(f"tensor {entry.torch_name} ({entry.haiku_name}) is missing")
            continue
        dtype, shape = spec
        if shape != entry.torch_shape:
            problems.append(f"tensor {entry.torch_name}: shape {list(shape)}, expected {list(entry.torch_shape)}")
        elif scales is not None:
            if dtype != "int8":
                problems.append(f"tensor {entry.torch_name}: {dtype} with scales; expected int8")
            elif scales != ("bfloat16", entry.torch_scales_shape):
                problems.append(f"tensor {entry.torch_scales_name}: {scales[0]}{list(scales[1])}, expected "
                                f"bfloat16{list(entry.torch_scales_shape)}")
        elif dtype == "int8":
            problems.append(f"tensor {entry.torch_name}: int8 without {entry.torch_scales_name}")
        elif dtype not in (PLAIN_LINEAR_DTYPES if entry.quantizable else NON_LINEAR_DTYPES):
            problems.append(f"tensor {entry.torch_name}: dtype {dtype}, expected bfloat16 or float32")
        plans.append(_FilePlan(entry, scales is not None, dtype))
    known = {e.torch_name for e in layout} | {e.torch_scales_name for e in layout if e.quantizable}
    extra = sorted(set(source.specs) - known)
    if extra and strict:
        problems.append(f"{len(extra)} tensor(s) that Grok-1 does not have: {', '.join(extra[:5])}"
                        + (" ..." if len(extra) > 5 else "") + " (strict=False skips them)")
    if problems:
        raise ExportError(f"cannot export {source.description}: " + "; ".join(problems[:PROBLEMS_SHOWN])
                          + (f"; ... and {len(problems) - PROBLEMS_SHOWN} more" if len(problems) > PROBLEMS_SHOWN else ""))
    return plans


def check_converted(directory: ConvertedDir, strict: bool = True) -> list[_FilePlan]:
    """Every parameter of a converted directory (entry, whether it is int8 + scales, its dtype), checked as an
    export checks them: names, dtypes and shapes against its config; ExportError listing the problems."""
    return _plan(_dir_source(directory), directory.config.config, strict)


# ---- write ----------------------------------------------------------------------------------------------------

def _write_file(path: Path, plan: _FilePlan, source: _Source) -> int:
    """Write one parameter's pickle; returns its payload bytes."""
    entry = plan.entry
    weight = entry.to_haiku(source.load(entry.torch_name))  # a transposed view; written block by block
    with open(path, "xb") as file:
        if plan.quantized:
            scales = scales_to_haiku(source.load(entry.torch_scales_name))
            write_quantized_pickle(file, weight, scales)
            return weight.nbytes + scales.nbytes
        if not entry.quantizable and weight.dtype != np.float32:
            weight = weight.astype(np.float32)  # upstream keeps embeddings, norms and router in fp32
        write_array_pickle(file, weight)
        return weight.nbytes


def _resolve_config(src: "Mapping | ConvertedDir", config: "GrokConfig | None") -> "GrokConfig":
    if isinstance(src, Mapping):
        if config is None:
            raise ExportError("exporting a state dict needs its GrokConfig (config=...)")
        return config
    stored = src.config.config
    if config is not None and config != stored:
        raise ExportError(f"{src.path}: the config given differs from the directory's config.json in "
                          f"{'; '.join(config.differences(stored))}")
    return stored


def export_upstream(src: str | os.PathLike | Mapping[str, object], dst: str | os.PathLike,
                    config: "GrokConfig | None" = None, overwrite: bool = False, progress: bool | None = None,
                    strict: bool = True) -> ExportResult:
    """Converted directory (its config.json gives the config) or state dict {torch name: tensor} (needs
    `config`) -> `dst/ckpt-0/` in the official format. Raises ExportError / DestinationError before writing
    (an existing `dst` is replaced, with `overwrite`, only if grok-torch wrote it; another run on `dst` is
    refused); OutOfSpaceError if the disk fills up (bytes, inodes or quota), leaving nothing."""
    is_mapping = isinstance(src, Mapping)
    with Destination(dst, None if is_mapping else src, overwrite=overwrite, what="export-upstream") as target:
        directory = None if is_mapping else ConvertedDir(src)
        config = _resolve_config(src if is_mapping else directory, config)
        source = _mapping_source(src) if is_mapping else _dir_source(directory)
        plans = _plan(source, config, strict)
        total = sum(_payload_bytes(source, p) for p in plans)
        with target.staged() as partial, progress_bar(total, "export-upstream", progress) as bar:
            ckpt = partial / "ckpt-0"
            ckpt.mkdir()
            for plan in plans:
                bar.update(_write_file(ckpt / TENSOR_FILE.format(index=plan.entry.index), plan, source))
            # Beside ckpt-0, as a release has them: converting this back finds its config and tokenizer.
            config.save_json(partial / CONFIG_FILE)
            if directory is not None and (directory.path / TOKENIZER_FILE).is_file():
                shutil.copyfile(directory.path / TOKENIZER_FILE, partial / TOKENIZER_FILE)
    dst = target.path
    return ExportResult(dst, len(plans), sum(p.quantized for p in plans),
                        sum(p.entry.quantizable and not p.quantized for p in plans))


def _payload_bytes(source: _Source, plan: _FilePlan) -> int:
    """Bytes of array data the file will hold (for the progress bar)."""
    names = [plan.entry.torch_name] + ([plan.entry.torch_scales_name] if plan.quantized else [])
    total = 0
    for name in names:
        dtype, shape = source.specs[name]
        total += nbytes_of(shape, numpy_dtype(dtype if plan.entry.quantizable else "float32"))
    return total
