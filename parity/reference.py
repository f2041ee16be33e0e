"""A JAX/haiku reference of the upstream Grok-1 model, for parity checks.

Written from ../shared/grok1/SPEC.md and from reading upstream's model.py (xai-org/grok-1), with
the upstream parameter tree: `language_model/in_out_embed`, `language_model/rms_norm`,
`transformer/decoder_layer_{L}/{multi_head_attention/{query,key,value,linear}, rms_norm,
rms_norm_1, rms_norm_2, rms_norm_3, router, moe/{linear,linear_v,linear_1}}`. Any linear weight
may be a QuantizedWeight8bit (int8 + bf16 scales, possibly grouped along the input axis) or a
plain float array.

Two precisions:

- "bf16" reproduces upstream's forward pass cast for cast (and, where upstream's 8-way model
  mesh splits a contraction into partial sums, those partial sums; see `Numerics`);
- "fp32" runs the same graph in float32 with exact multipliers.

Where upstream cannot go, this reference generalizes: batch > 1 with per-row padding masks, any
number of experts and of selected experts, and plain (unquantized) MoE weights (upstream's MoE
returns its input then). Like upstream it computes every expert for every token, then selects.

`reference_forward` runs the model from tokens; `reference_decoder_layer` runs one layer on a
given input (teacher forcing). Both can return every intermediate under the golden reference's
names (tests/assets/golden-12l/reference_meta.json).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from convert.upstream.quantized import QuantizedWeight8bit
from grok_torch.config import GrokConfig

F32, BF16 = jnp.float32, jnp.bfloat16
FPROP_DTYPES = {"bf16": BF16, "fp32": F32}
MASK_VALUE = -1e30  # upstream's fill: a fully masked query row attends uniformly, not NaN

Params = dict[str, dict[str, Any]]

# XLA options for every compilation of the reference (per compilation rather than XLA_FLAGS, which
# only count if set before JAX creates its backend). By default XLA may keep "excess precision":
# drop an fp32 -> bf16 -> fp32 round trip (the simplify-fp-conversions pass, which the golden run
# disabled) and, in this JAX version, also keep fused bf16 intermediates such as the residual add
# in fp32, which loses upstream's bf16 roundings. tests/test_reference.py measures the cost.
COMPILER_OPTIONS: dict[str, Any] = {
    "xla_allow_excess_precision": False,
    "xla_disable_hlo_passes": "simplify-fp-conversions",
}


def _register_quantized_pytree() -> None:
    """Let QuantizedWeight8bit leaves pass through jit and haiku, children (weight, scales)."""
    try:
        jax.tree_util.register_pytree_node(
            QuantizedWeight8bit,
            lambda q: ((q.weight, q.scales), None),
            lambda _, children: QuantizedWeight8bit(*children))
    except ValueError:  # already registered (module reloaded)
        pass


_register_quantized_pytree()


# ---- numerics -------------------------------------------------------------------------------

HIGHEST = jax.lax.Precision.HIGHEST  # fp32 dots stay fp32 on every backend (no TF32)


@dataclasses.dataclass(frozen=True)
class Numerics:
    """The forward pass's compute dtype, and how upstream's 8-way model mesh splits some contractions.

    Upstream shards several contracted axes over its mesh: activations along D (router, tied output
    head), the attention output projection's input, the MoE down projection's hidden axis. Each
    device computes a partial dot and the partials are summed, which decides the last bits; in bf16
    this reference computes those dots as the same partial sums: fp32 partials for the router, the
    attention output and the MoE down projection, bf16-rounded partials for the head (each choice
    the one that matches the golden reference, see tests/test_reference.py). In fp32 every dot is
    one plain dot.
    """

    dtype: Any  # jnp.bfloat16 or jnp.float32
    shards: int  # upstream's model-mesh size (config.model_shards)

    @property
    def bf16(self) -> bool:
        return self.dtype == BF16

    def dot(self, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
        """A plain einsum as upstream writes it: bf16 operands give a bf16 result (XLA's own bf16
        dot; an fp32-accumulated dot rounded by hand differs from it in rare last bits)."""
        return jnp.einsum(spec, a, b, precision=HIGHEST)

    def split(self, size: int) -> list[slice] | None:
        """The slices of a contracted axis of `size` that upstream's shards hold; None when this
        precision (fp32) or the shape does not split it."""
        if not self.bf16 or self.shards <= 1 or size % self.shards:
            return None
        width = size // self.shards
        return [slice(s * width, (s + 1) * width) for s in range(self.shards)]

    def partial_sums(self, spec: str, x: jax.Array, w: jax.Array, w_axis: int, partial_dtype: Any) -> jax.Array:
        """einsum(spec, x, w) contracting x's last axis with w's `w_axis`, as the fp32 sum, in shard
        order, of per-shard partial dots each produced in `partial_dtype`. Returns fp32."""
        slices = self.split(x.shape[-1])
        if slices is None:
            return jnp.einsum(spec, x, w, precision=HIGHEST, preferred_element_type=F32)
        total = None
        for part in slices:
            w_part = jax.lax.slice_in_dim(w, part.start, part.stop, axis=w_axis)
            y = jnp.einsum(spec, x[..., part], w_part, precision=HIGHEST,
                           preferred_element_type=partial_dtype).astype(F32)
            total = y if total is None else total + y
        return total


def softmax(x: jax.Array) -> jax.Array:
    """fp32 softmax over the last axis, as upstream's XLA computed it: exp(x - max) divided (not
    multiplied by a reciprocal, which XLA would substitute for a division by a broadcast) by the
    sum reduced in the lane order of XLA's 8-wide vectorized reduction."""
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    total = jnp.broadcast_to(_lane_sum(e), e.shape)
    return e / jax.lax.optimization_barrier(total)


