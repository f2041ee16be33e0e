"""Bias-free linear layers whose weights are float, or int8 with bf16 scales (weight-only quantization).

Weights use the nn.Linear layout `[*stack, out, in]`; experts stack their weights as `[E, out, in]`.
An int8 weight keeps its scales as `[*stack, out, G]`: G = 1 is per-output-channel scaling, G > 1
splits the input axis into G contiguous groups (upstream's tensor-parallel shards), each with its own
scale. The matmul dequantizes one matrix at a time, so the model never exists in bf16 as a whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int8, BFloat16
from torch import Tensor, nn

from grok_torch import kernels
from grok_torch.numerics import UPSTREAM

WEIGHT_DTYPES = {"int8": torch.int8, "bf16": torch.bfloat16, "fp32": torch.float32}


def dequantize(weight: Int8[Tensor, "*stack out inp"], scales: BFloat16[Tensor, "*stack out groups"],
               round_to_bf16: bool = True) -> Float[Tensor, "*stack out inp"]:
    """int8 [..., out, in] * bf16 scales [..., out, G] -> float [..., out, in].

    The int8 x bf16 product is exact in fp32. Upstream computes `weight.astype(bf16) * scales` in
    bf16, i.e. that exact product rounded once: `round_to_bf16` reproduces it bit for bit. Without
    it the exact fp32 product is returned (what upstream's MoE down projection effectively uses).
    """
    *lead, out_features, in_features = weight.shape
    groups = scales.shape[-1]
    grouped = weight.to(torch.float32).reshape(*lead, out_features, groups, in_features // groups)
    product = (grouped * scales.to(torch.float32).unsqueeze(-1)).reshape(*lead, out_features, in_features)
    return product.to(torch.bfloat16) if round_to_bf16 else product


def bf16_linear(x: Float[Tensor, "*batch inp"], weight: Float[Tensor, "out inp"]) -> Float[Tensor, "*batch out"]:
    """F.linear, except that on the CPU a bf16 product is computed in fp32 and rounded once.

    That is how XLA's CPU backend evaluates upstream's bf16 dots; torch's own CPU bf16 kernel sums in
    another order and flips the last bit of about 1 in 10^4 outputs more often (measured against
    the golden q/k projections: 100 % bit-exact with the fp32 route, 99.98 % without). GPUs keep the
    native bf16 GEMM (fp32 accumulation too, at full speed).
    """
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        # The same fp32 products and sums, on one block of the weight at a time (grok_torch.kernels):
        # no fp32 copy of the whole weight (measured bit-identical to the whole-matrix form).
        return kernels.linear(x, weight, native=False)
    return F.linear(x, weight)


class Linear(nn.Module):
    """y = x @ W^T with W float, or int8 * scales; `stack` adds leading expert dims."""

    def __init__(self, in_features: int, out_features: int, *, weights: str = "bf16", stack: tuple[int, ...] = (),
                 scale_groups: int = 1, dequant_rounds_to_bf16: bool = True,
                 device: torch.device | str | None = None):
        super().__init__()
        self.numerics = UPSTREAM  # set by Grok (a plain attribute: how to compute, not state)
        self.dequant_rounds_to_bf16 = dequant_rounds_to_bf16
        if weights not in WEIGHT_DTYPES:
            raise ValueError(f"weights must be one of {sorted(WEIGHT_DTYPES)}, got {weights!r}")
        if in_features % scale_groups:
            raise ValueError(f"in_features={in_features} is not divisible by scale_groups={scale_groups}")
        self.in_features, self.out_features = in_features, out_features
        self.scale_groups = scale_groups
        shape = (*stack, out_features, in_features)
        if weights == "int8":
            # Buffers, not parameters: an int8 weight cannot take gradients.
            self.register_buffer("weight", torch.zeros(shape, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.zeros((*stack, out_features, scale_groups),
                                                       dtype=torch.bfloat16, device=device))
        else:
            self.weight = nn.Parameter(torch.zeros(shape, dtype=WEIGHT_DTYPES[weights], device=device))
            self.scales = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint decides, per layer, whether its weight is int8 + scales or plain float (a
        # converted checkpoint may quantize the experts but not the attention, say): adapt first.
        weight = state_dict.get(prefix + "weight")
        has_scales = prefix + "scales" in state_dict
        if weight is not None:
            if has_scales and not self.quantized:
                self._set_format(torch.int8)
            elif not has_scales and self.quantized and weight.dtype.is_floating_point:
                self._set_format(weight.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _set_format(self, dtype: torch.dtype) -> None:
        """Re-create the (empty) weight as int8 + scales, or as a float parameter of `dtype`."""
        shape, device = tuple(self.weight.shape), self.weight.device
        del self.weight
        if "scales" in self._buffers:
            del self.scales
        if dtype == torch.int8:
            self.register_buffer("weight", torch.zeros(shape, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.zeros((*shape[:-1], self.scale_groups), dtype=torch.bfloat16,
                                                       device=device))
        else:
            self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
            self.scales = None

    def _apply(self, fn, recurse=True):
        # module.to(dtype) casts every floating buffer; scales stay bf16 (their values are bf16 either way),
        # so `model.to(torch.float32)` changes the compute dtype and leaves the quantization as it is.
        result = super()._apply(fn, recurse)
        if self.scales is not None and self.scales.dtype != torch.bfloat16 and self.scales.is_floating_point():
            self.scales = self.scales.to(torch.bfloat16)
        return result

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def weight_format(self) -> str:
        """"int8" (with scales), "bf16" or "fp32": how the weight is stored now."""
        if self.quantized:
            return "int8"
        return next((name for name, dtype in WEIGHT_DTYPES.items() if dtype == self.weight.dtype),
                    str(self.weight.dtype).removeprefix("torch."))

    def materialize(self, dtype: torch.dtype, index: int | None = None) -> Float[Tensor, "*stack out inp"]:
        """The float weight `[*stack, out, in]` (or stacked matrix `index`: `[out, in]`) in `dtype`.

        Quantized weights are dequantized as upstream does (rounded to bf16, except where the layer
        says upstream keeps the exact product): those values are the model's weights, whatever the
        compute dtype.
        """
        weight = self.weight if index is None else self.weight[index]
        if self.scales is None:
            return weight.to(dtype)
        scales = self.scales if index is None else self.scales[index]
        return dequantize(weight, scales, self.dequant_rounds_to_bf16).to(dtype)

    def forward(self, x: Float[Tensor, "*batch inp"], index: int | None = None) -> Float[Tensor, "*batch out"]:
        mode = self.numerics
        native = kernels.uses_native(mode.bf16_matmul, x)
        if self.quantized and (index is not None or self.weight.dim() == 2) \
                and (mode.int8_matmul == "kernel" or x.device.type == "cpu"):
            # Upstream's numerics on the CPU too: the values of materialize(), one block at a time.
            weight = self.weight if index is None else self.weight[index]
            scales = self.scales if index is None else self.scales[index]
            kernel = mode.int8_matmul == "kernel"
            return kernels.int8_linear(x, weight, scales, self.dequant_rounds_to_bf16, native, int8_kernel=kernel,
                                       dequantize=None if kernel else dequantize)
        if mode.bf16_matmul == "native":
            if self.scales is None:  # the stored weight as it is: the kernels convert a block at a time
                weight = self.weight if index is None else self.weight[index]
                return kernels.linear(x, weight, native, use_gemv=True)
            return kernels.linear(x, self.materialize(x.dtype, index), native, use_gemv=True)
        return bf16_linear(x, self.materialize(x.dtype, index))

    def extra_repr(self) -> str:
        fmt = "int8" if self.quantized else str(self.weight.dtype).removeprefix("torch.")
        return (f"in={self.in_features}, out={self.out_features}, stack={tuple(self.weight.shape[:-2])}, "
                f"weights={fmt}, scale_groups={self.scale_groups}")
