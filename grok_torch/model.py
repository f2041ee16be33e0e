"""Grok-1 in PyTorch, in one file of plain modules, numerically faithful to the upstream JAX model.

Two compute dtypes: bf16 (upstream's), fp32 the same graph in float32 for exact comparisons. The numerics
mode (grok_torch.numerics) says how: "upstream" reproduces every cast of upstream's bf16 forward pass (see
SPEC.md), "fast" (the default) uses the fast kernels (grok_torch.kernels), the engines' presets their casts. Weights are int8 + bf16 scales, bf16 or fp32
(grok_torch.linear). Experts are stacked `[E, ...]` and each runs only on the tokens routed to it.

Intermediates can be recorded under the names of the golden reference (`decoder_layer_3.moe_out`,
...) by passing a dict as `record`; the parity harness compares them sub-module by sub-module.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from grok_torch import kernels
from grok_torch.config import GrokConfig
from grok_torch.linear import Linear, bf16_linear
from grok_torch.numerics import UPSTREAM, Numerics, resolve

# Upstream masks with a large finite number, not -inf: a query whose keys are all masked (a
# left-padded row) then attends uniformly instead of producing NaN.
MASK_VALUE = -1e30

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

Record = dict[str, Tensor] | None


def _put(record: Record, name: str, value: Tensor) -> None:
    if record is not None:
        record[name] = value.detach()


def activation_dtype_multiplier(value: float, like: Tensor) -> Tensor:
    """A Python-float multiplier as upstream applies it: rounded to the activation dtype (JAX weak
    typing), so bf16(78.38...) = 78.5 in a bf16 run and the exact value in an fp32 run."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale, computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.numerics = UPSTREAM  # set by Grok
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32, device=device))

    def forward(self, x: Float[Tensor, "*batch dim"]) -> Float[Tensor, "*batch dim"]:
        x32 = x.to(torch.float32)
        normed = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + self.eps)
        return scale_normed(normed, self.weight, x.dtype, self.numerics)


def scale_normed(normed: Float[Tensor, "*batch dim"], scale: Float[Tensor, "dim"], dtype: torch.dtype,
                 numerics: Numerics) -> Float[Tensor, "*batch dim"]:
    """RMSNorm's last step, normed (fp32) times the scale, rounded to `dtype`: upstream multiplies by the
    fp32 scale and rounds once; the engines hold the scale in the activation dtype, and vLLM's kernel
    rounds the normalised value before it multiplies (see grok_torch.numerics)."""
    if numerics.norm_scale_in_activation_dtype:
        scale = scale.to(dtype)
    if numerics.norm_rounds_before_scale:
        normed = normed.to(dtype)
    return (scale.to(torch.float32) * normed.to(torch.float32)).to(dtype)


def expert_activation(x: Float[Tensor, "*batch"]) -> Float[Tensor, "*batch"]:
    """jax.nn.gelu's default: the tanh approximation, not the exact erf form."""
    return F.gelu(x, approximate="tanh")


def erf_gelu(x: Float[Tensor, "*batch"]) -> Float[Tensor, "*batch"]:
    """The exact GELU, x * Phi(x): what the engines' fused MoE "gelu" computes (numerics expert_gelu="erf")."""
    return F.gelu(x, approximate="none")


def gated_product(up: Float[Tensor, "tokens ffn"], gate: Float[Tensor, "tokens ffn"], dtype: torch.dtype,
                  numerics: Numerics) -> Float[Tensor, "tokens ffn"]:
    """up * gelu(gate) in fp32, the down projection's input. Upstream keeps it fp32; the engines' fused
    act-and-mul stores it in the activation dtype."""
    hidden = up * (expert_activation(gate) if numerics.expert_gelu == "tanh" else erf_gelu(gate))
    return hidden.to(dtype).to(torch.float32) if numerics.round_gated_product else hidden


def expert_weights(gates: Float[Tensor, "tokens k"], dtype: torch.dtype,
                   numerics: Numerics) -> Float[Tensor, "tokens k"]:
    """The gates that weight the fp32 expert outputs: upstream rounds them to the activation dtype first,
    the engines' fused MoE multiplies its fp32 top-k weights."""
    return gates.to(dtype).to(torch.float32) if numerics.round_gates else gates


