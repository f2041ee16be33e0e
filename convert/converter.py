"""Convert the official raw checkpoint to a grok-torch directory of sharded safetensors.

Output formats (`weight_format`):

- `int8`: every quantized linear keeps its int8 weight and bf16 scales bit for bit, in the torch layout:
  weight `[..., out, in]` under `ParamEntry.torch_name`, scales `[..., out, G]` under `torch_scales_name`.
  A linear weight stored unquantized (a plain bf16/fp32 array) is kept as it is, without scales.
- `bf16`: linear weights dequantized (`dequantize_torch_layout`, exact in fp32) and rounded once to bf16 -
  upstream's own `weight.astype(bf16) * scales`, bit for bit; plain float weights are rounded to bf16.
- `fp32`: linear weights dequantized to the values upstream computes with, held in fp32: `bf16(int8 x
  scales)` widened, except the MoE down projection (`moe/linear_1`), whose exact int8 x bf16 products
  upstream feeds to an fp32 matmul (measured on the golden reference); plain float weights widened.

Embeddings, RMSNorm scales and the router keep their stored fp32 in every format.

A converted directory holds `model-0000k-of-0000N.safetensors`, `model.safetensors.index.json` and
`config.json`:

    {
      "format": "grok-torch-converted",        # marks a directory this module wrote
      "format_version": 1,
      "weight_format": "int8" | "bf16" | "fp32",
      "grok_torch_version": "0.1.0",
      "source": "/abs/path/to/ckpt-0",
      "grok_config": {...GrokConfig.to_dict()...},   # GrokConfig.from_json reads this directly
      "quantized": {"layers.0.attn.q_proj.weight": true, ...}   # every linear weight: int8+scales or not
    }

Each shard's `__metadata__` holds `format: "pt"` (what safetensors tooling expects), `weight_format`,
`source` and `grok_torch_version`.

`convert_checkpoint` validates the whole source from metadata first (nothing is written if any file is
missing, extra, malformed, unsafe or of the wrong shape/dtype), checks the free space, then streams one
parameter at a time into `.<dst name>.partial` beside the destination, renamed into place only when
complete. Each raw file is mapped, not copied, while `convert.read_ahead` keeps the disk reading the next
ones; blocks are transposed into one reused buffer and written by `convert.shard_file` (O_DIRECT, on a
writer thread). That directory's journal records each finished shard's size and sha256, so an interrupted run
can be resumed (convert.resume); on an error or a full disk it is removed.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import ml_dtypes
import numpy as np

from convert.blocks import CHUNK_BYTES, Scratch, block_indices, contiguous, import_torch_in_background, nbytes_of
from convert.layouts import dequantize_torch_layout, scales_to_torch
from convert.output_dir import check_destination
from convert.param_names import ParamEntry
from convert.quantized import QuantizedWeight8bit
from convert.read_ahead import ReadAhead
from convert.raw_checkpoint import (TensorFileInfo, numpy_dtype, read_tensor_file, resolve_ckpt_dir,
                                    validate_raw_checkpoint)
from convert.resume import PartialOutput
from convert.safetensors_io import (DEFAULT_MAX_SHARD_SIZE, INDEX_FILE, SHARD_FILE_RE, TensorToWrite, index_text,
                                    plan_shard_files, shard_header, write_sharded_safetensors)

if TYPE_CHECKING:
    from grok_torch.config import GrokConfig

WEIGHT_FORMATS = ("int8", "bf16", "fp32")
FLOAT_FORMAT_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
CONFIG_FILE = "config.json"
FORMAT_MARKER = "grok-torch-converted"
FORMAT_VERSION = 1


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


# ---- per-parameter conversion ----------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the converted state dict, planned from metadata: name, dtype, torch shape, and how it is
    made from the parameter's raw value (`op`: copy | cast | dequantize; `role`: array | weight | scales)."""

    entry: ParamEntry
    name: str
    role: str
    op: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, numpy_dtype(self.dtype))

    def render(self, value: np.ndarray | QuantizedWeight8bit, index: tuple = (...,),
               scratch: Scratch | None = None) -> np.ndarray:
        """The C-contiguous block `torch_tensor[index]` of this output, computed from the raw haiku `value`.
        With `scratch`, a block that is copied (the int8 and plain-copy outputs) is made in its buffer, and
        valid until its next use."""
        if self.role == "scales":
            return contiguous(scales_to_torch(value.scales)[index], scratch)
        if self.op == "dequantize":
            weight = contiguous(self.entry.to_torch(value.weight)[index], scratch)
            scales = contiguous(scales_to_torch(value.scales)[index])
            product = dequantize_torch_layout(weight, scales)  # fp32, exact
            if self.dtype == "float32" and self.entry.rule.dequant_rounds_to_bf16:
                # upstream computes with bf16(int8 * scales); only the MoE down projection keeps the
                # exact product (XLA fuses it into an fp32 matmul), so fp32 holds the weights upstream uses
                product = product.astype(ml_dtypes.bfloat16)
            return np.ascontiguousarray(product.astype(numpy_dtype(self.dtype), copy=False))
        source = self.entry.to_torch(value.weight if isinstance(value, QuantizedWeight8bit) else value)[index]
        if self.op == "cast":
            return contiguous(source, scratch).astype(numpy_dtype(self.dtype))
        return contiguous(source, scratch)

    def chunks(self, value: np.ndarray | QuantizedWeight8bit, chunk_bytes: int = CHUNK_BYTES,
               scratch: Scratch | None = None) -> Iterator[np.ndarray]:
        """Blocks of this output in C order (one expert's row run at a time), each computed on its own, in
        one reused buffer (`scratch`, or this call's own): a block is valid until the next is asked for."""
        scratch = scratch or Scratch()
        for index in block_indices(self.shape, numpy_dtype(self.dtype).itemsize, chunk_bytes):
            yield self.render(value, index, scratch)


