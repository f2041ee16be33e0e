"""Export a converted directory as a directory that vLLM or SGLang serves as it is.

`export_serving(src, dst, engine=..., weights=...)` checks the source (every tensor's name, dtype and shape,
as export-upstream does), that the engine can compute this config (convert.serving.config_files), and plans
every engine tensor from the name table (convert.serving.names): what it holds and how it is made, from
metadata alone. It then streams them, one block of rows at a time read from the source and unmapped again,
into sharded safetensors + index, beside config.json, generation_config.json and the tokenizer files, with
the same guarantees as `convert` (convert.disk.job: free-space check, `.DST.partial` renamed into place,
--resume after checking each finished shard's sha256, nothing half-written left on an error).

What each engine tensor holds (the effective weights of grok_torch's bf16 model):

- bf16 linears: upstream's dequantization bf16(int8 x bf16 scale) (grok_torch.linear.dequantize), or a
  float source's weight rounded once to bf16. The MoE down projection too: upstream (and grok_torch) keep
  its exact fp32 product, which bf16 cannot hold; the engines' fused MoE computes in bf16 anyway;
- int8 linears (vLLM only): compressed-tensors W8A16, the same int8 values and scales repeated to groups of
  128 (convert.serving.compressed), dequantizing to exactly bf16(int8 x scale);
- the embedding (and SGLang's lm_head): bf16(fp32 embedding), what upstream multiplies with in bf16;
- RMSNorm scales and the router: their fp32 values as stored (each engine casts them to its parameter dtype
  at load: vLLM bf16 for both, SGLang bf16 norms and an fp32 router).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from convert.disk.blocks import CHUNK_BYTES, block_indices
from convert.disk.job import write_resumable
from convert.disk.output_dir import Destination
from convert.disk.resume import JobNames
from convert.disk.safetensors_writer import DEFAULT_MAX_SHARD_SIZE, TensorToWrite
from convert.serving.compressed import (GROUP_SIZE, check_groups, compressed_names, pack_int8, repeat_scales,
                                        scale_overhead)
from convert.serving.config_files import (GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, NotServableError, check_servable, engine_config, generation_config,
                                          json_text, tokenizer_config)
from convert.serving.names import ENGINES, EngineTensor, expand, table_for
from convert.upstream.export import check_converted
from grok_torch.converted_dir import (CONFIG_FILE, INDEX_FILE, TOKENIZER_FILE, ConvertedDir, grok_torch_version,
                                      is_owned_name)
from grok_torch.dtypes import numpy_dtype
from grok_torch.errors import JobInterrupted

WEIGHTS = ("bf16", "int8")
EXPORT = JobNames("export-serving", "export", "exporting")
SERVING_FILES = (GENERATION_CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)
FLOAT_KINDS = {"embedding": "bfloat16", "norm": "float32", "router": "float32", "linear": "bfloat16",
               "expert_linear": "bfloat16"}


class ExportInterrupted(JobInterrupted):
    """Ctrl-C during an export, after the clean-up; the message says what was kept and how to resume."""


def is_export_file(name: str) -> bool:
    """A file name that a serving export holds."""
    return is_owned_name(name) or name in SERVING_FILES


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the export: engine name, dtype (numpy's name), shape, the engine tensor it belongs to, and
    `role`: "float" (the tensor itself), or one of compressed-tensors' weight_packed | weight_scale | weight_shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    of: EngineTensor
    role: str
    quantized_source: bool  # the source stores this linear as int8 + scales

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * numpy_dtype(self.dtype).itemsize


def plan_export(config, engine: str, weights: str, quantized: dict[str, bool]) -> list[PlannedTensor]:
    """Every tensor of an export of `config` for `engine` in `weights`, from metadata alone; `quantized` tells
    for each linear weight of the source whether it is int8 + scales. Raises NotServableError (the engine
    cannot compute this config, or cannot serve int8) or GroupSizeError (int8 groups that do not fit)."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown --weights {weights!r}; export-serving writes one of {', '.join(WEIGHTS)}")
    check_servable(config, engine)
    if weights == "int8" and engine != "vllm":
        raise NotServableError(
            f"{engine} has no int8 format for Grok-1's GELU experts (its compressed-tensors WNA16 MoE method and its "
            f"moe_wna16 method both assert a SiLU activation, sgl-project/sglang compressed_tensors_moe.py @014a324b, "
            f"moe_wna16.py @010093ac): export --weights bf16 for sglang")
    planned = []
    for tensor in expand(config, table_for(engine)):
        entry = tensor.source
        is_int8 = bool(quantized.get(entry.torch_name, False))
        if weights == "int8" and entry.quantizable:
            if not is_int8:
                raise NotServableError(f"{entry.torch_name} is stored as float in the source: an int8 export needs an "
                                       f"int8 conversion (grok-torch convert --weights int8); export --weights bf16")
            repeats = check_groups(entry)
            out_features, in_features = tensor.shape
            names = compressed_names(tensor.name)
            planned += [
                PlannedTensor(names["weight_packed"], "int32", (out_features, in_features // 4), tensor,
                              "weight_packed", True),
                PlannedTensor(names["weight_scale"], "bfloat16", (out_features, entry.scale_groups * repeats),
                              tensor, "weight_scale", True),
                PlannedTensor(names["weight_shape"], "int64", (2,), tensor, "weight_shape", True)]
        else:
            planned.append(PlannedTensor(tensor.name, FLOAT_KINDS[entry.kind], tensor.shape, tensor, "float", is_int8))
    return planned


def _source_index(planned: PlannedTensor, index: tuple) -> tuple:
    return (planned.of.expert, *index) if planned.of.expert is not None else index


def render_block(directory: ConvertedDir, planned: PlannedTensor, index: tuple) -> np.ndarray:
    """Rows `index` (a tuple holding one slice) of `planned`, computed from the source directory."""
    entry = planned.of.source
    source = _source_index(planned, index)
    if planned.role == "weight_shape":
        return np.array(entry.torch_shape[-2:], dtype="<i8")
    if planned.role == "weight_packed":
        return pack_int8(directory.block(entry.torch_name, source))
    if planned.role == "weight_scale":
        return repeat_scales(directory.block(entry.torch_scales_name, source), check_groups(entry))
    if planned.quantized_source:  # a bf16 linear from int8 + scales: upstream's dequantization
        from grok_torch.dtypes import torch_to_numpy
        from grok_torch.linear import dequantize

        weight = directory.torch_block(entry.torch_name, source)
        scales = directory.torch_block(entry.torch_scales_name, source)
        return torch_to_numpy(dequantize(weight, scales, round_to_bf16=True))
    block = directory.block(entry.torch_name, source)
    return np.ascontiguousarray(block.astype(numpy_dtype(planned.dtype), copy=False))


def _chunks(directory: ConvertedDir, planned: PlannedTensor, chunk_bytes: int) -> Callable[[], Iterator[np.ndarray]]:
    def chunks() -> Iterator[np.ndarray]:
        if planned.role == "weight_shape":
            yield render_block(directory, planned, ())
            return
        for index in block_indices(planned.shape, numpy_dtype(planned.dtype).itemsize, chunk_bytes):
            yield render_block(directory, planned, index)
            directory.close()  # unmap what this block read: the source's pages do not pile up in memory

    return chunks


def _source_fingerprint(directory: ConvertedDir) -> list[list]:
    """Name, size and modification time of every file of the source: a resumed run must read the same one."""
    names = sorted({CONFIG_FILE, INDEX_FILE, *directory.weight_map.values()})
    return [[name, (stat := os.stat(directory.path / name)).st_size, stat.st_mtime_ns] for name in names]


def _tokenizer_files(path: Path | None, config) -> tuple[dict[str, bytes | str], int]:
    """{file name: content} of the tokenizer, and its BOS id; nothing without a tokenizer."""
    from convert.serving.config_files import BOS_TOKEN_ID

    if path is None:
        return {}, BOS_TOKEN_ID
    from grok_torch.tokenizer import Tokenizer

    tokenizer = Tokenizer(path)
    tokenizer.check_model_vocab(config.vocab_size)
    special = {"pad_token": tokenizer.piece(tokenizer.pad_id), "bos_token": tokenizer.piece(tokenizer.bos_id),
               "eos_token": tokenizer.piece(tokenizer.eos_id), "unk_token": tokenizer.piece(tokenizer.unk_id)}
    return ({TOKENIZER_FILE: Path(path).read_bytes(), TOKENIZER_CONFIG_FILE: json_text(tokenizer_config(config, special))},
            tokenizer.bos_id)


@dataclass(frozen=True)
class ExportResult:
    dst: Path
    engine: str
    weights: str
    shards: list[str]
    tensors: int
    total_bytes: int
    reused_shards: int
    tokenizer: bool
    scale_bytes: tuple[int, int] | None  # int8: (upstream's own scales, the group-128 scales written)


def export_serving(src: str | os.PathLike, dst: str | os.PathLike, *, engine: str, weights: str = "bf16",
                   tokenizer: str | os.PathLike | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                   overwrite: bool = False, resume: bool = False, check_space: bool = True,
                   progress: bool | None = None, log: Callable[[str], None] | None = None,
                   chunk_bytes: int = CHUNK_BYTES) -> ExportResult:
    """Converted directory `src` -> `dst`, loadable by `engine` ("vllm" | "sglang") as it is.

    Refuses before writing anything: an invalid source (LoadError, ExportError), a config or weight format the
    engine cannot serve (NotServableError, GroupSizeError), a tokenizer that does not fit (TokenizerError), an
    existing or overlapping `dst` (DestinationError), too little free space (OutOfSpaceError). The source is
    only read. Interrupted, the finished shards stay in `.<dst name>.partial` for `resume`.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    log = log or (lambda message: None)
    directory = ConvertedDir(src)
    config = directory.config.config
    sources = check_converted(directory)
    quantized = {plan.entry.torch_name: plan.quantized for plan in sources}
    planned = plan_export(config, engine, weights, quantized)
    # the destination is claimed (locked against a second run, replaced only if grok-torch wrote it) for the
    # rest of the export
    with Destination(dst, src, overwrite=overwrite, what="export-serving", log=log) as target:
        dst = target.path
        tokenizer_path = Path(tokenizer) if tokenizer is not None else None
        if tokenizer_path is None and (directory.path / TOKENIZER_FILE).is_file():
            tokenizer_path = directory.path / TOKENIZER_FILE  # the copy convert made
        tokenizer_files, bos_token_id = _tokenizer_files(tokenizer_path, config)

        source = str(directory.path.resolve())
        table = table_for(engine)
        provenance = {"version": grok_torch_version(), "source": source, "engine": engine, "weights": weights,
                      "engine_checked_against": table.checked_against, "grok_config": config.to_dict()}
        if weights == "int8":
            provenance["scale_group_size"] = GROUP_SIZE
        extra_files = {CONFIG_FILE: json_text(engine_config(config, engine, weights, provenance, bos_token_id)),
                       GENERATION_CONFIG_FILE: json_text(generation_config(config, bos_token_id)), **tokenizer_files}
        tensors = [TensorToWrite(p.name, p.dtype, p.shape, _chunks(directory, p, chunk_bytes)) for p in planned]
        options = {"source": source, "source_files": _source_fingerprint(directory), "engine": engine,
                   "weights": weights, "max_shard_size": max_shard_size, "grok_torch_version": grok_torch_version(),
                   "extra_files": {name: _sha256(content) for name, content in extra_files.items()}}
        metadata = {"format": "pt", "grok_torch_version": grok_torch_version(), "engine": engine, "weights": weights}
        try:
            result = write_resumable(dst, tensors, options=options, max_shard_size=max_shard_size,
                                     metadata=metadata, index_metadata={}, extra_files=extra_files, resume=resume,
                                     check_space=check_space, progress=progress,
                                     desc=f"export-serving ({engine}, {weights})", log=log,
                                     interrupted=ExportInterrupted, names=EXPORT, owned_name=is_export_file,
                                     labels={"engine": "--engine", "weights": "--weights",
                                             "max_shard_size": "--max-shard-size",
                                             "extra_files": "the config or tokenizer files"},
                                     destination=target)
        finally:
            directory.close()
    return ExportResult(dst, engine, weights, [p.name for p in result.shards], len(tensors),
                        sum(t.nbytes for t in tensors), result.reused, bool(tokenizer_files),
                        scale_overhead(config) if weights == "int8" else None)


def _sha256(content: str | bytes) -> str:
    import hashlib

    return hashlib.sha256(content if isinstance(content, bytes) else content.encode()).hexdigest()


__all__ = ["export_serving", "plan_export", "ExportResult", "ExportInterrupted", "NotServableError", "WEIGHTS"]
