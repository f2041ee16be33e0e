"""Matmul and attention kernels of the "fast" numerics mode, and the blocked attention of both modes.

int8 weight-only matmuls never dequantize a whole matrix per call:
- few rows (decode): torch's int8 weight-only kernel (`aten._weight_int8pack_mm`, CPU and CUDA) takes
  the int8 weight as it is and applies per-output-channel scales after the dot; scale groups G > 1
  (contiguous slices of the input axis, each with its own scale) are G such dots summed in fp32.
- many rows (prefill) or where that kernel is missing: blocked dequantization, a few output rows of
  the weight at a time, into one reused buffer of bounded size, each block followed by a GEMM.

Attention runs over query blocks with full-row softmax, so no [B, H, T, S] fp32 logits exist at once:
each query row's logits, soft-cap, mask and softmax are computed exactly as in the unblocked form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import BFloat16, Bool, Float, Int8
from torch import Tensor

# Bytes of the dequantization buffer: small enough to stay in a core's L2 / the GPU's L2-ish working set,
# large enough that each block's GEMM amortises its call.
DEQUANT_BUFFER_BYTES = 4 << 20
# Up to this many rows, the int8 weight-only kernel (the matrix read once as int8) beats blocked
# dequantization (which converts each block once and reuses it for every row).
INT8_KERNEL_MAX_ROWS = 16
# fp32 logits of one attention query block, at most (the whole [B, H, T, S] at 8192 tokens of Grok-1
# would be 12.9 GB per layer).
ATTENTION_BLOCK_BYTES = 64 << 20

_buffers: dict[tuple, Tensor] = {}


def _buffer(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reused flat scratch tensor of at least `numel` elements (one per dtype and device): the blocked
    kernels write into it instead of allocating fresh temporaries (page faults) on every call."""
    key = (dtype, device)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _buffers[key] = buf
    return buf[:numel]


