"""Numerics modes: named ways for one Grok model to compute, chosen at build or load (`numerics=`).

A mode is data (a frozen `Numerics`), read by the modules at call time; switching it never touches
a weight. "upstream" reproduces every cast of upstream's JAX forward on the CPU (the parity harness
and the golden tests use it). "fast" (the default for users: DEFAULT) uses grok_torch.kernels' int8
weight-only matmuls and blocked GEMMs, natively in bf16 where the hardware has bf16 units. Other modes
name what they change, and the README ("Fidelity, measured") states how far each one is from upstream,
measured.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Numerics", "CHOICES", "PRESETS", "ENGINE_PRESETS", "DEFAULT", "resolve", "decisions"]


@dataclass(frozen=True)
class Numerics:
    """How the forward computes. Each field is one decision, with upstream's choice as its default."""

    name: str
    summary: str
    # ---- the serving engines' decisions (grok_torch.numerics.ENGINE_PRESETS says who makes which) ----
    # "Activation dtype" below is the compute dtype (bf16 in a bf16 run): the engines keep their
    # parameters and activations in the model dtype where upstream keeps fp32.
    expert_gelu: str = "tanh"  # "tanh" (jax.nn.gelu's default) | "erf" (exact GELU)
    router_in_activation_dtype: bool = False  # router weight and logits in the activation dtype, not fp32
    router_softcap: float = 0.0  # > 0: router logits become cap * tanh(logits / cap) before the softmax
    renormalize_gates: bool = False  # the top-k gates divided by their sum (upstream: raw probabilities)
    round_gates: bool = True  # gates rounded to the activation dtype before weighting the expert outputs
    round_gated_product: bool = False  # gelu(x @ linear) * (x @ linear_v) rounded to the activation dtype
    round_down_proj: bool = False  # linear_1's dequantized weight rounded to the activation dtype
    embedding_multiplier: str = "rounded"  # "rounded" to the activation dtype (78.5 in bf16) | "exact" (fp32)
    output_multiplier: str = "rounded"  # "rounded" (0.578125 in bf16) | "exact" (fp32) | "folded" into the head
    head_partial_sums: bool = True  # the output head summed over model_shards bf16 partials (upstream's mesh)
    norm_scale_in_activation_dtype: bool = False  # RMSNorm scale rounded to the activation dtype
    norm_rounds_before_scale: bool = False  # x * rsqrt(...) rounded before it is multiplied by the scale
    rope_in_activation_dtype: bool = False  # cos/sin tables and the rotation's products in the activation dtype
    # Fields below were added with the "fast" mode; each default is upstream's choice.
    # bf16 x bf16 matmuls: "fp32" sums the fp32 products and rounds once (XLA's CPU result, bit for bit);
    # "native" uses torch's bf16 GEMM where the hardware has bf16 dot units (CUDA, AVX512-BF16, AMX) and
    # the fp32 form on blocks of the weight elsewhere (grok_torch.kernels: faster there).
    bf16_matmul: str = "fp32"
    # int8 weights: "dequantize" materialises each matrix with upstream's rounding, then multiplies;
    # "kernel" uses grok_torch.kernels (torch's int8 weight-only matmul for few rows, blocked
    # dequantization into a reused buffer for many), never a whole float matrix per call.
    int8_matmul: str = "dequantize"
    # The expert hidden state gelu(gate) * up and the down projection: "fp32" as upstream's one-hot expert
    # selection promotes them; "activation" in the compute dtype; "auto" in the compute dtype where the bf16
    # matmul runs natively (then the down projection is a bf16 GEMM), else fp32 (no faster in bf16 there).
    expert_hidden_dtype: str = "fp32"

    def __post_init__(self) -> None:
        """Every choice field holds one of its choices (checked once here, not on every forward call)."""
        for field, value in ((f, getattr(self, f)) for f in CHOICES):
            if value not in CHOICES[field]:
                raise ValueError(f"numerics {self.name!r}: {field} must be one of {', '.join(CHOICES[field])}, "
                                 f"got {value!r}")


# The fields of Numerics that name a choice, and their choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "expert_gelu": ("tanh", "erf"),
    "embedding_multiplier": ("rounded", "exact"),
    "output_multiplier": ("rounded", "exact", "folded"),
    "bf16_matmul": ("fp32", "native"),
    "int8_matmul": ("dequantize", "kernel"),
    "expert_hidden_dtype": ("fp32", "activation", "auto"),
}


UPSTREAM = Numerics(
    name="upstream",
    summary="every cast as upstream's JAX forward (bit-exact to it on the CPU)",
)

