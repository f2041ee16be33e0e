"""Convert the official raw checkpoint to a grok-torch converted directory (grok_torch.converted_dir).

`convert_checkpoint` validates the whole source from metadata first (nothing is written if any file is
missing, extra, malformed, unsafe or of the wrong shape/dtype), checks the free space, then streams one
parameter at a time into `.<dst name>.partial` beside the destination, renamed into place only when
complete. What each output tensor holds is `convert.plan`'s; each raw file is mapped, not copied, while
`convert.disk.read_ahead` keeps the disk reading the next ones; blocks are transposed into one reused buffer
and written by `convert.disk.shard_file` (O_DIRECT, on a writer thread). That directory's journal records
each finished shard's size and sha256, so an interrupted run can be resumed (convert.disk.resume); on an
error or a full disk it is removed (the steps it shares with export-serving: convert.disk.job). The index,
written last, records the sha256 of every shard and of config.json (what `grok-torch verify DIR` checks);
the destination is claimed by convert.disk.output_dir (a lock against a second run, replaced only if
grok-torch wrote it, marked as grok-torch's when installed).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from convert.disk.blocks import CHUNK_BYTES, Scratch, import_torch_in_background
from convert.disk.job import write_resumable
from convert.disk.output_dir import Destination, DestinationError, DestinationLock
from convert.disk.read_ahead import ReadAhead
from convert.disk.resume import PartialOutput, partial_path, sha256_of
from convert.disk.safetensors_writer import DEFAULT_MAX_SHARD_SIZE, TensorToWrite, plan_shard_files
from convert.plan import OutputTensor, plan_from_info
from convert.upstream.raw_checkpoint import resolve_ckpt_dir, validate_raw_checkpoint
from convert.upstream.tensor_file import TensorFileInfo, read_tensor_file
from grok_torch.converted_dir import (CONFIG_FILE, SHARD_FILE_RE, TOKENIZER_FILE, check_weight_format, config_text,
                                      config_values, grok_torch_version, is_converted_dir, read_config, shard_metadata)
from grok_torch.errors import JobInterrupted, deprecated_alias

if TYPE_CHECKING:
    from grok_torch.config import GrokConfig


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


MAX_TOKENIZER_BYTES = 64 << 20  # the release's is 2.2 MB


def tokenizer_sources(ckpt_dir: Path) -> list[Path]:
    """Where a release keeps its tokenizer.model: beside ckpt-0's parent (`SRC/`), or one level up (the
    release's repository: `tokenizer.model` beside `checkpoints/ckpt-0`)."""
    return [ckpt_dir.parent / TOKENIZER_FILE, ckpt_dir.parent.parent / TOKENIZER_FILE]


def tokenizer_source(ckpt_dir: Path, config: "GrokConfig", given: str | os.PathLike | None,
                     log: Callable[[str], None]) -> Path | None:
    """The tokenizer.model to copy into the output, checked (a regular file that sentencepiece reads, with
    the config's vocabulary), or None. One that is asked for and unusable is an error; one found that does
    not fit is skipped with a note."""
    from grok_torch.tokenizer import Tokenizer, TokenizerError

    candidates = [Path(given)] if given is not None else [p for p in tokenizer_sources(ckpt_dir) if p.is_file()]
    for path in candidates:
        try:
            if not path.is_file() or path.stat().st_size > MAX_TOKENIZER_BYTES:
                raise TokenizerError(f"tokenizer {path} is not a regular file of at most {MAX_TOKENIZER_BYTES} bytes")
            Tokenizer(path).check_model_vocab(config.vocab_size)
        except TokenizerError as err:
            if given is not None:
                raise
            log(f"note: not copying {path}: {err}")
            continue
        log(f"copying the tokenizer {path} into the output")
        return path
    if given is None:
        log(f"note: no {TOKENIZER_FILE} beside the checkpoint (looked at "
            f"{', '.join(str(p) for p in tokenizer_sources(ckpt_dir))}); generate will need --tokenizer FILE")
    return None


def quantized_map(outputs) -> dict[str, bool]:
    """config.json's "quantized": every linear weight's name -> whether it is stored as int8 + scales."""
    quantized = {}
    for out in outputs:
        if out.entry.quantizable:
            quantized[out.entry.torch_name] = quantized.get(out.entry.torch_name, False) or out.role == "scales"
    return quantized