def _lane_sum(x: jax.Array, lanes: int = 8) -> jax.Array:
    """Sum over the last axis, keepdims: 8-wide chunks added in order, then the 8 lanes halved
    pairwise (the order of the golden run's reductions; measured bit-exact on its router)."""
    size = x.shape[-1]
    if size % lanes:
        x = jnp.concatenate((x, jnp.zeros((*x.shape[:-1], lanes - size % lanes), x.dtype)), axis=-1)
    acc = x[..., :lanes]
    for start in range(lanes, x.shape[-1], lanes):
        acc = acc + x[..., start:start + lanes]
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[..., :half] + acc[..., half:]
    return acc


def dequantize(leaf: Any, round_to_bf16: bool = True) -> jax.Array:
    """A linear weight as fp32 values: int8 * bf16 scales (grouped along the input axis), or a
    plain float array.

    Upstream computes `weight.astype(bf16) * scales` in bf16: the exact product (exact in fp32)
    rounded once, which `round_to_bf16` reproduces. The MoE down projection keeps the exact product
    (XLA fuses the product into its fp32 matmul; measured on the golden reference).
    """
    if not isinstance(leaf, QuantizedWeight8bit):
        return jnp.asarray(leaf).astype(F32)
    weight, scales = jnp.asarray(leaf.weight), jnp.asarray(leaf.scales)
    *lead, n_in, n_out = weight.shape
    groups = scales.shape[-2]
    grouped = weight.astype(F32).reshape(*lead, groups, n_in // groups, n_out)
    product = (grouped * scales.astype(F32)[..., :, None, :]).reshape(weight.shape)
    return product.astype(BF16).astype(F32) if round_to_bf16 else product


class Recorder:
    """Collects named intermediates (as traced arrays) when capturing; otherwise does nothing."""

    def __init__(self, enabled: bool, prefix: str = ""):
        self.enabled = enabled
        self.prefix = prefix
        self.values: dict[str, jax.Array] = {}

    def __call__(self, name: str, value: jax.Array) -> None:
        if self.enabled:
            self.values[self.prefix + name] = value

    def scoped(self, prefix: str) -> "Recorder":
        child = Recorder(self.enabled, prefix)
        child.values = self.values
        return child


# ---- modules --------------------------------------------------------------------------------

def _weight(shape: tuple[int, ...]) -> Any:
    """The `w` of the current module: zeros at init (as upstream), else array or QuantizedWeight8bit."""
    return hk.get_parameter("w", list(shape), F32, init=hk.initializers.Constant(0))


def _weight_in(scope: str, shape: tuple[int, ...]) -> Any:
    """`<current module>/<scope>/w` (the MoE's stacked expert weights `moe/linear` etc.)."""
    with hk.name_scope(scope):
        return _weight(shape)


class Linear(hk.Module):
    """y = x @ w, no bias; w [in, out] float or int8 + scales, cast to the fprop dtype like upstream."""

    def __init__(self, output_size: int, num: Numerics, *, sharded_input: bool = False, name: str | None = None):
        super().__init__(name=name)
        self.output_size = output_size
        self.num = num
        # Upstream's mesh splits this layer's input axis (the attention output projection): the
        # per-shard partial products are kept in fp32 and summed, then rounded once.
        self.sharded_input = sharded_input

    def __call__(self, x: jax.Array) -> jax.Array:
        w = dequantize(_weight((x.shape[-1], self.output_size))).astype(self.num.dtype)
        if self.sharded_input:
            return self.num.partial_sums("...k,kn->...n", x, w, 0, F32).astype(self.num.dtype)
        return self.num.dot("...k,kn->...n", x, w)


class RMSNorm(hk.Module):
    """x * rsqrt(mean(x^2) + eps) * scale in fp32, cast back to the input dtype."""

    def __init__(self, eps: float, name: str):
        super().__init__(name=name)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = hk.get_parameter("scale", [x.shape[-1]], F32, init=hk.initializers.Constant(0))
        x32 = x.astype(F32)
        mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (scale.astype(F32) * (x32 * jax.lax.rsqrt(mean_square + self.eps))).astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate((-second, first), axis=-1)


def apply_rope(x: jax.Array, base: int) -> jax.Array:
    """Rotary embedding of x [B, T, H, K] over the whole head dim, halves rotated (not interleaved).
    Positions are raw indices 0..T-1 (not shifted by padding); the phase is fp32 and the bf16 input
    is promoted, so the result is rounded once."""
    head_dim, seq = x.shape[-1], x.shape[1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=F32) / head_dim))
    phase = jnp.arange(seq, dtype=F32)[:, None] * inv_freq[None, :]
    phase = jnp.concatenate((phase, phase), axis=-1)[None, :, None, :]  # [1, T, 1, K]
    x32 = x.astype(F32)
    return (x32 * jnp.cos(phase) + rotate_half(x32) * jnp.sin(phase)).astype(x.dtype)


