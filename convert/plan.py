"""What a conversion writes for each parameter, and how: pure functions of the raw value.

Output formats (`weight_format`):

- `int8`: every quantized linear keeps its int8 weight and bf16 scales bit for bit, in the torch layout:
  weight `[..., out, in]` under `ParamEntry.torch_name`, scales `[..., out, G]` under `torch_scales_name`.
  A linear weight stored unquantized (a plain bf16/fp32 array) is kept as it is, without scales.
- `bf16`: linear weights dequantized (`dequantize_torch_layout`, exact in fp32) and rounded once to bf16 -
  upstream's own `weight.astype(bf16) * scales`, bit for bit - except the MoE down projection (`moe/linear_1`),
  whose exact int8 x scale product upstream computes with: bf16 cannot hold it, so it keeps its int8 weight
  and bf16 scales as in `int8` (exact, and half the bytes of bf16); plain float weights are rounded to bf16.
- `bf16-plain`: as `bf16`, the down projection rounded to bf16 too (less faithful: README, Numerics).
- `fp32`: linear weights dequantized to the values upstream computes with, held in fp32: `bf16(int8 x
  scales)` widened, except the MoE down projection (`moe/linear_1`), whose exact int8 x bf16 products
  upstream feeds to an fp32 matmul (measured on the golden reference); plain float weights widened.

Embeddings, RMSNorm scales and the router keep their stored fp32 in every format. The driver
(convert.converter) streams these blocks to disk; verify checks them with code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import ml_dtypes
import numpy as np

from convert.disk.blocks import CHUNK_BYTES, Scratch, block_indices, contiguous, nbytes_of
from convert.upstream.layouts import dequantize_torch_layout, scales_to_torch
from convert.upstream.param_names import ParamEntry
from convert.upstream.quantized import QuantizedWeight8bit
from convert.upstream.tensor_file import TensorFileInfo
from grok_torch.converted_dir import check_weight_format
from grok_torch.dtypes import numpy_dtype
from grok_torch.weight_layouts import FLOAT_WEIGHT_DTYPE, keeps_int8

FLOAT_FORMAT_DTYPES = FLOAT_WEIGHT_DTYPE  # weight format -> dtype of its float linear weights


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
    if quantized and keeps_int8(weight_format, not entry.rule.dequant_rounds_to_bf16):
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
