"""Seeded random parameters for the upstream Grok-1 tree, in numpy (no JAX needed).

Upstream's haiku initializers are all Constant(0), so a parity run has to draw its own weights.
The recipe is the one the golden reference was made with (tests/assets/golden-12l/config.json,
"init"), chosen so that every numerics trap is actually exercised:

- embeddings N(0, 0.1): with the x78 embedding multiplier the residual stream starts at O(8);
- RMSNorm scales uniform(0.5, 1.5): a wrong scale index or a dropped scale shows;
- linear weights N(0, 1/fan_in), so activations keep their size through every projection;
- query and key weights times `qk_std_mult`, so that the attention logits, after
  attn_output_multiplier, have a standard deviation of about 6: the softmax is peaked and the
  30 * tanh(x / 30) soft-cap bends the largest logits, instead of a near-uniform attention that
  would hide RoPE, masking and scaling bugs;
- router weights times 2, so the router's top-k margins are mostly clear of rounding noise
  (a near-uniform router would make expert choices flip on the last bit).

Linear weights are then quantized to int8 with bf16 scales like the released checkpoint (scale
groups G = model_shards for the attention output projection and the MoE down projection, else 1),
or kept as float arrays.
"""

from __future__ import annotations

import math

import numpy as np

from convert.upstream.param_names import checkpoint_layout
from convert.upstream.quantized import QuantizedWeight8bit, quantize_int8
from grok_torch.config import GrokConfig

EMBED_STD = 0.1
ATTN_LOGIT_STD = 6.0
ROUTER_STD_MULT = 2.0
NORM_SCALE_RANGE = (0.5, 1.5)

_ATTENTION_MODULES = ("multi_head_attention/query", "multi_head_attention/key",
                      "multi_head_attention/value", "multi_head_attention/linear")


def qk_std_mult(config: GrokConfig, attn_logit_std: float = ATTN_LOGIT_STD) -> float:
    """Factor on the N(0, 1/fan_in) query and key weights giving attention logits of std
    `attn_logit_std` once multiplied by attn_output_multiplier.

    With unit-variance normed inputs each q and k component has std m, so q.k over key_size
    components has std m^2 * sqrt(key_size); times the multiplier that should be the target.
    (The golden-12l config gives 4.1195 for key_size 16.)
    """
    return math.sqrt(attn_logit_std / (config.attn_output_multiplier * math.sqrt(config.key_size)))


def init_params(config: GrokConfig, *, seed: int = 0, quantize_attention: bool = True,
                quantize_moe: bool = True, float_dtype: str = "fp32"
                ) -> dict[str, dict[str, np.ndarray | QuantizedWeight8bit]]:
    """{haiku module path: {param: array | QuantizedWeight8bit}}, the raw checkpoint's tree.

    Deterministic for a seed: parameters are drawn in checkpoint file order from one generator,
    and the quantization flags only change how the drawn weights are stored. Unquantized linear
    weights are `float_dtype` ("fp32" or "bf16") arrays; embeddings, norms and router stay fp32
    as in the checkpoint.
    """
    if float_dtype not in ("fp32", "bf16"):
        raise ValueError(f"float_dtype must be 'fp32' or 'bf16', got {float_dtype!r}")
    rng = np.random.default_rng(seed)
    qk_mult = qk_std_mult(config)
    tree: dict[str, dict[str, np.ndarray | QuantizedWeight8bit]] = {}
    for entry in checkpoint_layout(config):
        shape = entry.haiku_shape
        module = entry.haiku_module.split("/", 2)[-1] if entry.layer is not None else entry.haiku_module
        if entry.kind == "embedding":
            value = rng.normal(0.0, EMBED_STD, shape)
        elif entry.kind == "norm":
            value = rng.uniform(*NORM_SCALE_RANGE, shape)
        elif entry.kind == "router":
            value = rng.normal(0.0, ROUTER_STD_MULT / math.sqrt(shape[-2]), shape)
        else:  # a linear weight [..., in, out]
            std = 1.0 / math.sqrt(shape[-2])
            if module in ("multi_head_attention/query", "multi_head_attention/key"):
                std *= qk_mult
            value = rng.normal(0.0, std, shape)
        value = value.astype(np.float32)
        if entry.quantizable:
            quantize = quantize_attention if module in _ATTENTION_MODULES else quantize_moe
            if quantize:
                value = quantize_int8(value, entry.scale_groups)
            elif float_dtype == "bf16":
                import ml_dtypes

                value = value.astype(ml_dtypes.bfloat16)
        tree.setdefault(entry.haiku_module, {})[entry.haiku_param] = value
    return tree