class MultiHeadAttention(hk.Module):
    """Grouped-query attention: RoPE on q and k, fp32 soft-capped logits, -1e30 masking."""

    def __init__(self, config: GrokConfig, num: Numerics, name: str = "multi_head_attention"):
        super().__init__(name=name)
        self.config = config
        self.num = num

    def __call__(self, x: jax.Array, mask: jax.Array, rec: Recorder) -> jax.Array:
        cfg, num = self.config, self.num
        batch, seq, dim = x.shape
        heads, kv_heads, size = cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size
        q = Linear(heads * size, num, name="query")(x)
        k = Linear(kv_heads * size, num, name="key")(x)
        v = Linear(kv_heads * size, num, name="value")(x)
        rec("q_proj", q)
        rec("k_proj", k)
        rec("v_proj", v)
        q = apply_rope(q.reshape(batch, seq, heads, size), cfg.rope_base_exponent)
        k = apply_rope(k.reshape(batch, seq, kv_heads, size), cfg.rope_base_exponent)
        v = v.reshape(batch, seq, kv_heads, size)
        # Query head j belongs to kv head j // (heads / kv_heads).
        q = q.reshape(batch, seq, kv_heads, heads // kv_heads, size)
        logits = num.dot("btkgd,bskd->bkgts", q, k).astype(F32)  # rounded to fprop, then fp32
        logits = logits * cfg.attn_output_multiplier
        cap = jnp.asarray(cfg.attn_logit_softcap, F32)
        logits = cap * jnp.tanh(logits / cap)
        logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
        weights = softmax(logits).astype(num.dtype)
        context = num.dot("bkgts,bskd->btkgd", weights, v).reshape(batch, seq, heads * size)
        rec("attn_context", context)
        return Linear(dim, num, sharded_input=True, name="linear")(context)


class Router(hk.Module):
    """fp32 logits x @ w [D, E] and their softmax; never masked (upstream's MoE drops the mask).
    In bf16 the logits are upstream's sum of per-shard fp32 partial dots over D."""

    def __init__(self, num_experts: int, num: Numerics, name: str = "router"):
        super().__init__(name=name)
        self.num_experts = num_experts
        self.num = num

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x.astype(F32)
        w = hk.get_parameter("w", [x.shape[-1], self.num_experts], F32, init=hk.initializers.Constant(0))
        logits = self.num.partial_sums("...d,de->...e", x, w.astype(F32), 0, F32)
        return logits, softmax(logits)


class MoE(hk.Module):
    """Top-k mixture of experts, each `linear_1(gelu(x @ linear) * (x @ linear_v))`, in upstream's
    precision: the two input projections in the fprop dtype, promoted to fp32 (upstream's one-hot
    expert selection is an fp32 einsum); tanh-gelu, the product and the down projection in fp32
    (down projection split in upstream's shards, partial sums added in fp32); gates rounded to the
    fprop dtype; the weighted sum over the k experts in fp32, rounded once."""

    def __init__(self, config: GrokConfig, num: Numerics, name: str = "moe"):
        super().__init__(name=name)
        self.config = config
        self.num = num

    def __call__(self, x: jax.Array, probs: jax.Array, rec: Recorder) -> jax.Array:
        cfg, num = self.config, self.num
        batch, seq, dim = x.shape
        experts, ffn = cfg.num_experts, cfg.ffn_size
        gates, index = jax.lax.top_k(probs, cfg.num_selected_experts)
        rec("expert_index", index.astype(jnp.int32))
        rec("expert_gate", gates)
        w_gate = dequantize(_weight_in("linear", (experts, dim, ffn))).astype(num.dtype)
        w_up = dequantize(_weight_in("linear_v", (experts, dim, ffn))).astype(num.dtype)
        down = _weight_in("linear_1", (experts, ffn, dim))
        w_down = dequantize(down, round_to_bf16=False)
        if not isinstance(down, QuantizedWeight8bit):
            w_down = w_down.astype(num.dtype).astype(F32)  # a plain weight takes the fprop dtype, as in any Linear
        flat = x.reshape(batch * seq, dim)
        # Every expert on every token; upstream's fp32 one-hot selection promotes the results.
        gate = num.dot("md,edf->emf", flat, w_gate).astype(F32)
        up = num.dot("md,edf->emf", flat, w_up).astype(F32)
        hidden = up * jax.nn.gelu(gate, approximate=True)  # fp32, not rounded
        # Upstream's psum over the shards of the hidden axis: fp32 partials summed in shard order.
        out_all = num.partial_sums("emf,efd->emd", hidden, w_down, 1, F32)  # [E, M, D]
        picked = jnp.take_along_axis(out_all.transpose(1, 0, 2), index.reshape(batch * seq, -1, 1), axis=1)
        weights = gates.astype(num.dtype).astype(F32).reshape(batch * seq, -1, 1)
        out = jnp.sum(weights * picked, axis=1)
        return out.astype(num.dtype).reshape(batch, seq, dim)


class DecoderLayer(hk.Module):
    """Sandwich norms: h += rms_norm_1(attn(rms_norm(h))); h += rms_norm_3(moe(rms_norm_2(h)))."""

    def __init__(self, config: GrokConfig, num: Numerics, name: str):
        super().__init__(name=name)
        self.config = config
        self.num = num

    def __call__(self, h: jax.Array, mask: jax.Array, rec: Recorder) -> jax.Array:
        cfg, num = self.config, self.num
        eps = cfg.rms_norm_eps
        rec("input", h)
        x = RMSNorm(eps, name="rms_norm")(h)
        rec("attn_norm", x)
        attn = MultiHeadAttention(cfg, num)(x, mask, rec)
        rec("attn_out", attn)
        attn = RMSNorm(eps, name="rms_norm_1")(attn)
        rec("attn_post_norm", attn)
        h = h + attn
        rec("h_after_attn", h)
        x = RMSNorm(eps, name="rms_norm_2")(h)
        rec("moe_norm", x)
        logits, probs = Router(cfg.num_experts, num)(x)
        rec("router_logits", logits)
        rec("router_probs", probs)
        moe = MoE(cfg, num)(x, probs, rec)
        rec("moe_out", moe)
        moe = RMSNorm(eps, name="rms_norm_3")(moe)
        rec("moe_post_norm", moe)
        h = h + moe
        rec("out", h)
        return h


class Transformer(hk.Module):
    """The stack of decoder layers (upstream's `transformer/decoder_layer_{i}`)."""

    def __init__(self, config: GrokConfig, num: Numerics, name: str = "transformer"):
        super().__init__(name=name)
        self.config = config
        self.num = num

    def __call__(self, h: jax.Array, mask: jax.Array, rec: Recorder, layers: Sequence[int] | None = None) -> jax.Array:
        """Runs `layers` (default: all) in order. Layers are built here, inside __call__, so that haiku
        names them `transformer/decoder_layer_{i}` as upstream does."""
        for i in range(self.config.num_layers) if layers is None else layers:
            h = DecoderLayer(self.config, self.num, name=f"decoder_layer_{i}")(h, mask, rec.scoped(f"decoder_layer_{i}."))
        return h


class InOutEmbed(hk.Module):
    """The fp32 token table, used for the lookup and (tied) for the output projection."""

    def __init__(self, config: GrokConfig, name: str = "in_out_embed"):
        super().__init__(name=name)
        self.config = config

    @property
    def embeddings(self) -> jax.Array:
        return hk.get_parameter("embeddings", [self.config.vocab_size, self.config.emb_size], F32,
                                init=hk.initializers.Constant(0))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embeddings, tokens, axis=0)


