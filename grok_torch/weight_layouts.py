"""The stored weight formats of the linear layers, and which linears each keeps as int8 + scales.

- "int8": every quantized linear as int8 + bf16 scales (the release's format);
- "bf16": every linear in bf16, rounded as upstream dequantizes (bf16(int8 x scale)), except the linears
  whose exact int8 x scale product upstream computes with (the MoE down projection, `linear_1`: XLA fuses
  its dequantization into an fp32 matmul). bf16 cannot hold that product, so they stay int8 + scales,
  which hold it exactly in half the bytes of bf16; "bf16" is then as faithful as "int8";
- "bf16-plain": every linear in bf16, the down projection's product rounded too (the old "bf16"; measured
  less faithful, see the README's Numerics section);
- "fp32": every linear in fp32, holding the values upstream computes with (the exact product included).

A linear that is not quantized in the source (a float array) is stored as a float in every float format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# weight format -> dtype name of its float linear weights (int8 has none)
FLOAT_WEIGHT_DTYPE = {"bf16": "bfloat16", "bf16-plain": "bfloat16", "fp32": "float32"}
KEEPS_EXACT_PRODUCTS = ("bf16",)  # formats storing the exact-product linears as int8 + scales


def keeps_exact_products(weight_format: str) -> bool:
    """Whether `weight_format` keeps the exact-product linears (the MoE down projections) int8 + scales."""
    return weight_format in KEEPS_EXACT_PRODUCTS


def keeps_int8(weight_format: str, exact_product: bool) -> bool:
    """Whether a quantized linear stays int8 + scales in `weight_format` (`exact_product`: upstream uses its
    exact int8 x scale product, i.e. it is a MoE down projection)."""
    return weight_format == "int8" or (exact_product and keeps_exact_products(weight_format))


def exact_product_weights(model: "nn.Module") -> set[str]:
    """The names (`....weight`) of the linears of `model` whose exact dequantized product upstream uses."""
    from grok_torch.linear import Linear

    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, Linear) and not module.dequant_rounds_to_bf16}


def layout_of(model: "nn.Module") -> str:
    """How `model`'s linears (the router aside: it is fp32) store their weights: "int8", "bf16" (bf16, the
    exact-product linears int8 + scales), "bf16-plain" (all bf16), "fp32", or "mixed (...)" naming the
    formats found."""
    from grok_torch.linear import Linear

    rounded, exact = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, Linear) and not name.endswith(".router"):
            (rounded if module.dequant_rounds_to_bf16 else exact).add(module.weight_format)
    if rounded == {"bf16"} and exact <= {"int8"}:
        return "bf16" if exact else "bf16-plain"
    if rounded == {"bf16"} and exact == {"bf16"}:
        return "bf16-plain"
    formats = sorted(rounded | exact)
    return formats[0] if len(formats) == 1 else f"mixed ({', '.join(formats)})"
