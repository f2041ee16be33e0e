"""Matmul and attention kernels: blocked forms that never materialise a whole float copy of a weight matrix.

Two ways to multiply bf16 operands (grok_torch.numerics `bf16_matmul`):
- "fp32": the fp32 products of the bf16 values, summed in fp32 and rounded once (how XLA's CPU backend
  evaluates upstream's bf16 dots). Computed here on blocks of output rows: a block of the weight is
  converted (or dequantized) into one reused fp32 buffer and multiplied with the activations cast to
  fp32 once, so no fp32 copy of the whole weight exists (bf16_linear in grok_torch.linear copies both
  operands whole).
- "native": torch's bf16 GEMM where the hardware has bf16 dot-product units (CUDA; CPUs with
  AVX512-BF16 or AMX). On other CPUs torch emulates it and is slower than the fp32 form (measured on an
  AVX2 CPU, one thread, 512 x 1024 x 5464: 894 ms native, 110 ms blocked fp32), so "native" takes the
  fp32 form there.

int8 weights (numerics `int8_matmul` "kernel"): few rows (decode) with one scale per output channel go
through torch's int8 weight-only kernel (`aten._weight_int8pack_mm`: the int8 weight read as it is, the
scale applied to each fp32 dot, i.e. the exact int8 x scale product); otherwise blocked dequantization
into the reused buffer (fp32 form: the exact product, rounded to bf16 where upstream's dequantization
rounds it; native form: rounded to bf16), each block followed by a GEMM.

Attention runs over query blocks with full-row softmax, so no [B, H, T, S] fp32 logits exist at once:
each query row's logits, soft-cap, mask and softmax are computed exactly as in the unblocked form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import BFloat16, Bool, Float, Int8, Shaped
from torch import Tensor

from grok_torch import gemv

__all__ = ["linear", "int8_linear", "attention", "native_bf16"]

# Bytes of one weight block in the buffer: small enough to stay in a core's L2, large enough that each
# block's GEMM amortises its call.
WEIGHT_BLOCK_BYTES = 4 << 20
# Up to this many rows the int8 weight-only kernel beats blocked dequantization (measured on an AVX2 CPU,
# one thread, 1024 x 5464: 1.1 vs 2.1 ms at 1 row, 5.1 vs 4.6 ms at 16 rows).
INT8_KERNEL_MAX_ROWS = 8
# fp32 logits of one attention query block, at most (the whole [B, H, T, S] at 8192 tokens of Grok-1
# would be 12.9 GB per layer).
ATTENTION_BLOCK_BYTES = 64 << 20
# Tests and the fidelity script force one form of "native" (True: torch's bf16 GEMM, False: the fp32
# form) whatever the hardware; None asks the hardware.
NATIVE_BF16_OVERRIDE: bool | None = None

# The scratch buffers are shared by every call (one model computing at a time per process: the kernels
# are not for concurrent forwards from several Python threads).
_buffers: dict[tuple, Tensor] = {}
_int8_kernel_broken: set[str] = set()


def _buffer(role: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reused flat scratch tensor of at least `numel` elements, one per role, dtype and device: the
    blocked kernels write into it instead of allocating fresh temporaries (page faults) on every call."""
    key = (role, dtype, device)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = torch.empty(numel, dtype=dtype, device=device)
        _buffers[key] = buf
    return buf[:numel]


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (Linux); False where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 GEMMs run natively (at least as fast as fp32) on `device`."""
    if NATIVE_BF16_OVERRIDE is not None:
        return NATIVE_BF16_OVERRIDE
    return device.type != "cpu" or _cpu_has_bf16_units()


def uses_native(bf16_matmul: str, x: Tensor) -> bool:
    """The numerics' bf16 matmul choice for activations `x`: native bf16 GEMM or not."""
    return x.dtype == torch.bfloat16 and bf16_matmul == "native" and native_bf16(x.device)


def int8_kernel_available(device: torch.device) -> bool:
    """torch has its int8 weight-only matmul for this device type (and it has not failed here before)."""
    return (device.type in ("cpu", "cuda") and device.type not in _int8_kernel_broken
            and hasattr(torch.ops.aten, "_weight_int8pack_mm"))