def soft_cap(logits: Float[Tensor, "*batch"], cap: float) -> Float[Tensor, "*batch"]:
    """cap * tanh(logits / cap): upstream bounds every attention logit to (-cap, cap)."""
    return cap * torch.tanh(logits / cap)


def select_experts(probs: Float[Tensor, "tokens experts"], k: int) -> tuple[Float[Tensor, "tokens k"], Int[Tensor, "tokens k"]]:
    """Top-k experts by router probability; the gates are the raw probabilities (not renormalised)."""
    return torch.topk(probs, k, dim=-1)


def choose_experts(probs: Float[Tensor, "tokens experts"], k: int,
                   numerics: Numerics) -> tuple[Float[Tensor, "tokens k"], Int[Tensor, "tokens k"]]:
    """select_experts, then with `renormalize_gates` the gates divided by their sum (older vLLM's FusedMoE
    default renormalize=True); the same experts either way."""
    gates, experts = select_experts(probs, k)
    return (gates / gates.sum(dim=-1, keepdim=True) if numerics.renormalize_gates else gates), experts


def rotate_half(x: Float[Tensor, "*batch dim"]) -> Float[Tensor, "*batch dim"]:
    """[x1, x2] -> [-x2, x1] over the last axis, split in halves (not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@functools.lru_cache(maxsize=4)
def rope_tables(seq: int, offset: int, head_dim: int, base: int, device: torch.device,
                inference: bool) -> tuple[Float[Tensor, "1 seq 1 head_dim"], Float[Tensor, "1 seq 1 head_dim"]]:
    """fp32 cos and sin of the RoPE phase of positions offset..offset+seq-1, [1, T, 1, K]: the same for
    q and k and every layer of one forward, so computed once per step (kept for the last few; `inference`
    keys inference-mode tensors apart, since autograd may not save them)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (base ** (exponents / head_dim))
    positions = torch.arange(seq, dtype=torch.float32, device=device) + offset
    phase = torch.outer(positions, inv_freq).repeat(1, 2)[None, :, None, :]
    return torch.cos(phase), torch.sin(phase)


def _tables(x: Tensor, offset: int, base: int) -> tuple[Tensor, Tensor]:
    return rope_tables(x.shape[1], offset, x.shape[-1], base, x.device, torch.is_inference_mode_enabled())


def apply_rope(x: Float[Tensor, "batch seq heads head_dim"], offset: int, base: int) -> Float[Tensor, "batch seq heads head_dim"]:
    """Rotary embedding over the full head dim; phase in fp32, positions offset by the cache step,
    result rounded once to the input dtype (upstream multiplies the bf16 input by fp32 cos/sin)."""
    cos, sin = _tables(x, offset, base)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def apply_rope_in_activation_dtype(x: Float[Tensor, "batch seq heads head_dim"], offset: int,
                                   base: int) -> Float[Tensor, "batch seq heads head_dim"]:
    """apply_rope as vLLM computes it: the same fp32 phase, but cos/sin tables stored in the input dtype and
    the rotation x*cos - y*sin done in it, every product and the sum rounded."""
    cos, sin = _tables(x, offset, base)
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def rope(x: Float[Tensor, "batch seq heads head_dim"], offset: int, base: int,
         numerics: Numerics) -> Float[Tensor, "batch seq heads head_dim"]:
    """RoPE in the numerics mode's precision: upstream's apply_rope, or the engines' (rope_in_activation_dtype)."""
    if numerics.rope_in_activation_dtype:
        return apply_rope_in_activation_dtype(x, offset, base)
    return apply_rope(x, offset, base)


@dataclass
class KVCache:
    """Keys/values of every layer for incremental decoding; all rows advance together.

    `key_valid[b, s]` remembers which cached positions were real tokens (not padding), so later
    steps mask padded prompt positions exactly as a full forward pass does.
    """

    keys: list[Tensor]  # per layer [B, S_max, kv_heads, K]
    values: list[Tensor]
    key_valid: Tensor  # [B, S_max] bool
    length: int = 0

    @classmethod
    def empty(cls, config: GrokConfig, batch: int, max_len: int, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> "KVCache":
        shape = (batch, max_len, config.num_kv_heads, config.key_size)
        return cls(keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
                   values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
                   key_valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device))

    @property
    def capacity(self) -> int:
        return self.key_valid.shape[1]


