"""Re-read a conversion's input and output and check every tensor, bit for bit.

`verify(a, b)` takes any two of: a raw checkpoint, a converted directory.

- raw and converted (either order): each converted tensor must equal what the format promises for the
  directory's weight format, computed here from the raw arrays with numpy, in upstream's own (haiku)
  layout, by code that shares nothing with the converter's rendering (`convert.plan`, the blocked
  transposes of `convert.disk.blocks`): int8 weights and bf16 scales bit-exact, bf16 = `bf16(int8 *
  scales)` (upstream's dequantization), fp32 = the values upstream computes with (that rounding widened,
  the exact product for the MoE down projection), plain tensors bit-exact (or rounded once, for a float
  weight in another float format). The converted side is read through the safetensors library. Missing
  and unexpected tensors, and a wrong `quantized` map in config.json, are mismatches too.
- raw and raw (e.g. an original and its export-upstream round trip): every file's kind, dtypes, shapes and
  data bytes equal (needs the config).
- converted and converted: the same config and tensors, bit for bit; a linear weight the two store in
  different formats (an int8 and a bf16 conversion) is compared by value, both rendered as the narrower
  format stores it (int8 dequantized by that format's rule, fp32 rounded once to bf16).
- one converted directory alone (`verify_recorded`): every shard's and config.json's sha256 against the
  ones the converter recorded in the index.

Returns a list of mismatches, each naming the tensor; empty means verified. Comparison is blockwise, so
memory stays about one raw parameter plus one block.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import ml_dtypes
import numpy as np

from convert.disk.blocks import CHUNK_BYTES, block_indices
from convert.upstream.param_names import ParamEntry
from convert.upstream.quantized import QuantizedWeight8bit
from convert.upstream.raw_checkpoint import is_raw_checkpoint, validate_raw_checkpoint
from convert.upstream.tensor_file import TensorFileInfo, read_tensor_file
from grok_torch.converted_dir import ConvertedDir, StoredTensor, is_converted_dir
from grok_torch.dtypes import numpy_dtype
from grok_torch.weight_layouts import FLOAT_WEIGHT_DTYPE, keeps_int8

if TYPE_CHECKING:
    from grok_torch.config import GrokConfig

_RULES = {"copy": "the source tensor (bit-exact)", "cast": "the source rounded once to the output dtype",
          "dequantize": "int8 weight x bf16 scales (upstream's dequantization)"}
_FLOAT_DTYPES = FLOAT_WEIGHT_DTYPE


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


# ---- what the format promises, from the raw arrays ----------------------------------------------------------

def _haiku_index(entry: ParamEntry, torch_index: tuple) -> tuple:
    """The haiku-layout index of a block of the torch-layout tensor. Every layout change of the format is an
    identity or a swap of the last two axes (haiku [..., in, out] -> torch [..., out, in]), so a block of
    torch rows (*lead, rows) is (*lead, all inputs, those outputs) upstream."""
    if entry.rule.layout == "identity":
        return torch_index
    *lead, rows = torch_index
    return (*lead, slice(None), rows)


def _to_torch_block(block: np.ndarray, entry: ParamEntry) -> np.ndarray:
    return block if entry.rule.layout == "identity" else np.swapaxes(block, -1, -2)


@dataclass(frozen=True)
class _Expected:
    """One tensor the directory must hold: its name, dtype and shape, and how to compute a block of it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    rule: str  # a key of _RULES
    block: Callable[[tuple], np.ndarray]  # torch-layout index -> expected block