def int8_kernel_available(device: torch.device) -> bool:
    """torch has its int8 weight-only matmul on this device type (CPU and CUDA builds of torch >= 2.3)."""
    return device.type in ("cpu", "cuda") and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def linear(x: Float[Tensor, "*batch inp"], weight: Float[Tensor, "out inp"], native_bf16: bool) -> Float[Tensor, "*batch out"]:
    """x @ weight^T; in bf16 on the CPU either natively (`native_bf16`) or via fp32 operands rounded once
    (XLA's CPU result, bit for bit; what grok_torch.linear.bf16_linear does)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not native_bf16:
        return F.linear(x.to(torch.float32), weight.to(torch.float32)).to(torch.bfloat16)
    return F.linear(x, weight.to(x.dtype))


def int8_linear(x: Float[Tensor, "*batch inp"], weight: Int8[Tensor, "out inp"],
                scales: BFloat16[Tensor, "out groups"], round_to_bf16: bool = True) -> Float[Tensor, "*batch out"]:
    """x @ (weight * scales)^T without a whole float copy of the weight; output in x's dtype.

    Few rows: the int8 kernel, whose scales multiply the fp32 dot (the exact int8 x scale product is
    used: no rounding of the weight). Otherwise blocked dequantization, the product rounded to the
    compute dtype (upstream's rounding for bf16; in fp32 rounded to bf16 only where `round_to_bf16`,
    as upstream's dequantization is), then a native GEMM per block.
    """
    *lead, inp = x.shape
    rows = math.prod(lead)
    flat = x.reshape(rows, inp)
    if rows <= INT8_KERNEL_MAX_ROWS and x.dtype == torch.bfloat16 and int8_kernel_available(x.device):
        out = _int8_kernel(flat, weight, scales)
    else:
        out = _blocked_dequant_linear(flat, weight, scales, round_to_bf16)
    return out.reshape(*lead, weight.shape[0])


def _int8_kernel(x: BFloat16[Tensor, "rows inp"], weight: Int8[Tensor, "out inp"],
                 scales: BFloat16[Tensor, "out groups"]) -> BFloat16[Tensor, "rows out"]:
    """aten._weight_int8pack_mm per scale group (it takes per-output-channel scales only)."""
    groups = scales.shape[-1]
    if groups == 1:
        return torch.ops.aten._weight_int8pack_mm(x, weight, scales[:, 0].contiguous())
    width = weight.shape[1] // groups
    total = None
    for g in range(groups):
        cols = slice(g * width, (g + 1) * width)
        part = torch.ops.aten._weight_int8pack_mm(x[:, cols].contiguous(), weight[:, cols].contiguous(),
                                                  scales[:, g].contiguous()).to(torch.float32)
        total = part if total is None else total.add_(part)
    return total.to(torch.bfloat16)


def _blocked_dequant_linear(x: Float[Tensor, "rows inp"], weight: Int8[Tensor, "out inp"],
                            scales: BFloat16[Tensor, "out groups"], round_to_bf16: bool) -> Float[Tensor, "rows out"]:
    """Dequantize `block` output rows at a time into one reused buffer, GEMM each block into its slice."""
    out_features, inp = weight.shape
    groups = scales.shape[-1]
    dtype = x.dtype
    block = max(1, min(out_features, DEQUANT_BUFFER_BYTES // (inp * torch.finfo(dtype).bits // 8)))
    buf = _buffer(block * inp, dtype, x.device)
    # Output rows of the weight are columns of the result: build it transposed so that each block's GEMM
    # writes a contiguous slice, and transpose the (activation-sized) result once at the end.
    out_t = torch.empty(out_features, x.shape[0], dtype=dtype, device=x.device)
    x_t = x.t()
    scale_buf = scales.to(dtype)
    for start in range(0, out_features, block):
        stop = min(out_features, start + block)
        n = stop - start
        w = buf[:n * inp].view(n, groups, inp // groups)
        w.copy_(weight[start:stop].view(n, groups, inp // groups))  # int8 -> dtype, exact
        w.mul_(scale_buf[start:stop].unsqueeze(-1))  # the exact product, rounded once to dtype
        if round_to_bf16 and dtype != torch.bfloat16:
            w.copy_(w.to(torch.bfloat16))
        torch.mm(w.view(n, inp), x_t, out=out_t[start:stop])
    out = out_t.t()
    return out.contiguous()


def attention(q: Float[Tensor, "batch seq kv_heads group head_dim"], k: Float[Tensor, "batch keys kv_heads head_dim"],
              v: Float[Tensor, "batch keys kv_heads head_dim"], key_valid: Bool[Tensor, "batch keys"], offset: int,
              multiplier: float, cap: float, mask_value: float,
              block_bytes: int | None = None) -> Float[Tensor, "batch seq kv_heads group head_dim"]:
    """Grouped-query attention with upstream's numerics, over blocks of queries.

    Per query block: QK^T in the activation dtype, then fp32, times `multiplier`, cap*tanh(./cap),
    masked (causal from `offset`, and padding keys) with `mask_value`, softmax over the whole key row,
    rounded to the activation dtype, times V. Every query row is computed as in one unblocked pass,
    so blocking changes no bit there; memory is O(block * keys) instead of O(seq * keys).
    `block_bytes` bounds one block's fp32 logits (None: ATTENTION_BLOCK_BYTES, read at call time).
    """
    if block_bytes is None:
        block_bytes = ATTENTION_BLOCK_BYTES
    batch, seq, kv_heads, group, _ = q.shape
    keys = k.shape[1]
    per_query = batch * kv_heads * group * keys * 4
    block = max(1, min(seq, block_bytes // max(1, per_query)))
    key_pos = torch.arange(keys, device=q.device)
    out = torch.empty_like(q)
    for start in range(0, seq, block):
        stop = min(seq, start + block)
        logits = torch.einsum("btkgd,bskd->bkgts", q[:, start:stop], k).to(torch.float32)
        logits = logits * multiplier
        logits = cap * torch.tanh(logits / cap)
        query_pos = torch.arange(start, stop, device=q.device)[:, None] + offset
        mask = (key_pos[None, :] <= query_pos)[None] & key_valid[:, None, :]  # [B, t, S]
        logits = logits.masked_fill(~mask[:, None, None], mask_value)
        weights = torch.softmax(logits, dim=-1).to(q.dtype)
        out[:, start:stop] = torch.einsum("bkgts,bskd->btkgd", weights, v)
    return out