def plan_param(entry: ParamEntry, quantized: bool, source_dtype: str, weight_format: str) -> list[OutputTensor]:
    """The output tensors of one parameter stored as `quantized` (int8 + scales) or a `source_dtype` array."""
    check_weight_format(weight_format)
    if not entry.quantizable:
        return [OutputTensor(entry, entry.torch_name, "array", "copy", source_dtype, entry.torch_shape)]
    if quantized and weight_format == "int8":
        return [OutputTensor(entry, entry.torch_name, "weight", "copy", "int8", entry.torch_shape),
                OutputTensor(entry, entry.torch_scales_name, "scales", "copy", "bfloat16", entry.torch_scales_shape)]
    if quantized:
        return [OutputTensor(entry, entry.torch_name, "weight", "dequantize", FLOAT_FORMAT_DTYPES[weight_format],
                             entry.torch_shape)]
    target = source_dtype if weight_format == "int8" else FLOAT_FORMAT_DTYPES[weight_format]
    return [OutputTensor(entry, entry.torch_name, "array", "copy" if target == source_dtype else "cast", target,
                         entry.torch_shape)]


def plan_from_info(entry: ParamEntry, info: TensorFileInfo, weight_format: str) -> list[OutputTensor]:
    return plan_param(entry, info.quantized, info.dtype, weight_format)


def convert_param(entry: ParamEntry, value: np.ndarray | QuantizedWeight8bit,
                  weight_format: str) -> dict[str, np.ndarray]:
    """haiku value -> {torch name: array} for `weight_format`. E.g. a quantized `moe/linear` w
    (int8 [E, D, F], bf16 scales [E, 1, F]) in int8 -> {`...gate_proj.weight`: int8 [E, F, D],
    `...gate_proj.scales`: bf16 [E, F, 1]}; in bf16 -> {`...gate_proj.weight`: bf16 [E, F, D]}."""
    quantized = isinstance(value, QuantizedWeight8bit)
    source_dtype = (value.weight if quantized else value).dtype
    source_dtype = "bfloat16" if source_dtype == np.dtype(ml_dtypes.bfloat16) else source_dtype.name
    return {out.name: out.render(value) for out in plan_param(entry, quantized, source_dtype, weight_format)}


# ---- the converted directory's config.json ---------------------------------------------------------------

def converted_config(config: "GrokConfig", weight_format: str, source: str,
                     outputs: list[OutputTensor]) -> dict[str, object]:
    quantized = {o.entry.torch_name: False for o in outputs if o.entry.quantizable}
    quantized.update({o.entry.torch_name: True for o in outputs if o.role == "scales"})
    return {"format": FORMAT_MARKER, "format_version": FORMAT_VERSION, "weight_format": weight_format,
            "grok_torch_version": grok_torch_version(), "source": source, "grok_config": config.to_dict(),
            "quantized": quantized}


def read_converted_config(directory: str | os.PathLike) -> dict[str, object]:
    """The config.json of a converted directory; ValueError naming the file if it is not one."""
    path = Path(directory) / CONFIG_FILE
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read a converted directory's config: {err}") from None
    if not isinstance(values, dict) or values.get("format") != FORMAT_MARKER:
        raise ValueError(f"{path}: not a grok-torch converted directory (no \"format\": \"{FORMAT_MARKER}\")")
    if values.get("weight_format") not in WEIGHT_FORMATS or "grok_config" not in values:
        raise ValueError(f"{path}: missing or unknown weight_format / grok_config")
    return values