def _dequantized(weight: np.ndarray, scales: np.ndarray, exact: bool) -> np.ndarray:
    """haiku int8 [..., in, out] x bf16 scales [..., G, out] -> float32 [..., in, out]: each of the G
    contiguous groups of input rows times its scale row; exact in fp32, rounded once to bf16 unless `exact`."""
    *lead, n_in, n_out = weight.shape
    groups = scales.shape[-2]
    grouped = weight.astype(np.float32).reshape(*lead, groups, n_in // groups, n_out)
    product = (grouped * scales.astype(np.float32)[..., :, None, :]).reshape(*lead, n_in, n_out)
    return product if exact else product.astype(ml_dtypes.bfloat16).astype(np.float32)


def _expected_tensors(entry: ParamEntry, info: TensorFileInfo, value, weight_format: str) -> list[_Expected]:
    """The tensors a `weight_format` conversion makes of one raw parameter, per grok_torch.converted_dir."""
    torch_shape = entry.torch_shape

    def of(array: np.ndarray, dtype: str) -> Callable[[tuple], np.ndarray]:
        return lambda index: _to_torch_block(array[_haiku_index(entry, index)], entry).astype(numpy_dtype(dtype))

    if isinstance(value, QuantizedWeight8bit):
        if keeps_int8(weight_format, not entry.rule.dequant_rounds_to_bf16):  # bf16 keeps linear_1's int8
            scales_shape = entry.torch_scales_shape
            return [_Expected(entry.torch_name, "int8", torch_shape, "copy", of(value.weight, "int8")),
                    _Expected(entry.torch_scales_name, "bfloat16", scales_shape, "copy", of(value.scales, "bfloat16"))]
        dtype = _FLOAT_DTYPES[weight_format]
        # fp32 holds the values upstream computes with: bf16(int8 x scale), except the exact product that
        # its MoE down projection uses; bf16 (-plain) holds bf16(int8 x scale).
        exact = weight_format == "fp32" and not entry.rule.dequant_rounds_to_bf16

        def dequantized(index: tuple) -> np.ndarray:
            haiku = _haiku_index(entry, index)
            # scales [..., G, out] are indexed like the weight [..., in, out]: all groups, those outputs
            product = _dequantized(value.weight[haiku], value.scales[haiku], exact)
            return _to_torch_block(product, entry).astype(numpy_dtype(dtype))

        return [_Expected(entry.torch_name, dtype, torch_shape, "dequantize", dequantized)]
    dtype = info.dtype
    if entry.quantizable and weight_format != "int8":
        dtype = _FLOAT_DTYPES[weight_format]
    return [_Expected(entry.torch_name, dtype, torch_shape, "copy" if dtype == info.dtype else "cast", of(value, dtype))]


def _check(expected: _Expected, directory: ConvertedDir, haiku_name: str, chunk_bytes: int) -> str | None:
    stored: StoredTensor | None = directory.tensors.get(expected.name)
    if stored is None:
        return f"tensor {expected.name}: missing (expected {_describe(expected.dtype, expected.shape)})"
    if (stored.dtype, stored.shape) != (expected.dtype, expected.shape):
        return (f"tensor {expected.name}: stored {_describe(stored.dtype, stored.shape)}, expected "
                f"{_describe(expected.dtype, expected.shape)}")
    itemsize = numpy_dtype(expected.dtype).itemsize
    differ = sum(_bit_differences(expected.block(index), directory.block(expected.name, index))
                 for index in block_indices(expected.shape, itemsize, chunk_bytes))
    if differ:
        return (f"tensor {expected.name}: {differ} of {math.prod(expected.shape)} elements differ from "
                f"{_RULES[expected.rule]} of {haiku_name}")
    return None


def _verify_conversion(raw: Path, converted: Path, config: "GrokConfig | None", chunk_bytes: int,
                       read: Callable[[int], None]) -> list[str]:
    directory = ConvertedDir(converted)
    stored_config = directory.config.config
    mismatches = []
    if config is not None and config != stored_config:
        mismatches.append(f"{converted}/config.json: grok_config differs from the config given in "
                          f"{'; '.join(config.differences(stored_config))}")
    weight_format = directory.config.weight_format
    expected_names, quantized = set(), {}
    for entry, info in validate_raw_checkpoint(raw, stored_config):
        value = read_tensor_file(info.path, info)
        expected = _expected_tensors(entry, info, value, weight_format)
        for tensor in expected:
            expected_names.add(tensor.name)
            problem = _check(tensor, directory, entry.haiku_name, chunk_bytes)
            if tensor.name in directory.tensors:
                read(directory.tensors[tensor.name].nbytes)
            if problem:
                mismatches.append(problem)
        if entry.quantizable:
            quantized[entry.torch_name] = len(expected) == 2
        del value
    mismatches += [f"tensor {name}: unexpected (not produced from the raw checkpoint)"
                   for name in sorted(set(directory.tensors) - expected_names)]
    stored_quantized = directory.config.quantized
    if stored_quantized != quantized:
        wrong = sorted(n for n in set(quantized) | set(stored_quantized) if stored_quantized.get(n) != quantized.get(n))
        mismatches.append(f"{converted}/config.json: \"quantized\" is wrong for {', '.join(wrong[:5])}")
    return mismatches


def _verify_raw_pair(a: Path, b: Path, config: "GrokConfig", read: Callable[[int], None]) -> list[str]:
    mismatches = []
    for (entry, info_a), (_, info_b) in zip(validate_raw_checkpoint(a, config), validate_raw_checkpoint(b, config)):
        if info_a.describe() != info_b.describe():
            mismatches.append(f"tensor {entry.haiku_name} ({info_b.path.name}): {info_b.describe()}, expected "
                              f"{info_a.describe()}")
            continue
        value_a, value_b = read_tensor_file(info_a.path, info_a), read_tensor_file(info_b.path, info_b)
        read(info_a.path.stat().st_size + info_b.path.stat().st_size)
        pairs = [(value_a.weight, value_b.weight), (value_a.scales, value_b.scales)] if info_a.quantized else \
            [(value_a, value_b)]
        differ = sum(_bit_differences(x, y) for x, y in pairs)
        if differ:
            mismatches.append(f"tensor {entry.haiku_name} ({info_b.path.name}): {differ} elements differ")
    return mismatches


def _render_dequantized(weight: np.ndarray, scales: np.ndarray, target: str, exact_product: bool) -> np.ndarray:
    """torch int8 [..., out, in] x bf16 scales [..., out, G] -> the `target` ("bfloat16"/"float32") values a
    conversion to that format stores: bf16(int8 x scale) for bf16; for fp32 that rounding widened, or the
    exact product where upstream computes with it (the MoE down projection)."""
    *lead, n_out, n_in = weight.shape
    groups = scales.shape[-1]
    grouped = weight.astype(np.float32).reshape(*lead, n_out, groups, n_in // groups)
    product = (grouped * scales.astype(np.float32)[..., None]).reshape(*lead, n_out, n_in)
    if target == "float32" and exact_product:
        return product
    rounded = product.astype(ml_dtypes.bfloat16)
    return rounded if target == "bfloat16" else rounded.astype(np.float32)


@dataclass(frozen=True)
class _Side:
    """One tensor of one converted directory, as the model uses it: a float weight, or int8 + its scales."""

    directory: ConvertedDir
    name: str

    @property
    def stored(self) -> StoredTensor:
        return self.directory.tensors[self.name]

    @property
    def scales(self) -> str | None:
        name = self.name[: -len("weight")] + "scales" if self.name.endswith(".weight") else None
        return name if name in self.directory.tensors else None

    def form(self) -> str:
        return "int8 + bf16 scales" if self.scales else self.stored.dtype

    def value(self, index: tuple, target: str, exact_product: bool) -> np.ndarray:
        block = self.directory.block(self.name, index)
        if self.scales:
            return _render_dequantized(block, self.directory.block(self.scales, index), target, exact_product)
        return block.astype(numpy_dtype(target))


def _by_value(a: _Side, b: _Side, exact_product: bool, chunk_bytes: int, read: Callable[[int], None]) -> str | None:
    """Compare one weight stored in two formats: both rendered as the narrower float format would store
    them (int8 dequantized by that format's rule, fp32 rounded once to bf16), then bit for bit."""
    floats = [side.stored.dtype for side in (a, b) if not side.scales]
    target = "bfloat16" if "bfloat16" in floats or not floats else "float32"
    shape = a.stored.shape
    differ = 0
    for index in block_indices(shape, 4, chunk_bytes):
        differ += _bit_differences(a.value(index, target, exact_product), b.value(index, target, exact_product))
    read(a.stored.nbytes + b.stored.nbytes + sum(s.directory.tensors[s.scales].nbytes for s in (a, b) if s.scales))
    if differ:
        return (f"tensor {a.name}: {differ} of {math.prod(shape)} elements differ by value ({a.form()} in "
                f"{a.directory.path}, {b.form()} in {b.directory.path}, both rendered as "
                f"{'bf16' if target == 'bfloat16' else 'fp32'})")
    return None


def converted_formats(a: str | os.PathLike, b: str | os.PathLike) -> tuple[str, str]:
    """The weight formats two converted directories store (as their config.json says)."""
    return ConvertedDir(a).config.weight_format, ConvertedDir(b).config.weight_format


def _verify_converted_pair(a: Path, b: Path, chunk_bytes: int, read: Callable[[int], None]) -> list[str]:
    """Two converted directories: the same config and tensors. Where one weight is stored in two formats
    (an int8 and a bf16 conversion, say), it is compared by value, as the narrower format stores it."""
    from convert.upstream.param_names import checkpoint_layout

    dir_a, dir_b = ConvertedDir(a), ConvertedDir(b)
    config_a, config_b = dir_a.config.config, dir_b.config.config
    if config_a != config_b:
        return [f"{b}/config.json: grok_config differs from {a}'s in {'; '.join(config_a.differences(config_b))}"]
    linears = [e for e in checkpoint_layout(config_a) if e.quantizable]
    exact_product = {e.torch_name for e in linears if not e.rule.dequant_rounds_to_bf16}
    stored_a, stored_b = dir_a.tensors, dir_b.tensors
    # Linear weights stored in two forms are compared by value; their scales belong to that value.
    cross = {e.torch_name for e in linears if e.torch_name in stored_a and e.torch_name in stored_b
             and _Side(dir_a, e.torch_name).form() != _Side(dir_b, e.torch_name).form()}
    owned = {n[: -len("weight")] + "scales" for n in cross}
    mismatches = [f"tensor {n}: missing from {b}" for n in sorted(set(stored_a) - set(stored_b) - owned)]
    mismatches += [f"tensor {n}: unexpected in {b}" for n in sorted(set(stored_b) - set(stored_a) - owned)]
    for name in sorted(set(stored_a) & set(stored_b) - owned):
        ta, tb = stored_a[name], stored_b[name]
        if name in cross and ta.shape == tb.shape:
            problem = _by_value(_Side(dir_a, name), _Side(dir_b, name), name in exact_product, chunk_bytes, read)
            if problem:
                mismatches.append(problem)
            continue
        if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
            mismatches.append(f"tensor {name}: {_describe(tb.dtype, tb.shape)}, expected {_describe(ta.dtype, ta.shape)}")
            continue
        itemsize = numpy_dtype(ta.dtype).itemsize
        differ = sum(_bit_differences(dir_a.block(name, i), dir_b.block(name, i))
                     for i in block_indices(ta.shape, itemsize, chunk_bytes))
        read(ta.nbytes + tb.nbytes)
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


def _bytes_to_read(path: Path, kind: str, config: "GrokConfig | None") -> int:
    if kind == "converted":
        return sum(t.nbytes for t in ConvertedDir(path).tensors.values())
    return sum(info.path.stat().st_size for _, info in validate_raw_checkpoint(path, config))


def verify(src: str | os.PathLike, dst: str | os.PathLike, config: "GrokConfig | None" = None,
           chunk_bytes: int = CHUNK_BYTES, progress: bool | None = False) -> list[str]:
    """Mismatches between `src` and `dst` (raw/converted in any combination), each naming the tensor.

    progress: a byte-counting bar on stderr over what is re-read (None: only on a TTY)."""
    from grok_torch.progress import progress_bar

    src, dst = Path(src), Path(dst)
    kinds = (_kind(src), _kind(dst))
    if kinds == ("raw", "raw") and config is None:
        raise ValueError("comparing two raw checkpoints needs their config")
    # The bar counts the converted side's tensor bytes (raw against converted), or both sides' bytes.
    if set(kinds) == {"raw", "converted"}:
        total = _bytes_to_read(src if kinds[0] == "converted" else dst, "converted", None)
    else:
        total = _bytes_to_read(src, kinds[0], config) + _bytes_to_read(dst, kinds[1], config)
    with progress_bar(total, "verify", progress) as bar:
        if kinds == ("raw", "converted"):
            return _verify_conversion(src, dst, config, chunk_bytes, bar.update)
        if kinds == ("converted", "raw"):
            return _verify_conversion(dst, src, config, chunk_bytes, bar.update)
        if kinds == ("converted", "converted"):
            return _verify_converted_pair(src, dst, chunk_bytes, bar.update)
        return _verify_raw_pair(src, dst, config, bar.update)


def verify_recorded(directory: str | os.PathLike, progress: bool | None = None) -> tuple[list[str], str]:
    """(mismatches, what was checked: "8 shard(s), tokenizer.model and config.json") of a converted directory
    against the sha256 recorded by the converter; each mismatch names the file. A config.json that does not
    match is refused when the directory is opened."""
    opened = ConvertedDir(directory)
    mismatches = opened.checksum_mismatches(progress)
    tokenizer = ", tokenizer.model" if opened.config.values.get("tokenizer") is not None else ""
    return mismatches, f"{len(set(opened.weight_map.values()))} shard(s){tokenizer} and config.json"
