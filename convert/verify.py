"""Re-read a conversion's input and output and check every tensor, bit for bit.

`verify(a, b)` takes any two of: a raw checkpoint, a converted directory.

- raw and converted (either order): each converted tensor must equal what `convert.converter` computes from
  the raw parameter for the directory's weight format: int8 weights and bf16 scales bit-exact,
  bf16 = `bf16(int8 * scales)` (upstream's dequantization), fp32 = the values upstream computes with
  (that rounding widened, the exact product for the MoE down projection), plain
  tensors bit-exact (or rounded once, for a float weight in another float format). Missing and unexpected
  tensors, and a wrong `quantized` map in config.json, are mismatches too.
- raw and raw (e.g. an original and its export-upstream round trip): every file's kind, dtypes, shapes and
  data bytes equal (needs the config).
- converted and converted: the same tensor names, dtypes, shapes and bytes.

Returns a list of mismatches, each naming the tensor; empty means verified. Comparison is blockwise, so
memory stays about one raw parameter plus one block.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from convert.blocks import CHUNK_BYTES, block_indices
from convert.converter import OutputTensor, is_converted_dir, plan_from_info, read_converted_config
from convert.raw_checkpoint import is_raw_checkpoint, numpy_dtype, read_tensor_file, validate_raw_checkpoint
from convert.safetensors_io import StoredTensor, list_safetensors_dir, map_tensor

if TYPE_CHECKING:
    from grok_torch.config import GrokConfig

_RULES = {"copy": "the source tensor (bit-exact)", "cast": "the source rounded once to the output dtype",
          "dequantize": "int8 weight x bf16 scales (upstream's dequantization)"}


def _bit_differences(expected: np.ndarray, actual: np.ndarray) -> int:
    """Elements whose bits differ (NaN-safe, -0.0 != +0.0)."""
    if expected.dtype.itemsize == 0 or expected.size == 0:
        return 0
    as_uint = np.dtype(f"u{expected.dtype.itemsize}")
    a = np.ascontiguousarray(expected).reshape(-1).view(as_uint)
    b = np.ascontiguousarray(actual).reshape(-1).view(as_uint)
    return int(np.count_nonzero(a != b))


def _describe(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype}{list(shape)}"


def _check_output(out: OutputTensor, value, stored: StoredTensor | None, chunk_bytes: int) -> str | None:
    if stored is None:
        return f"tensor {out.name}: missing (expected {_describe(out.dtype, out.shape)})"
    if (stored.dtype, stored.shape) != (out.dtype, out.shape):
        return (f"tensor {out.name}: stored {_describe(stored.dtype, stored.shape)}, expected "
                f"{_describe(out.dtype, out.shape)}")
    mapped = map_tensor(stored)
    itemsize = numpy_dtype(out.dtype).itemsize
    differ = sum(_bit_differences(out.render(value, index), mapped[index])
                 for index in block_indices(out.shape, itemsize, chunk_bytes))
    if differ:
        return (f"tensor {out.name}: {differ} of {int(np.prod(out.shape))} elements differ from "
                f"{_RULES[out.op]} of {out.entry.haiku_name}")
    return None


def _verify_conversion(raw: Path, converted: Path, config: "GrokConfig | None", chunk_bytes: int) -> list[str]:
    from grok_torch.config import GrokConfig

    values = read_converted_config(converted)
    stored_config = GrokConfig.from_dict(values["grok_config"])
    mismatches = []
    if config is not None and config != stored_config:
        mismatches.append(f"{converted}/config.json: grok_config differs from the config given")
    weight_format = values["weight_format"]
    stored = list_safetensors_dir(converted)
    expected_names, quantized = set(), {}
    for entry, info in validate_raw_checkpoint(raw, stored_config):
        outputs = plan_from_info(entry, info, weight_format)
        value = read_tensor_file(info.path, info)
        for out in outputs:
            expected_names.add(out.name)
            problem = _check_output(out, value, stored.get(out.name), chunk_bytes)
            if problem:
                mismatches.append(problem)
        if entry.quantizable:
            quantized[entry.torch_name] = any(out.role == "scales" for out in outputs)
        del value
    mismatches += [f"tensor {name}: unexpected (not produced from the raw checkpoint)"
                   for name in sorted(set(stored) - expected_names)]
    if values.get("quantized") != quantized:
        wrong = sorted(n for n in set(quantized) | set(values.get("quantized") or {})
                       if (values.get("quantized") or {}).get(n) != quantized.get(n))
        mismatches.append(f"{converted}/config.json: \"quantized\" is wrong for {', '.join(wrong[:5])}")
    return mismatches


def _verify_raw_pair(a: Path, b: Path, config: "GrokConfig") -> list[str]:
    mismatches = []
    for (entry, info_a), (_, info_b) in zip(validate_raw_checkpoint(a, config), validate_raw_checkpoint(b, config)):
        if info_a.describe() != info_b.describe():
            mismatches.append(f"tensor {entry.haiku_name} ({info_b.path.name}): {info_b.describe()}, expected "
                              f"{info_a.describe()}")
            continue
        value_a, value_b = read_tensor_file(info_a.path, info_a), read_tensor_file(info_b.path, info_b)
        pairs = [(value_a.weight, value_b.weight), (value_a.scales, value_b.scales)] if info_a.quantized else \
            [(value_a, value_b)]
        differ = sum(_bit_differences(x, y) for x, y in pairs)
        if differ:
            mismatches.append(f"tensor {entry.haiku_name} ({info_b.path.name}): {differ} elements differ")
    return mismatches


def _verify_converted_pair(a: Path, b: Path, chunk_bytes: int) -> list[str]:
    stored_a, stored_b = list_safetensors_dir(a), list_safetensors_dir(b)
    mismatches = [f"tensor {n}: missing from {b}" for n in sorted(set(stored_a) - set(stored_b))]
    mismatches += [f"tensor {n}: unexpected in {b}" for n in sorted(set(stored_b) - set(stored_a))]
    for name in sorted(set(stored_a) & set(stored_b)):
        ta, tb = stored_a[name], stored_b[name]
        if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
            mismatches.append(f"tensor {name}: {_describe(tb.dtype, tb.shape)}, expected {_describe(ta.dtype, ta.shape)}")
            continue
        ma, mb = map_tensor(ta), map_tensor(tb)
        itemsize = ma.dtype.itemsize
        differ = sum(_bit_differences(ma[i], mb[i]) for i in block_indices(ta.shape, itemsize, chunk_bytes))
        if differ:
            mismatches.append(f"tensor {name}: {differ} elements differ")
    return mismatches


def _kind(path: Path) -> str:
    if is_converted_dir(path):
        return "converted"
    if is_raw_checkpoint(path):
        return "raw"
    raise ValueError(f"{path}: neither a raw checkpoint (ckpt-0/) nor a converted directory "
                     f"(config.json + model.safetensors.index.json)")


def verify(src: str | os.PathLike, dst: str | os.PathLike, config: "GrokConfig | None" = None,
           chunk_bytes: int = CHUNK_BYTES) -> list[str]:
    """Mismatches between `src` and `dst` (raw/converted in any combination), each naming the tensor."""
    src, dst = Path(src), Path(dst)
    kinds = (_kind(src), _kind(dst))
    if kinds == ("raw", "converted"):
        return _verify_conversion(src, dst, config, chunk_bytes)
    if kinds == ("converted", "raw"):
        return _verify_conversion(dst, src, config, chunk_bytes)
    if kinds == ("converted", "converted"):
        return _verify_converted_pair(src, dst, chunk_bytes)
    if config is None:
        raise ValueError("comparing two raw checkpoints needs their config")
    return _verify_raw_pair(src, dst, config)