def embed_tokens(embed: InOutEmbed, tokens: jax.Array, config: GrokConfig, num: Numerics) -> jax.Array:
    """The table's rows cast to the fprop dtype, times the embedding multiplier. A Python float takes
    the activation dtype (JAX weak typing): x78.5 in bf16, the exact value in fp32."""
    return embed(tokens).astype(num.dtype) * config.embedding_multiplier_scale


def output_head(embed: InOutEmbed, h: jax.Array, config: GrokConfig, num: Numerics, rec: Recorder) -> jax.Array:
    """Final RMSNorm (`rms_norm` of the current scope), then h @ table.T (tied) times the output
    multiplier. The table is sharded along D upstream: in bf16, per-shard partial products are
    rounded to bf16 and summed in fp32 (bit-exact against the golden head; one matmul: 61 %)."""
    h = RMSNorm(config.rms_norm_eps, name="rms_norm")(h)
    rec("final_norm", h)
    logits = num.partial_sums("...d,dv->...v", h, embed.embeddings.T.astype(num.dtype), 0, num.dtype)
    logits = logits.astype(num.dtype) * config.output_multiplier_scale
    rec("logits", logits)
    return logits


class LanguageModel(hk.Module):
    """Embedding, the transformer (built outside, as upstream: `transformer/...`), final norm and
    tied output head (`language_model/{in_out_embed,rms_norm}`)."""

    def __init__(self, config: GrokConfig, num: Numerics, name: str = "language_model"):
        super().__init__(name=name)
        self.config = config
        self.num = num

    def __call__(self, tokens: jax.Array, transformer: Transformer, rec: Recorder) -> jax.Array:
        cfg, num = self.config, self.num
        embed = InOutEmbed(cfg)
        h = embed_tokens(embed, tokens, cfg, num)
        rec("input_embeddings", h)
        h = transformer(h, attention_mask(tokens, cfg.pad_token), rec)
        return output_head(embed, h, cfg, num, rec)