def is_converted_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / INDEX_FILE).is_file()


def _replaceable_output(name: str) -> bool:
    return name in (CONFIG_FILE, INDEX_FILE) or bool(SHARD_FILE_RE.match(name))


# ---- the driver --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConversionResult:
    dst: Path
    weight_format: str
    shards: list[str]
    tensors: int
    total_bytes: int
    reused_shards: int = 0  # finished shards of an interrupted run, checked and kept (resume)


class _LastParam:
    """Maps each raw file once even when several outputs (weight, scales) come from it; holds only one. The
    file is mapped, not read: its page cache pages are used as they are (`read_tensor_file(mapped=True)`)."""

    def __init__(self, read_ahead: ReadAhead) -> None:
        self.path: Path | None = None
        self.value = None
        self.read_ahead = read_ahead

    def get(self, info: TensorFileInfo):
        if self.path != info.path:
            self.value, self.path = None, None  # unmap the previous parameter before mapping the next
            self.read_ahead.converting(info.path)
            self.value, self.path = read_tensor_file(info.path, info, mapped=True), info.path
        return self.value


def progress_bar(total: int, desc: str, progress: bool | None):
    """A tqdm byte counter (size, rate, ETA) on stderr: shown on a TTY, or when `progress` is True."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not show,
                file=sys.stderr, dynamic_ncols=True)


class OutOfSpaceError(OSError):
    """The destination's file system cannot hold the output: refused up front, or ENOSPC while writing."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConversionInterrupted(KeyboardInterrupt):
    """Ctrl-C during a conversion, after the clean-up; the message says what was kept and how to resume."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "interrupted"


def human_bytes(n: int) -> str:
    """7353600 -> '7,353,600 bytes (7.4 MB)'."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.1f} {unit})"
    return f"{n:,} bytes"


_TEST_STOP = "GROK_TORCH_TEST_STOP_AT"