def attention_mask(key_valid: Bool[Tensor, "batch keys"], num_queries: int, offset: int) -> Bool[Tensor, "batch queries keys"]:
    """Query i (absolute position offset + i) may see key j when j <= offset + i and key j is a real token."""
    num_keys = key_valid.shape[1]
    query_pos = torch.arange(num_queries, device=key_valid.device)[:, None] + offset
    causal = torch.arange(num_keys, device=key_valid.device)[None, :] <= query_pos
    return causal[None] & key_valid[:, None, :]


class Attention(nn.Module):
    """Grouped-query attention with RoPE, fp32 soft-capped logits and an output projection."""

    def __init__(self, config: GrokConfig, weights: str, device=None):
        super().__init__()
        self.config = config
        self.numerics = UPSTREAM  # set by Grok
        d, k = config.emb_size, config.key_size
        self.q_proj = Linear(d, config.num_q_heads * k, weights=weights, device=device)
        self.k_proj = Linear(d, config.num_kv_heads * k, weights=weights, device=device)
        self.v_proj = Linear(d, config.num_kv_heads * k, weights=weights, device=device)
        self.o_proj = Linear(config.num_q_heads * k, d, weights=weights, scale_groups=config.model_shards, device=device)
        self.tp = None  # grok_torch.tp: sums the row-split o_proj's partial outputs over the ranks

    def forward(self, x: Float[Tensor, "batch seq dim"], key_valid: Bool[Tensor, "batch seq"],
                cache: KVCache | None = None, layer: int = 0, record: Record = None,
                prefix: str = "") -> Float[Tensor, "batch seq dim"]:
        cfg = self.config
        batch, seq, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        _put(record, prefix + "q_proj", q)
        _put(record, prefix + "k_proj", k)
        _put(record, prefix + "v_proj", v)
        offset = cache.length if cache is not None else 0
        q = rope(q.view(batch, seq, cfg.num_q_heads, cfg.key_size), offset, cfg.rope_base_exponent, self.numerics)
        k = rope(k.view(batch, seq, cfg.num_kv_heads, cfg.key_size), offset, cfg.rope_base_exponent, self.numerics)
        v = v.view(batch, seq, cfg.num_kv_heads, cfg.key_size)
        if cache is not None:
            end = offset + seq
            cache.keys[layer][:, offset:end] = k
            cache.values[layer][:, offset:end] = v
            k, v = cache.keys[layer][:, :end], cache.values[layer][:, :end]
            key_valid = cache.key_valid[:, :end]
        # Query head j shares kv head j // (num_q_heads / num_kv_heads). QK^T in x.dtype, then fp32 logits
        # times the multiplier, soft-capped, masked (attention_mask), softmax: over query blocks,
        # so no [B, H, T, S] fp32 logits exist at once (grok_torch.kernels.attention; each row unchanged).
        q = q.view(batch, seq, cfg.num_kv_heads, cfg.q_heads_per_kv_head, cfg.key_size)
        def mask(start: int, stop: int) -> Bool[Tensor, "batch block keys"]:
            return attention_mask(key_valid, stop - start, offset + start)

        fp32_dots = self.numerics.bf16_matmul == "native" and not kernels.uses_native("native", x)
        context = kernels.attention(q, k, v, mask, cfg.attn_output_multiplier, cfg.attn_logit_softcap, MASK_VALUE,
                                    soft_cap, fp32_dots=fp32_dots).reshape(batch, seq, -1)
        _put(record, prefix + "attn_context", context)
        return self.o_proj(context) if self.tp is None else self.tp.row_parallel(self.o_proj, context)


# fp32 hidden state of one expert's chunk of tokens, at most (at Grok-1's width F = 32768: 256 tokens;
# an 8192-token prompt would otherwise hold its ~4096 tokens per expert, 537 MB per fp32 tensor).
EXPERT_CHUNK_BYTES = 32 << 20


def _expert_hidden_in_activation_dtype(numerics: Numerics, x: Tensor) -> bool:
    """The numerics' expert_hidden_dtype for activations `x` ("auto": where bf16 matmuls run natively)."""
    choice = numerics.expert_hidden_dtype
    return choice == "activation" or (choice == "auto" and kernels.uses_native(numerics.bf16_matmul, x))