class ConversionInterrupted(JobInterrupted):
    """Ctrl-C during a conversion, after the clean-up; the message says what was kept and how to resume."""


def _source_fingerprint(pairs: list) -> list[list]:
    """Name, size and modification time of every source file: a resumed run must read the same input."""
    fingerprint = []
    for _, info in pairs:
        stat = os.stat(info.path)
        fingerprint.append([info.path.name, stat.st_size, stat.st_mtime_ns])
    return fingerprint


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, config: "GrokConfig", weights: str = "int8",
                       max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                       progress: bool | None = None, chunk_bytes: int = CHUNK_BYTES, *, resume: bool = False,
                       check_space: bool = True, log: Callable[[str], None] | None = None,
                       tokenizer: str | os.PathLike | None = None, dtype: str | None = None) -> ConversionResult:
    """Raw checkpoint `src` (a directory holding ckpt-0/, or ckpt-0) -> converted directory `dst`.

    Raises CheckpointError (source), DestinationError (dst exists / overlaps src / was not written by
    grok-torch / is being written by another run, or an interrupted run's partial output is there and
    `resume` is False) or ValueError (arguments) before writing anything, and
    OutOfSpaceError when the file system of `dst` has less free space than the output needs (unless
    `check_space` is False). The output is built in `.<dst name>.partial` beside `dst` (convert.disk.resume) and
    renamed to `dst` when complete. On an error while writing (OutOfSpaceError for ENOSPC) the partial
    directory is removed; on Ctrl-C its finished shards are kept and ConversionInterrupted says so; with
    `resume`, the finished shards of an interrupted run are checked (size, sha256) and reused. `log` gets
    one-line notes (resuming, nothing to resume, the tokenizer). `weights` is the stored format (int8 | bf16 |
    fp32); `dtype` is its deprecated old name. The release's `tokenizer.model` (`tokenizer`, else one found
    beside the checkpoint: `tokenizer_sources`) is copied into the output, its sha256 recorded in config.json.
    """
    weight_format = check_weight_format(deprecated_alias("dtype", dtype, "weights", weights, "int8"))
    log = log or (lambda message: None)
    ckpt_dir = resolve_ckpt_dir(src)
    if resume and not overwrite and is_converted_dir(dst) and not partial_path(Path(dst)).exists():
        with DestinationLock(Path(dst), "convert"):  # a finished conversion: check it, and keep it if it fits
            return _already_converted(ckpt_dir, Path(dst), _Plan(ckpt_dir, config, weight_format, tokenizer, log),
                                      max_shard_size, log)
    with Destination(dst, ckpt_dir, overwrite=overwrite, what="convert", log=log) as target:
        return _convert(ckpt_dir, target, config, weight_format, max_shard_size, progress, chunk_bytes, resume,
                        check_space, log, tokenizer)


class _Plan:
    """What a conversion of `ckpt_dir` to `weight_format` writes, from metadata only: its output tensors (with
    how to make each from the raw files), the shards' metadata, the tokenizer to copy and config.json."""

    def __init__(self, ckpt_dir: Path, config: "GrokConfig", weight_format: str, tokenizer, log):
        self.pairs = validate_raw_checkpoint(ckpt_dir, config)
        self.weight_format = weight_format
        self.source = str(ckpt_dir.resolve())
        self.outputs: list[tuple[OutputTensor, TensorFileInfo]] = [
            (out, info) for entry, info in self.pairs for out in plan_from_info(entry, info, weight_format)]
        self.metadata = shard_metadata(weight_format, self.source)
        self.tokenizer = tokenizer_source(ckpt_dir, config, tokenizer, log)
        tokenizer_info = None
        if self.tokenizer is not None:
            tokenizer_info = {"file": TOKENIZER_FILE, "sha256": sha256_of(self.tokenizer),
                              "source": str(self.tokenizer.resolve())}
        self.config_values = config_values(config, weight_format, self.source,
                                           quantized_map(out for out, _ in self.outputs), tokenizer_info)
        self.config_json = config_text(self.config_values)
        self.config = config