def attention_mask(tokens: jax.Array, pad_token: int) -> jax.Array:
    """[B, T, T] bool: query i sees key j when j <= i and token j is real (not padding)."""
    seq = tokens.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    return causal[None] & (tokens > pad_token)[:, None, :]


# ---- transformed functions --------------------------------------------------------------------

def _numerics(config: GrokConfig, fprop_dtype: str) -> Numerics:
    if fprop_dtype not in FPROP_DTYPES:
        raise ValueError(f"fprop_dtype must be one of {sorted(FPROP_DTYPES)}, got {fprop_dtype!r}")
    return Numerics(FPROP_DTYPES[fprop_dtype], config.model_shards)


def _forward_fn(tokens, *, config: GrokConfig, fprop_dtype: str, capture: bool):
    """The whole model as one haiku function (its init defines the parameter tree)."""
    num = _numerics(config, fprop_dtype)
    rec = Recorder(capture)
    logits = LanguageModel(config, num)(tokens, Transformer(config, num), rec)
    return logits, rec.values


# reference_forward runs the same modules piece by piece: embedding, each layer, head, each its
# own compiled function. Any layer runs as `decoder_layer_0` (its parameters renamed), so one
# compilation serves every layer, teacher-forced or not, and deep models compile in seconds.
_CANONICAL_LAYER = "transformer/decoder_layer_0/"