# What the serving engines compute for Grok-1, as read in their code (ENGINES.md, ../shared/grok1/, has the
# loader facts). vLLM, vllm-project/vllm vllm/model_executor/models/grok1.py @048a32c7 (checked in that file):
# embed_input_ids multiplies the bf16 embeddings by the Python float embedding_multiplier_scale; the
# router `gate` is a ReplicatedLinear in the model dtype (the fp32 router is cast to bf16 at load), its
# logits capped by router_logit_softcapping (the export writes 0: no cap) and passed to FusedMoE with
# renormalize = moe_router_renormalize (the export writes false) and activation "gelu", which is the exact
# erf form (csrc/activation_kernels.cu @00ccbd42, per ENGINES.md); the fused MoE writes gelu(x)*y in bf16
# (act-and-mul output), multiplies the fp32 top-k weights inside its down-projection GEMM (fused_moe.py's
# routed-weight multiply; known, not re-read at a commit here), and runs on the export's bf16 linear_1; LogitsProcessor(scale=output_multiplier_scale) multiplies the bf16 logits of the
# vocab-parallel lm_head (one GEMM, no per-shard partials) by the Python float (`logits *= self.scale`,
# layers/logits_processor.py, code search, commit not identified). Its RMSNorm kernel
# (csrc/layernorm_kernels.cu rms_norm_kernel, read by code search, commit not identified) computes
# (bf16)(x * rsqrt(var + eps)) * weight with a bf16 weight: two roundings. Its RotaryEmbedding
# (rotary_embedding/base.py, code search, commit not identified) stores cos_sin_cache in the model dtype and
# rotates in it (x * cos - y * sin, each product and the sum rounded).
# The older grok1.py (@02082de9, per ENGINES.md) hard-codes 30 * tanh(logits / 30) on the router and
# FusedMoE's default renormalize=True, whatever config.json says: "vllm-legacy".
# SGLang, sgl-project/sglang python/sglang/srt/models/grok.py @031ad4ce + layers/moe/router.py @4eab61ce (per
# ENGINES.md; the index holds only the 2024 grok.py): an fp32 router dot with the fp32 gate, a hard-coded
# 30 * tanh cap in fp32, softmax and top-k without renormalisation; the same "gelu" (erf) fused MoE; the
# embedding times the exact float; output_multiplier_scale folded into lm_head's bf16 weights at load (one
# more rounding, then no multiplier); its fused MoE weights the experts with the fp32 top-k weights (as vLLM's).
# Its norms run sgl-kernel/flashinfer RMSNorm (assumed to be RMSNorm.forward_cuda's kernel), float(x) * rms_rcp *
# float(weight) rounded once with a bf16 weight (flashinfer norm.cuh, code search, commit not identified); its
# RoPE keeps cos_sin_cache in fp32 on CUDA and rotates in fp32, rounding once (layers/rotary_embedding.py,
# code search, commit not identified): upstream's.
# Not modelled (kernel internals, outside these decisions): the attention kernels' unrounded fp32 QK^T and
# online softmax, the fused MoE's per-expert bf16 outputs and their bf16 sum, GEMM accumulation orders, and
# flashinfer's fused add-RMSNorm normalising the unrounded fp32 residual sum (whether SGLang's grok.py uses
# it was not checked).
_ENGINE = dict(expert_gelu="erf", round_gates=False, round_gated_product=True, round_down_proj=True,
               embedding_multiplier="exact", head_partial_sums=False, norm_scale_in_activation_dtype=True)

VLLM = Numerics(
    name="vllm",
    summary="vLLM's Grok-1 (grok1.py @048a32c7) on grok-torch's export: erf GELU, bf16 router, bf16 x*gelu(y) "
            "and linear_1, exact multipliers, bf16 norm scales and RoPE tables",
    **_ENGINE, router_in_activation_dtype=True, output_multiplier="exact", norm_rounds_before_scale=True,
    rope_in_activation_dtype=True,
)

VLLM_LEGACY = Numerics(
    name="vllm-legacy",
    summary="vLLM's older Grok-1 (grok1.py @02082de9): as vllm, plus a hard-coded 30*tanh router cap and "
            "renormalised top-2 gates",
    **_ENGINE, router_in_activation_dtype=True, output_multiplier="exact", norm_rounds_before_scale=True,
    rope_in_activation_dtype=True, router_softcap=30.0, renormalize_gates=True,
)

SGLANG = Numerics(
    name="sglang",
    summary="SGLang's Grok-1 (grok.py @031ad4ce): erf GELU, fp32 router with a 30*tanh cap, bf16 x*gelu(y) "
            "and linear_1, exact embedding multiplier, output multiplier folded into lm_head, bf16 norm scales",
    **_ENGINE, router_softcap=30.0, output_multiplier="folded",
)

ENGINE_PRESETS: dict[str, Numerics] = {n.name: n for n in (VLLM, VLLM_LEGACY, SGLANG)}


FAST = Numerics(
    name="fast",
    summary="int8 weight-only kernels, blocked matmuls, native bf16 GEMMs where the hardware has them "
            "(README: Fidelity, measured)",
    bf16_matmul="native",
    int8_matmul="kernel",
    expert_hidden_dtype="auto",
)

PRESETS: dict[str, Numerics] = {n.name: n for n in (UPSTREAM, FAST)}
PRESETS.update(ENGINE_PRESETS)

# What users get when they do not choose (load, from_state_dict, Grok, generate); the parity harness and
# the golden tests ask for "upstream" by name.
DEFAULT = "fast"


def resolve(numerics: str | Numerics | None, default: str = DEFAULT) -> Numerics:
    """A preset by name (None: `default`), or a Numerics as given; ValueError naming the choices."""
    if numerics is None:
        numerics = default
    if isinstance(numerics, Numerics):
        return numerics
    try:
        return PRESETS[numerics]
    except KeyError:
        raise ValueError(f"numerics must be one of {', '.join(PRESETS)}, got {numerics!r}") from None


def decisions(mode: Numerics) -> dict[str, object]:
    """The decisions in which `mode` differs from upstream's: {field: value}."""
    from dataclasses import fields

    return {f.name: getattr(mode, f.name) for f in fields(Numerics)
            if f.name not in ("name", "summary") and getattr(mode, f.name) != f.default}