def linear(x: Float[Tensor, "*batch inp"], weight: Float[Tensor, "out inp"], native: bool,
           use_gemv: bool = False) -> Float[Tensor, "*batch out"]:
    """x @ weight^T for a float weight, in x's dtype. `use_gemv` (fast mode), few rows on the CPU, a bf16
    weight: the GEMV of grok_torch.gemv (each product exact, summed in fp32 in its own order, rounded once).
    Otherwise bf16 activations: torch's bf16 GEMM (`native`) or the blocked fp32 form (upstream's bits);
    fp32 activations: an fp32 GEMM, a weight of another dtype converted one block at a time."""
    if use_gemv and weight.dtype == torch.bfloat16 and not _needs_autograd(x, weight) and gemv.supports(x, weight):
        return gemv.bf16_gemv(x, weight)
    if x.dtype != torch.bfloat16 and weight.dtype != x.dtype and not _needs_autograd(x, weight):
        out = _blocked_linear(x.reshape(-1, x.shape[-1]), weight, None, round_to_bf16=False, compute=x.dtype)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if x.dtype != torch.bfloat16 or native:
        return F.linear(x, weight.to(x.dtype))
    if _needs_autograd(x, weight):
        return F.linear(x.to(torch.float32), weight.to(torch.float32)).to(torch.bfloat16)
    out = _blocked_linear(x.reshape(-1, x.shape[-1]), weight, None, round_to_bf16=False, compute=torch.float32)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def int8_linear(x: Float[Tensor, "*batch inp"], weight: Int8[Tensor, "out inp"],
                scales: BFloat16[Tensor, "out groups"], round_to_bf16: bool = True,
                native: bool = False, int8_kernel: bool = True,
                dequantize: Callable | None = None) -> Float[Tensor, "*batch out"]:
    """x @ (weight * scales)^T without a whole float copy of the weight; output in x's dtype.

    Few rows, one scale per output channel, a dense weight, `int8_kernel`: the int8 kernel (exact
    product). Otherwise blocked dequantization: in the fp32 form (bf16 activations, not `native`; and fp32 activations) the
    exact product, rounded to bf16 where `round_to_bf16` (upstream's dequantization); natively in bf16,
    rounded to bf16. `dequantize(weight, scales, round_to_bf16)`, when given, dequantizes each block
    (upstream mode passes grok_torch.linear.dequantize, so that its arithmetic lives in one place).
    """
    *lead, inp = x.shape
    rows = math.prod(lead)
    # Decode on the CPU, any scale groups and row stride: the exact int8 x scale product, as torch's kernel
    # below (bf16 activations; fp32 ones only where upstream keeps that product: they get what they ask).
    if (int8_kernel and (x.dtype == torch.bfloat16 or not round_to_bf16) and not _needs_autograd(x, scales)
            and gemv.supports(x, weight)):
        return gemv.int8_gemv(x, weight, scales)
    flat = x.reshape(rows, inp)
    # The kernel takes one scale per output channel and reads a dense weight without checking: G > 1
    # groups (a column slice each) and strided weights (views of a transposed tree) take the blocked path.
    if (int8_kernel and rows <= INT8_KERNEL_MAX_ROWS and x.dtype == torch.bfloat16 and scales.shape[-1] == 1
            and weight.is_contiguous() and int8_kernel_available(x.device)):
        try:
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), weight, scales[:, 0].contiguous())
            return out.reshape(*lead, weight.shape[0])
        except RuntimeError:  # a build whose kernel refuses this device or layout: never try it again here
            _int8_kernel_broken.add(x.device.type)
    compute = x.dtype if native or x.dtype != torch.bfloat16 else torch.float32
    if _needs_autograd(x, scales):  # the blocked form writes into scratch buffers: no gradients through it
        from_dequantize = dequantize or _dequantize_whole
        return F.linear(x.to(compute), from_dequantize(weight, scales, round_to_bf16).to(compute)).to(x.dtype)
    out = _blocked_linear(flat, weight, scales, round_to_bf16, compute, dequantize)
    return out.reshape(*lead, weight.shape[0])


