"""List every tensor of a raw checkpoint or a converted directory from metadata only (no data is read).

`inspect(path)` accepts a raw checkpoint (a directory holding ckpt-0/, or ckpt-0 itself; files are scanned
with the restricted pickle reader, so a malicious file is reported, never run) or a converted directory
(safetensors headers and index). Raw tensors are named by haiku path when the file count fits a Grok-1
layout (2 + 12 * layers files); names depend only on the number of layers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from convert.upstream.param_names import checkpoint_layout
from convert.upstream.raw_checkpoint import TENSOR_FILE, resolve_ckpt_dir
from convert.upstream.tensor_file import CheckpointError, scan_tensor_file
from grok_torch.converted_dir import ConvertedDir, is_converted_dir


@dataclass(frozen=True)
class TensorRow:
    name: str  # haiku path (raw) or torch name (converted)
    kind: str  # raw: array | QuantizedWeight8bit; converted: tensor | int8 weight | scales
    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # data bytes (a quantized raw file: weight + scales)
    location: str  # file name
    detail: str = ""  # e.g. "scales bfloat16[8, 1, 344]"


@dataclass(frozen=True)
class InspectReport:
    path: Path
    format: str  # "raw checkpoint" | "converted (int8)" | ...
    rows: list[TensorRow]
    files: int

    @property
    def total_bytes(self) -> int:
        return sum(row.nbytes for row in self.rows)

    @property
    def weight_elements(self) -> int:
        """Elements of weights (scales not counted): the parameter count."""
        return sum(math.prod(row.shape) for row in self.rows if row.kind != "scales")

    def bytes_by_dtype(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for row in self.rows:
            for dtype, nbytes in _dtype_bytes(row):
                totals[dtype] = totals.get(dtype, 0) + nbytes
        return dict(sorted(totals.items()))

    def to_text(self) -> str:
        header = ("name", "kind", "dtype", "shape", "bytes", "file")
        lines = [header] + [(r.name, r.kind, r.dtype, str(list(r.shape)) + (f" ({r.detail})" if r.detail else ""),
                             f"{r.nbytes:,}", r.location) for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = [f"{self.path}: {self.format}, {len(self.rows)} tensors in {self.files} files"]
        out += ["  ".join(cell.ljust(w) if i != 4 else cell.rjust(w) for i, (cell, w) in
                          enumerate(zip(line, widths))).rstrip() for line in lines]
        out.append(f"total: {len(self.rows)} tensors, {self.weight_elements:,} weight elements, "
                   f"{self.total_bytes:,} bytes ({_human(self.total_bytes)})")
        out += [f"  {dtype}: {nbytes:,} bytes ({_human(nbytes)})" for dtype, nbytes in self.bytes_by_dtype().items()]
        return "\n".join(out)

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "format": self.format, "files": self.files,
                "total_bytes": self.total_bytes, "weight_elements": self.weight_elements,
                "bytes_by_dtype": self.bytes_by_dtype(),
                "tensors": [dataclasses.asdict(row) | {"shape": list(row.shape)} for row in self.rows]}


def _dtype_bytes(row: TensorRow) -> list[tuple[str, int]]:
    if row.kind == "QuantizedWeight8bit":
        weight = math.prod(row.shape)
        return [("int8", weight), ("bfloat16", row.nbytes - weight)]
    return [(row.dtype, row.nbytes)]


def _human(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        value /= 1024
    return f"{nbytes} B"


def _raw_names(count: int) -> list[str]:
    """Haiku names of a `count`-file checkpoint, or the file names when the count fits no Grok-1 layout."""
    if count > 2 and (count - 2) % 12 == 0:
        from grok_torch.config import ConfigError, GrokConfig

        try:
            config = dataclasses.replace(GrokConfig.from_name("tiny"), num_layers=(count - 2) // 12)
        except ConfigError:  # more layers than any Grok config may have
            return [TENSOR_FILE.format(index=i) for i in range(count)]
        return [entry.haiku_name for entry in checkpoint_layout(config)]
    return [TENSOR_FILE.format(index=i) for i in range(count)]


_FILE_RE = re.compile(r"^tensor(\d{5})_000$")


def inspect_raw(path: str | os.PathLike) -> InspectReport:
    ckpt_dir = resolve_ckpt_dir(path)
    files = sorted(p for p in ckpt_dir.iterdir() if _FILE_RE.match(p.name))
    indices = [int(_FILE_RE.match(p.name).group(1)) for p in files]
    if indices != list(range(len(files))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise CheckpointError(f"{ckpt_dir}: file(s) {', '.join(TENSOR_FILE.format(index=i) for i in missing[:5])} "
                              f"missing from the sequence")
    names = _raw_names(len(files))
    rows = []
    for name, file in zip(names, files):
        info = scan_tensor_file(file)
        detail = f"scales {info.scales.dtype}{list(info.scales.shape)}" if info.quantized else ""
        rows.append(TensorRow(name, "QuantizedWeight8bit" if info.quantized else "array", info.dtype,
                              info.shape, info.nbytes, file.name, detail))
    return InspectReport(ckpt_dir, "raw checkpoint", rows, len(files))


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def inspect_converted(path: str | os.PathLike) -> InspectReport:
    opened = ConvertedDir(path)
    directory, weight_format, stored = opened.path, opened.config.weight_format, opened.tensors
    rows = []
    for name in sorted(stored, key=_natural_key):
        tensor = stored[name]
        if name.endswith(".scales"):
            kind = "scales"
        elif name.endswith(".weight") and name[: -len("weight")] + "scales" in stored:
            kind = "int8 weight"
        else:
            kind = "tensor"
        rows.append(TensorRow(name, kind, tensor.dtype, tensor.shape, tensor.nbytes, tensor.file.name))
    kept = sum(row.kind == "int8 weight" for row in rows)
    if weight_format != "int8" and kept:  # bf16: the MoE down projections keep their exact product
        weight_format += f"; {kept} exact-product linear(s) kept int8 + scales"
    return InspectReport(directory, f"converted ({weight_format})", rows, len({t.file for t in stored.values()}))


def inspect(path: str | os.PathLike) -> InspectReport:
    """Report of every tensor (name, kind, dtype, shape, bytes) and totals, for either format."""
    if is_converted_dir(path):
        return inspect_converted(path)
    return inspect_raw(path)