def _embed_fn(tokens, *, config: GrokConfig, fprop_dtype: str):
    with hk.name_scope("language_model"):
        return embed_tokens(InOutEmbed(config), tokens, config, _numerics(config, fprop_dtype))


def _layer_fn(h, tokens, *, config: GrokConfig, fprop_dtype: str):
    num = _numerics(config, fprop_dtype)
    rec = Recorder(True)
    mask = attention_mask(tokens, config.pad_token)
    out = Transformer(config, num)(h.astype(num.dtype), mask, rec, layers=[0])
    return out, rec.values


def _head_fn(h, *, config: GrokConfig, fprop_dtype: str):
    num = _numerics(config, fprop_dtype)
    rec = Recorder(True)
    with hk.name_scope("language_model"):
        logits = output_head(InOutEmbed(config), h.astype(num.dtype), config, num, rec)
    return logits, rec.values


def reference_model(config: GrokConfig, *, fprop_dtype: str = "bf16", capture: bool = False) -> hk.Transformed:
    """The haiku-transformed model: init(rng, tokens) -> params, apply(params, None, tokens)."""
    return hk.transform(functools.partial(_forward_fn, config=config, fprop_dtype=fprop_dtype, capture=capture))


def _jit(fn):
    """jax.jit with COMPILER_OPTIONS; an option this XLA does not know is dropped with a warning."""
    options = dict(COMPILER_OPTIONS)
    jitted = jax.jit(fn, compiler_options=options)

    def call(*args):
        nonlocal jitted
        while True:
            try:
                return jitted(*args)
            except Exception as err:  # jax raises JaxRuntimeError (INVALID_ARGUMENT) for unknown options
                unknown = [name for name in options if f"No such compile option: '{name}'" in str(err)]
                if not unknown:
                    raise
                warnings.warn(f"parity.reference: this XLA has no option {unknown[0]}; bf16 results may "
                              "differ from upstream's in more last bits", RuntimeWarning, stacklevel=3)
                del options[unknown[0]]
                jitted = jax.jit(fn, compiler_options=options)

    return call


@functools.lru_cache(maxsize=None)
def _compiled(piece: str, config: GrokConfig, fprop_dtype: str):
    """The compiled embedding, layer or head function (haiku apply: params, *inputs)."""
    fn = {"embed": _embed_fn, "layer": _layer_fn, "head": _head_fn}[piece]
    _numerics(config, fprop_dtype)  # a bad fprop_dtype fails here, before anything is compiled or cached
    return _jit(hk.without_apply_rng(hk.transform(functools.partial(fn, config=config, fprop_dtype=fprop_dtype))).apply)


def clear_compilation_cache() -> None:
    """Forget compiled functions (after changing COMPILER_OPTIONS)."""
    _compiled.cache_clear()


def _to_numpy(value: jax.Array) -> np.ndarray:
    array = np.asarray(value)
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16" \
        else array.astype(np.int32)


def _strip_prefix(params: Params) -> Params:
    return {module.removeprefix("params/"): leaves for module, leaves in params.items()}