def _needs_autograd(*tensors: Tensor) -> bool:
    """Gradients are being recorded through one of `tensors` (training, or a check of gradients)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _dequantize_whole(weight: Int8[Tensor, "out inp"], scales: BFloat16[Tensor, "out groups"],
                      round_to_bf16: bool) -> Float[Tensor, "out inp"]:
    """The exact int8 x scale product in fp32 (rounded to bf16 where asked): the blocked form's values, whole."""
    n, k = weight.shape
    g = scales.shape[-1]
    product = (weight.to(torch.float32).view(n, g, k // g) * scales.to(torch.float32).unsqueeze(-1)).view(n, k)
    return product.to(torch.bfloat16) if round_to_bf16 else product


def _blocked_linear(x: Float[Tensor, "rows inp"], weight: Shaped[Tensor, "out inp"],
                    scales: BFloat16[Tensor, "out groups"] | None, round_to_bf16: bool,
                    compute: torch.dtype, dequantize: Callable | None = None) -> Float[Tensor, "rows out"]:
    """Convert (and dequantize, with `scales`) a block of output rows of `weight` at a time into one reused
    buffer of dtype `compute`, multiply the activations (cast to `compute` once) with it into a reused
    block of results, and copy that into its columns of the output (x's dtype, rounded once)."""
    rows, inp = x.shape
    out_features = weight.shape[0]
    size = torch.finfo(compute).bits // 8
    block = max(1, min(out_features, WEIGHT_BLOCK_BYTES // (inp * size)))
    w_buf = _buffer("weight", block * inp, compute, x.device)
    r_buf = _buffer("result", rows * block, compute, x.device)
    rounding = _buffer("rounding", block * inp, torch.bfloat16, x.device) \
        if scales is not None and round_to_bf16 and compute != torch.bfloat16 else None
    xc = x if x.dtype == compute else x.to(compute)
    groups = 1 if scales is None else scales.shape[-1]
    scale_c = None if scales is None else scales.to(compute)
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, block):
        stop = min(out_features, start + block)
        n = stop - start
        w = w_buf[:n * inp].view(n, inp)
        if dequantize is not None and scales is not None:
            w.copy_(dequantize(weight[start:stop], scales[start:stop], round_to_bf16))
        else:
            w.copy_(weight[start:stop])  # int8 or bf16 -> compute dtype: exact
        if scale_c is not None and dequantize is None:
            # The exact int8 x scale product (in fp32; in bf16 rounded once, as upstream's dequantization).
            w.view(n, groups, inp // groups).mul_(scale_c[start:stop].unsqueeze(-1))
            if rounding is not None:
                r16 = rounding[:n * inp].view(n, inp)
                r16.copy_(w)
                w.copy_(r16)
        result = r_buf[:rows * n].view(rows, n)
        torch.mm(xc, w.t(), out=result)
        out[:, start:stop].copy_(result)
    return out


def attention(q: Float[Tensor, "batch seq kv_heads group head_dim"], k: Float[Tensor, "batch keys kv_heads head_dim"],
              v: Float[Tensor, "batch keys kv_heads head_dim"], mask: Callable[[int, int], Tensor],
              multiplier: float, cap: float, mask_value: float, soft_cap: Callable[[Tensor, float], Tensor],
              block_bytes: int | None = None,
              fp32_dots: bool = False) -> Float[Tensor, "batch seq kv_heads group head_dim"]:
    """Grouped-query attention with upstream's numerics, over blocks of queries.

    Per query block: QK^T in the activation dtype, then fp32, times `multiplier`, soft_cap(., cap),
    masked where `mask(start, stop)` ([B, stop - start, keys] bool: which keys queries start..stop-1
    may see) is False, with `mask_value`, softmax over the whole key row, rounded to the activation dtype,
    times V. Every query row is computed as in one unblocked pass, so blocking changes no bit there;
    memory is O(block * keys) instead of O(seq * keys). `block_bytes` bounds one block's fp32 logits
    (None: ATTENTION_BLOCK_BYTES, read at call time). `fp32_dots`: the two bf16 products computed as fp32
    products rounded once to bf16 (fast mode on CPUs without bf16 units, where torch's bf16 batched
    matmul is emulated and several times slower).
    """
    if block_bytes is None:
        block_bytes = ATTENTION_BLOCK_BYTES
    batch, seq, kv_heads, group, _ = q.shape
    keys = k.shape[1]
    per_query = batch * kv_heads * group * keys * 4
    block = max(1, min(seq, block_bytes // max(1, per_query)))
    out = torch.empty_like(q)
    for start in range(0, seq, block):
        stop = min(seq, start + block)
        logits = _dot("btkgd,bskd->bkgts", q[:, start:stop], k, fp32_dots).to(torch.float32)
        logits = logits * multiplier
        logits = soft_cap(logits, cap)
        logits = logits.masked_fill(~mask(start, stop)[:, None, None], mask_value)
        weights = torch.softmax(logits, dim=-1).to(q.dtype)
        out[:, start:stop] = _dot("bkgts,bskd->btkgd", weights, v, fp32_dots)
    return out


def _dot(equation: str, a: Tensor, b: Tensor, fp32: bool) -> Tensor:
    """einsum in the operands' dtype, or (`fp32`, bf16 operands) in fp32 and rounded once to their dtype."""
    if fp32 and a.dtype == torch.bfloat16:
        return torch.einsum(equation, a.to(torch.float32), b.to(torch.float32)).to(a.dtype)
    return torch.einsum(equation, a, b)