def _test_stop(event: str) -> None:
    """Test hook only: with GROK_TORCH_TEST_STOP_AT=<event> in the environment ("tensor:N": before the N-th
    tensor written in this run; "shard:N": after the N-th shard finished in this run; "install": before the
    rename into place), announce it on stderr and stop the process (SIGSTOP) there, so a test can kill it
    (SIGKILL) or interrupt it (SIGINT, then SIGCONT) at exactly that point."""
    if os.environ.get(_TEST_STOP) == event and hasattr(signal, "SIGSTOP"):
        sys.stderr.write(f"{_TEST_STOP}: stopped at {event}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)


def _source_fingerprint(pairs: list) -> list[list]:
    """Name, size and modification time of every source file: a resumed run must read the same input."""
    fingerprint = []
    for _, info in pairs:
        stat = os.stat(info.path)
        fingerprint.append([info.path.name, stat.st_size, stat.st_mtime_ns])
    return fingerprint


def _space_needed(partial: PartialOutput, files: list, extra_texts: list[str]) -> int:
    """Bytes the rest of the conversion will occupy: the shards not reused, index, config and journal, each
    rounded up to whole blocks of the file system."""
    try:
        block = max(1, os.statvfs(partial.path).f_frsize)
    except (AttributeError, OSError):
        block = 4096
    sizes = [size for name, size, _ in files if not partial.reusable(name, size)]
    sizes += [len(text.encode()) for text in extra_texts] + [64 << 10]  # the journal, generously
    return sum(-(-size // block) * block for size in sizes)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, config: "GrokConfig", dtype: str = "int8",
                       max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                       progress: bool | None = None, chunk_bytes: int = CHUNK_BYTES, *, resume: bool = False,
                       check_space: bool = True, log: Callable[[str], None] | None = None) -> ConversionResult:
    """Raw checkpoint `src` (a directory holding ckpt-0/, or ckpt-0) -> converted directory `dst`.

    Raises CheckpointError (source), DestinationError (dst exists / overlaps src, or an interrupted run's
    partial output is there and `resume` is False) or ValueError (arguments) before writing anything, and
    OutOfSpaceError when the file system of `dst` has less free space than the output needs (unless
    `check_space` is False). The output is built in `.<dst name>.partial` beside `dst` (convert.resume) and
    renamed to `dst` when complete. On an error while writing (OutOfSpaceError for ENOSPC) the partial
    directory is removed; on Ctrl-C its finished shards are kept and ConversionInterrupted says so; with
    `resume`, the finished shards of an interrupted run are checked (size, sha256) and reused. `log` gets
    one-line notes (resuming, nothing to resume).
    """
    weight_format = check_weight_format(dtype)
    log = log or (lambda message: None)
    ckpt_dir = resolve_ckpt_dir(src)
    dst = check_destination(dst, ckpt_dir, overwrite=overwrite, replaceable=_replaceable_output, what="convert")
    pairs = validate_raw_checkpoint(ckpt_dir, config)
    source = str(ckpt_dir.resolve())
    outputs: list[tuple[OutputTensor, TensorFileInfo]] = [
        (out, info) for entry, info in pairs for out in plan_from_info(entry, info, weight_format)]
    started = itertools.count(1)
    scratch = Scratch()  # every block of every tensor is made in this one buffer

    def chunks_of(out: OutputTensor, info: TensorFileInfo) -> Callable[[], Iterator[np.ndarray]]:
        def chunks() -> Iterator[np.ndarray]:
            if _TEST_STOP in os.environ:
                _test_stop(f"tensor:{next(started)}")
            return out.chunks(cache.get(info), chunk_bytes, scratch)

        return chunks

    tensors = [TensorToWrite(out.name, out.dtype, out.shape, chunks_of(out, info)) for out, info in outputs]
    total = sum(t.nbytes for t in tensors)
    metadata = {"format": "pt", "weight_format": weight_format, "source": source,
                "grok_torch_version": grok_torch_version()}
    index_metadata = {"weight_format": weight_format}
    files = plan_shard_files(tensors, max_shard_size, metadata)
    config_text = json.dumps(converted_config(config, weight_format, source, [out for out, _ in outputs]),
                             indent=2) + "\n"
    options = {"source": source, "source_files": _source_fingerprint(pairs), "weight_format": weight_format,
               "max_shard_size": max_shard_size, "grok_config": config.to_dict(),
               "grok_torch_version": grok_torch_version(), "shards": [[name, size] for name, size, _ in files],
               "plan_sha256": hashlib.sha256(b"".join(shard_header(shard, metadata) for _, _, shard in files)
                                             ).hexdigest()}
    written = itertools.count(1)

    with PartialOutput(dst, options, resume=resume, log=log) as partial:
        needed = _space_needed(partial, files, [index_text(files, index_metadata), config_text])
        free = shutil.disk_usage(partial.path).free
        if check_space and needed > free:
            kept = "" if partial.created else f"; {partial.path} is kept for --resume"
            if partial.created:
                partial.discard()
            raise OutOfSpaceError(f"not enough free space on {dst.parent}: the conversion needs "
                                  f"{human_bytes(needed)}, {human_bytes(free)} are free{kept}; free some space or "
                                  f"choose another DST (--no-space-check skips this check)")
        reused = sum(1 for name, size, _ in files if partial.reusable(name, size))
        source_of = {out.name: info.path for out, info in outputs}
        to_read = [source_of[t.name] for name, size, shard in files if not partial.reusable(name, size) for t in shard]

        def on_shard(path: Path, size: int, sha256: str) -> None:
            partial.record(path, size, sha256)
            if _TEST_STOP in os.environ:
                _test_stop(f"shard:{next(written)}")

        cache = _LastParam(ReadAhead(list(dict.fromkeys(to_read))))  # read by `chunks_of` while writing
        torch_import = import_torch_in_background() if to_read else None
        try:
            with progress_bar(total, f"convert ({weight_format})", progress) as bar:
                shards = write_sharded_safetensors(partial.path, tensors, max_shard_size=max_shard_size,
                                                   metadata=metadata, index_metadata=index_metadata,
                                                   on_bytes=bar.update, reuse_shard=partial.reuse, on_shard=on_shard)
                (partial.path / CONFIG_FILE).write_text(config_text)
            _test_stop("install")
            partial.finish()
        except KeyboardInterrupt:
            if not partial.path.exists() and dst.exists():
                raise  # interrupted after the rename: the output is complete
            shards_kept, bytes_kept = partial.keep_finished()
            if shards_kept:
                message = (f"interrupted: kept {shards_kept} finished shard(s), {human_bytes(bytes_kept)}, in "
                           f"{partial.path}; rerun the same command with --resume to check and reuse them")
            else:
                message = f"interrupted before any shard was finished: removed {partial.path}"
            raise ConversionInterrupted(message) from None
        except OSError as err:
            partial.discard()
            if err.errno in _NO_SPACE:
                raise OutOfSpaceError(f"out of disk space on {dst.parent}: the conversion needs "
                                      f"{human_bytes(needed)}, {human_bytes(free)} were free when it started; "
                                      f"removed the partial output {partial.path}") from err
            raise
        except BaseException:
            partial.discard()
            raise
        finally:
            cache.read_ahead.close()
            if torch_import is not None:
                torch_import.join()
    return ConversionResult(dst, weight_format, [p.name for p in shards], len(tensors), total, reused)


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