_TOP = ("language_model/in_out_embed", "language_model/rms_norm")


def _top_params(params: Params) -> Params:
    return {module: params[module] for module in _TOP}


def _layer_params(params: Params, layer: int) -> Params:
    prefix = f"transformer/decoder_layer_{layer}/"
    layer_params = {_CANONICAL_LAYER + module[len(prefix):]: leaves
                    for module, leaves in params.items() if module.startswith(prefix)}
    if not layer_params:
        raise KeyError(f"no parameters under {prefix}")
    return layer_params


def _run_layer(params: Params, layer: int, h, tokens: np.ndarray, config: GrokConfig, fprop_dtype: str):
    """(output as fp32 device array, {decoder_layer_{layer}.*: device array})."""
    out, values = _compiled("layer", config, fprop_dtype)(_layer_params(params, layer), h, tokens)
    prefix = f"decoder_layer_{layer}."
    # fp32 between calls (bf16 upcast exactly), so one compilation serves numpy and chained inputs.
    return out.astype(F32), {prefix + name.split(".", 1)[1]: v for name, v in values.items()}


def _int_tokens(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    return tokens.astype(np.int32)


def reference_forward(params: Params, tokens: np.ndarray, config: GrokConfig, *, fprop_dtype: str = "bf16",
                      capture: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits [B, T, V] (float32; bf16 values upcast losslessly) of the upstream model for `tokens`
    [B, T], and with `capture` every intermediate under the golden reference's names."""
    params, tokens = _strip_prefix(params), _int_tokens(tokens)
    values = {}
    h = _compiled("embed", config, fprop_dtype)(_top_params(params), tokens)
    values["input_embeddings"] = h
    h = h.astype(F32)
    for layer in range(config.num_layers):
        h, layer_values = _run_layer(params, layer, h, tokens, config, fprop_dtype)
        values.update(layer_values)
    logits, head_values = _compiled("head", config, fprop_dtype)(_top_params(params), h)
    values.update(head_values)
    captured = {name: _to_numpy(v) for name, v in values.items()} if capture else {}
    return _to_numpy(logits), captured


def reference_decoder_layer(params: Params, layer: int, h: np.ndarray, tokens: np.ndarray, config: GrokConfig, *,
                            fprop_dtype: str = "bf16") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decoder layer `layer` on input h [B, T, D] (cast to the fprop dtype) with the padding mask of
    `tokens`: its output (float32) and its intermediates, named `decoder_layer_{layer}.*`."""
    if not 0 <= layer < config.num_layers:
        raise ValueError(f"layer {layer} out of range for {config.num_layers} layers")
    out, values = _run_layer(_strip_prefix(params), layer, np.asarray(h, np.float32), _int_tokens(tokens), config,
                             fprop_dtype)
    return _to_numpy(out), {name: _to_numpy(v) for name, v in values.items()}


def reference_head(params: Params, h: np.ndarray, config: GrokConfig, *, fprop_dtype: str = "bf16"
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The final RMSNorm and tied output head on h [B, T, D] (the last layer's output, cast to the
    fprop dtype): logits (float32) and {"final_norm", "logits"} (teacher forcing of the head)."""
    logits, values = _compiled("head", config, fprop_dtype)(_top_params(_strip_prefix(params)),
                                                            np.asarray(h, np.float32))
    return _to_numpy(logits), {name: _to_numpy(v) for name, v in values.items()}


# ---- parameter tree ---------------------------------------------------------------------------

def reference_param_shapes(config: GrokConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module: {param: shape}} of the haiku model's init, computed abstractly (no memory)."""
    init = reference_model(config).init
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    return {module: {name: tuple(leaf.shape) for name, leaf in leaves.items()} for module, leaves in shapes.items()}


def init_reference_params(config: GrokConfig) -> Params:
    """The haiku init of the model: upstream's initializers, i.e. every parameter zero (fp32).
    For random weights use parity.init.init_params."""
    params = jax.jit(reference_model(config).init)(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    return {module: {name: np.asarray(leaf) for name, leaf in leaves.items()} for module, leaves in params.items()}