class MoE(nn.Module):
    """Top-k mixture of gated-GELU experts with fp32 routing and sparse dispatch."""

    def __init__(self, config: GrokConfig, weights: str, device=None):
        super().__init__()
        self.config = config
        self.numerics = UPSTREAM  # set by Grok
        d, f, e = config.emb_size, config.ffn_size, config.num_experts
        self.router = Linear(d, e, weights="fp32", device=device)  # routing is fp32 upstream
        self.gate_proj = Linear(d, f, weights=weights, stack=(e,), device=device)  # haiku `linear`
        self.up_proj = Linear(d, f, weights=weights, stack=(e,), device=device)  # haiku `linear_v`
        # haiku `linear_1`; upstream keeps its dequantized product exact (see convert.upstream.param_names).
        self.down_proj = Linear(f, d, weights=weights, stack=(e,), scale_groups=config.model_shards,
                                dequant_rounds_to_bf16=False, device=device)
        self.tp = None  # grok_torch.tp: sums the row-split experts' fp32 partial outputs over the ranks

    def route(self, x: Float[Tensor, "tokens dim"]) -> tuple[Float[Tensor, "tokens experts"], Float[Tensor, "tokens experts"]]:
        """Router logits and softmax probabilities, both fp32. Padding is not masked (upstream's MoE
        never receives the padding mask). The engines' routers differ (engine_router_logits)."""
        if self.numerics.router_in_activation_dtype or self.numerics.router_softcap > 0:
            logits = engine_router_logits(x, self.router.weight, self.numerics).to(torch.float32)
            return logits, torch.softmax(logits, dim=-1)
        logits = F.linear(x.to(torch.float32), self.router.weight.to(torch.float32))
        return logits, torch.softmax(logits, dim=-1)

    def expert(self, index: int, x: Float[Tensor, "tokens dim"]) -> Float[Tensor, "tokens dim"]:
        """linear_1(gelu(x @ linear) * (x @ linear_v)) for one expert, in upstream's precision: the two
        input projections in the activation dtype, then gelu, the product and the down projection
        in fp32 (upstream's one-hot expert selection promotes them), returned in fp32. With the numerics'
        expert_hidden_dtype "activation", all of it in the activation dtype (returned in it)."""
        if _expert_hidden_in_activation_dtype(self.numerics, x):
            return self.down_proj(self.up_proj(x, index) * expert_activation(self.gate_proj(x, index)), index)
        gate = self.gate_proj(x, index).to(torch.float32)
        up = self.up_proj(x, index).to(torch.float32)
        hidden = gated_product(up, gate, x.dtype, self.numerics)
        if self.numerics.round_down_proj:  # engines: linear_1 held in the activation dtype
            return F.linear(hidden, self.down_weight(index, x.dtype))
        return self.down_proj(hidden, index)  # fp32 activations: an fp32 matmul with the exact product

    def down_weight(self, index: int, dtype: torch.dtype) -> Float[Tensor, "dim ffn"]:
        """linear_1 of one expert in fp32: upstream's exact dequantized product, or (engines, whose export and
        fused MoE hold it in bf16) that product rounded to the activation dtype."""
        weight = self.down_proj.materialize(torch.float32, index)
        return weight.to(dtype).to(torch.float32) if self.numerics.round_down_proj else weight

    def forward(self, x: Float[Tensor, "batch seq dim"], record: Record = None,
                prefix: str = "") -> Float[Tensor, "batch seq dim"]:
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        logits, probs = self.route(flat)
        gates, experts = choose_experts(probs, self.config.num_selected_experts, self.numerics)
        _put(record, prefix + "router_logits", logits.view(batch, seq, -1))
        _put(record, prefix + "router_probs", probs.view(batch, seq, -1))
        _put(record, prefix + "expert_index", experts.view(batch, seq, -1).to(torch.int32))
        _put(record, prefix + "expert_gate", gates.view(batch, seq, -1))
        # Upstream rounds the gates to the activation dtype before weighting the fp32 expert outputs.
        gates = expert_weights(gates, x.dtype, self.numerics)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        self.dispatch(flat, experts, gates, out)
        if self.tp is not None:
            out = self.tp.all_reduce(out)
        return out.to(x.dtype).view(batch, seq, dim)

    def dispatch(self, flat: Float[Tensor, "tokens dim"], experts: Int[Tensor, "tokens k"],
                 gates: Float[Tensor, "tokens k"], out: Float[Tensor, "tokens dim"]) -> None:
        """Add every (token, chosen expert) pair's gated expert output (fp32) into `out`: the pairs sorted by
        expert once (stable: within an expert in token order, as a per-expert scan finds them), each
        expert run on its contiguous slice, EXPERT_CHUNK_BYTES of fp32 hidden state at a time, and added
        in that order (index_add_ sums each row's pairs in the order given, so chunks change no bit of
        the sum), so a long prompt never holds every pair's input, hidden state or output at once."""
        k = experts.shape[-1]
        order = torch.argsort(experts.reshape(-1), stable=True)
        token, slot = order // k, order % k
        counts = torch.bincount(experts.reshape(-1), minlength=self.config.num_experts).tolist()
        weights = gates[token, slot, None]
        chunk = max(1, EXPERT_CHUNK_BYTES // (4 * self.down_proj.in_features))
        start = 0
        for index, count in enumerate(counts):
            for begin in range(start, start + count, chunk):
                rows = slice(begin, min(start + count, begin + chunk))
                weighted = self.expert(index, flat[token[rows]]).to(torch.float32) * weights[rows]
                out.index_add_(0, token[rows], weighted)
            start += count


class DecoderLayer(nn.Module):
    """Sandwich-norm block: h += norm_1(attn(norm(h))); h += norm_3(moe(norm_2(h)))."""

    def __init__(self, config: GrokConfig, layer: int, weights: str, device=None):
        super().__init__()
        self.layer = layer
        eps = config.rms_norm_eps
        self.pre_attn_norm = RMSNorm(config.emb_size, eps, device)  # haiku rms_norm
        self.attn = Attention(config, weights, device)
        self.post_attn_norm = RMSNorm(config.emb_size, eps, device)  # rms_norm_1
        self.pre_moe_norm = RMSNorm(config.emb_size, eps, device)  # rms_norm_2
        self.moe = MoE(config, weights, device)
        self.post_moe_norm = RMSNorm(config.emb_size, eps, device)  # rms_norm_3

    def forward(self, h: Float[Tensor, "batch seq dim"], key_valid: Bool[Tensor, "batch seq"],
                cache: KVCache | None = None, record: Record = None) -> Float[Tensor, "batch seq dim"]:
        p = f"decoder_layer_{self.layer}."
        _put(record, p + "input", h)
        x = self.pre_attn_norm(h)
        _put(record, p + "attn_norm", x)
        attn = self.attn(x, key_valid, cache, self.layer, record, p)
        _put(record, p + "attn_out", attn)
        attn = self.post_attn_norm(attn)
        _put(record, p + "attn_post_norm", attn)
        h = h + attn
        _put(record, p + "h_after_attn", h)
        x = self.pre_moe_norm(h)
        _put(record, p + "moe_norm", x)
        moe = self.moe(x, record, p)
        _put(record, p + "moe_out", moe)
        moe = self.post_moe_norm(moe)
        _put(record, p + "moe_post_norm", moe)
        h = h + moe
        _put(record, p + "out", h)
        return h


def tied_output_projection(h: Float[Tensor, "batch seq dim"], embedding: Float[Tensor, "vocab dim"],
                           shards: int) -> Float[Tensor, "batch seq vocab"]:
    """h @ embedding.T as upstream's 8-way mesh computes it: the embedding is sharded along D, each
    shard's partial product is rounded to the activation dtype, and the partials are summed in fp32
    and rounded once (bit-exact against the golden logits; a single bf16 matmul matches 61 %)."""
    if h.dtype == torch.float32 or h.shape[-1] % shards:
        return bf16_linear(h, embedding.to(h.dtype))
    width = h.shape[-1] // shards
    total = None
    for s in range(shards):
        part = bf16_linear(h[..., s * width:(s + 1) * width], embedding[:, s * width:(s + 1) * width].to(h.dtype))
        total = part.to(torch.float32) if total is None else total + part.to(torch.float32)
    return total.to(h.dtype)


def engine_router_logits(x: Float[Tensor, "tokens dim"], weight: Float[Tensor, "experts dim"],
                         numerics: Numerics) -> Float[Tensor, "tokens experts"]:
    """The engines' router logits: vLLM's gate is a bf16 linear (bf16 weight and logits), SGLang's an fp32
    dot; then `router_softcap` * tanh(logits / cap) in the logits' dtype, if a cap is set."""
    if numerics.router_in_activation_dtype:
        logits = bf16_linear(x, weight.to(x.dtype))
    else:
        logits = F.linear(x.to(torch.float32), weight.to(torch.float32))
    return soft_cap(logits, numerics.router_softcap) if numerics.router_softcap > 0 else logits


def apply_multiplier(x: Float[Tensor, "*batch"], value: float, how: str) -> Float[Tensor, "*batch"]:
    """x times a Python-float multiplier: "rounded" to x's dtype first (upstream), or "exact" (the engines
    multiply a bf16 tensor by the Python float: an fp32 product rounded once)."""
    if how == "rounded":
        return x * activation_dtype_multiplier(value, x)
    if how == "exact":
        return (x.to(torch.float32) * torch.tensor(value, dtype=torch.float32, device=x.device)).to(x.dtype)
    raise ValueError(f"a multiplier is applied rounded or exact, got {how!r}")


def output_head(h: Float[Tensor, "batch seq dim"], embedding: Float[Tensor, "vocab dim"], config: GrokConfig,
                numerics: Numerics) -> Float[Tensor, "batch seq vocab"]:
    """The tied projection times output_multiplier_scale: upstream's sharded partial sums, or one GEMM (the
    engines' vocab-parallel lm_head); the multiplier applied to the logits, or "folded" into the head's
    weights at load (SGLang: bf16(embedding * scale), then no multiplier)."""
    shards = config.model_shards if numerics.head_partial_sums else 1
    if numerics.output_multiplier == "folded":
        scale = torch.tensor(config.output_multiplier_scale, dtype=torch.float32, device=h.device)
        return tied_output_projection(h, (embedding.to(torch.float32) * scale).to(embedding.dtype), shards)
    logits = tied_output_projection(h, embedding, shards)
    return apply_multiplier(logits, config.output_multiplier_scale, numerics.output_multiplier)


class GrokOutput(NamedTuple):
    logits: Tensor  # [B, T, V]
    hidden_states: tuple[Tensor, ...]  # the embeddings, then each layer's output: L + 1 of [B, T, D]


class Grok(nn.Module):
    """The Grok-1 language model: tokens [B, T] -> logits [B, T, vocab].

    weights: how the linear layers are stored, "int8" (int8 + bf16 scales, weight-only quantized matmuls;
    the release's format, and the default), "bf16" or "fp32" (every linear a float parameter: what
    grok_torch.load calls "bf16-plain" for bf16; its faithful "bf16" keeps the MoE down projections int8).
    dtype: the compute dtype, "bf16" (upstream's) or "fp32". It is the embedding table's dtype, so
    `model.to(torch.float32)` computes in fp32 from then on.
    numerics: the numerics mode (grok_torch.numerics), "fast" by default ("upstream": upstream's bits);
    `model.numerics = "..."` switches it later without touching a weight.
    device="meta" builds the model without memory (then fill it with grok_torch.load).
    """

    def __init__(self, config: GrokConfig, *, weights: str | None = None, dtype: str = "bf16",
                 numerics: str | Numerics | None = None, device: torch.device | str | None = None):
        super().__init__()
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, got {dtype!r}")
        weights = weights or "int8"
        self.config = config
        # Upstream casts the fp32 table to the activation dtype before both of its uses (lookup and
        # tied output head), so keeping it in the compute dtype changes nothing.
        self.embedding = nn.Embedding(config.vocab_size, config.emb_size, device=device, dtype=COMPUTE_DTYPES[dtype])
        self.layers = nn.ModuleList(DecoderLayer(config, i, weights, device) for i in range(config.num_layers))
        self.norm = RMSNorm(config.emb_size, config.rms_norm_eps, device)  # language_model/rms_norm
        self.numerics = resolve(numerics)
        self.tp = None  # grok_torch.tp.TensorParallel of a sharded model: vocab-split embedding and head

    @property
    def numerics(self) -> Numerics:
        """The numerics mode every module computes with (set it by name or as a Numerics)."""
        return self._numerics

    @numerics.setter
    def numerics(self, value: str | Numerics) -> None:
        mode = resolve(value)
        # Plain attributes, not buffers: a mode is how to compute, never part of the state dict.
        object.__setattr__(self, "_numerics", mode)
        for module in self.modules():
            if module is not self and hasattr(module, "numerics"):
                module.numerics = mode

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the embedding table's (set at build or load, changed by `model.to(dtype)`)."""
        dtype = self.embedding.weight.dtype
        if dtype not in COMPUTE_DTYPES.values():
            raise ValueError(f"compute dtype {dtype} is not supported; use torch.bfloat16 or torch.float32")
        return dtype

    @property
    def weights(self) -> str:
        """How the linear layers store their weights now (grok_torch.weight_layouts.layout_of): "int8", "bf16"
        (the MoE down projections int8 + scales), "bf16-plain", "fp32", or "mixed (...)"."""
        from grok_torch.weight_layouts import layout_of

        return layout_of(self)

    def num_weights(self) -> int:
        """Weight elements, int8 ones included (they are buffers, not parameters) and scales not counted:
        what "a 314B model" counts (315,684,820,992 for grok-1)."""
        return sum(t.numel() for name, t in [*self.named_parameters(), *self.named_buffers()]
                   if not name.endswith(".scales"))

    def embed(self, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq dim"]:
        x = self.embedding(tokens).to(self.dtype) if self.tp is None else self.tp.embed(self.embedding, tokens, self.dtype)
        return apply_multiplier(x, self.config.embedding_multiplier_scale, self.numerics.embedding_multiplier)

    def head(self, h: Float[Tensor, "batch seq dim"], record: Record = None) -> Float[Tensor, "batch seq vocab"]:
        """Final RMSNorm and the tied output projection, times the output multiplier."""
        h = self.norm(h)
        _put(record, "final_norm", h)
        if self.numerics.bf16_matmul == "native":  # one GEMM, no fp32 copy of the table
            logits = kernels.linear(h, self.embedding.weight, kernels.uses_native("native", h), use_gemv=True)
            logits = apply_multiplier(logits, self.config.output_multiplier_scale, self.numerics.output_multiplier)
        else:
            logits = output_head(h, self.embedding.weight, self.config, self.numerics)
        # Under tensor parallelism each rank holds a slice of the vocabulary: gather the full logits.
        return logits if self.tp is None else self.tp.gather_vocab(logits)

    def key_valid(self, tokens: Int[Tensor, "batch seq"]) -> Bool[Tensor, "batch seq"]:
        """Real tokens; a token <= pad_token is padding and is masked as a key."""
        return tokens > self.config.pad_token

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        device = self.embedding.weight.device
        config = self.config if self.tp is None else self.tp.attention_config  # a rank caches its kv heads
        return KVCache.empty(config, batch, max_len or self.config.sequence_len, self.dtype, device)

    def forward(self, tokens: Int[Tensor, "batch seq"], cache: KVCache | None = None, *,
                record: Record = None) -> Float[Tensor, "batch seq vocab"]:
        """Logits [B, T, V] for tokens [B, T]; with `cache`, tokens continue the cached sequence.

        `record` collects every intermediate under the golden reference's names.
        """
        return self.forward_with_hidden_states(tokens, cache, record=record).logits

    def forward_with_hidden_states(self, tokens: Int[Tensor, "batch seq"], cache: KVCache | None = None, *,
                                   record: Record = None) -> GrokOutput:
        """GrokOutput(logits [B, T, V], hidden_states: the embeddings, then each layer's output)."""
        batch, seq = tokens.shape
        key_valid = self.key_valid(tokens)
        if cache is not None:
            if cache.length + seq > cache.capacity:
                raise ValueError(f"KV cache holds {cache.capacity} positions; {cache.length} used, {seq} more asked")
            cache.key_valid[:, cache.length:cache.length + seq] = key_valid
        h = self.embed(tokens)
        _put(record, "input_embeddings", h)
        hidden = [h]
        for layer in self.layers:
            h = layer(h, key_valid, cache, record)
            hidden.append(h)
        if cache is not None:
            cache.length += seq
        logits = self.head(h, record)
        _put(record, "logits", logits)
        return GrokOutput(logits, tuple(hidden))