def _already_converted(ckpt_dir: Path, dst: Path, plan: _Plan, max_shard_size: int,
                       log: Callable[[str], None]) -> ConversionResult:
    """--resume on a finished conversion: nothing to do if it is exactly this conversion (the same config.json,
    the same shard plan) and every file matches its recorded sha256; otherwise DestinationError saying why."""
    from convert.verify import verify_recorded

    tensors = [TensorToWrite(out.name, out.dtype, out.shape, lambda: iter(())) for out, _ in plan.outputs]
    files = plan_shard_files(tensors, max_shard_size, plan.metadata)
    stored = read_config(dst).values
    differ = sorted(key for key in set(stored) | set(plan.config_values) if stored.get(key) != plan.config_values.get(key))
    if "weight_format" in differ:
        differ = [key for key in differ if key != "quantized"]  # it follows from the weight format
    shards = sorted(p.name for p in dst.iterdir() if SHARD_FILE_RE.match(p.name))
    if not differ and [(n, s) for n, s, _ in files] != [(n, (dst / n).stat().st_size) for n in shards]:
        differ.append("the shard plan (--max-shard-size)")  # otherwise it follows from what differs
    if differ:
        raise DestinationError(f"{dst} is a finished conversion, but not this one (it differs in "
                               f"{', '.join(differ)}); use --overwrite to convert again, or choose another DST")
    mismatches, checked = verify_recorded(dst)
    if mismatches:
        raise DestinationError(f"{dst} is this conversion, finished, but {len(mismatches)} file(s) fail their recorded "
                               f"sha256 ({mismatches[0]}); use --overwrite to convert again")
    log(f"nothing to do: {dst} is already this conversion of {ckpt_dir}, complete, and its {checked} match their "
        f"recorded sha256")
    total = sum(t.nbytes for t in tensors)
    return ConversionResult(dst, plan.weight_format, shards, len(tensors), total, len(shards))


def _convert(ckpt_dir: Path, target: Destination, config: "GrokConfig", weight_format: str, max_shard_size: int,
             progress: bool | None, chunk_bytes: int, resume: bool, check_space: bool, log: Callable[[str], None],
             tokenizer: str | os.PathLike | None) -> ConversionResult:
    """The conversion, with the destination claimed (locked and checked) by `convert_checkpoint`."""
    dst = target.path
    plan = _Plan(ckpt_dir, config, weight_format, tokenizer, log)
    pairs, source, outputs, metadata = plan.pairs, plan.source, plan.outputs, plan.metadata
    scratch = Scratch()  # every block of every tensor is made in this one buffer
    cache: _LastParam | None = None  # the raw files, read by `chunks_of` while writing

    def chunks_of(out: OutputTensor, info: TensorFileInfo) -> Callable[[], Iterator[np.ndarray]]:
        return lambda: out.chunks(cache.get(info), chunk_bytes, scratch)

    tensors = [TensorToWrite(out.name, out.dtype, out.shape, chunks_of(out, info)) for out, info in outputs]
    total = sum(t.nbytes for t in tensors)
    tokenizer_path, config_json = plan.tokenizer, plan.config_json
    options = {"source": source, "source_files": _source_fingerprint(pairs), "weight_format": weight_format,
               "max_shard_size": max_shard_size, "grok_config": config.to_dict(),
               "grok_torch_version": grok_torch_version()}

    @contextlib.contextmanager
    def reading(partial: PartialOutput, files: list) -> Iterator[None]:
        """Read ahead the raw files of the shards that are not reused, and import torch meanwhile."""
        nonlocal cache
        source_of = {out.name: info.path for out, info in outputs}
        to_read = [source_of[t.name] for name, size, shard in files if not partial.reusable(name, size) for t in shard]
        cache = _LastParam(ReadAhead(list(dict.fromkeys(to_read))))
        torch_import = import_torch_in_background() if to_read else None
        try:
            yield
        finally:
            cache.read_ahead.close()
            if torch_import is not None:
                torch_import.join()

    # the tokenizer (copied, when there is one) before config.json, which names it
    extra_files = {TOKENIZER_FILE: tokenizer_path.read_bytes()} if tokenizer_path is not None else {}
    extra_files[CONFIG_FILE] = config_json
    result = write_resumable(dst, tensors, options=options, max_shard_size=max_shard_size, metadata=metadata,
                             index_metadata={"weight_format": weight_format}, extra_files=extra_files,
                             resume=resume, check_space=check_space, progress=progress,
                             desc=f"convert ({weight_format})", log=log, interrupted=ConversionInterrupted,
                             reading=reading, destination=target, sha256_files=(CONFIG_FILE,))
    return ConversionResult(dst, weight_format, [p.name for p in result.shards], len(tensors), total, result.reused)
