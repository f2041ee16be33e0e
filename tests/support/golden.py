"""Bit-level checks of teacher-forced activations against the golden upstream run, portable across processors.

Each tolerance comes from parity.tolerances and the arithmetic behind it, not from what one machine gave:
bf16 tensors may differ from the golden bits in at most `bf16_flip_allowance` of their elements, each by
at most `bf16_value_bound`; fp32 router values must lie within the bound of an fp32 dot product (logits)
and of a softmax (probabilities, gates), computed element by element from the operands; a token may choose
other experts only where its router margin is within that bound, or its router input already differed.
"""

from __future__ import annotations

import numpy as np

from parity.tolerances import (ROUNDINGS_IN_HEAD, ROUNDINGS_PER_LAYER, bf16_flip_allowance, bf16_value_bound,
                               fp32_sum_bound, longest_reduction, softmax_bound)

BF16_LAYER_TENSORS = ("input", "attn_norm", "q_proj", "k_proj", "v_proj", "attn_context", "attn_out",
                      "attn_post_norm", "h_after_attn", "moe_norm", "moe_out", "moe_post_norm", "out")
AFTER_EXPERTS = ("moe_out", "moe_post_norm", "out")


def bit_exact(ours, ref, keep=None) -> float:
    same = np.asarray(ours, np.float32).reshape(ref.shape) == ref
    if keep is not None:
        same = same[keep]
    return float(np.mean(same)) if same.size else 1.0


def _check_bf16(name: str, ours, ref, allowance: float, roundings: int, keep=None) -> list[str]:
    ours = np.asarray(ours, np.float64).reshape(ref.shape)
    problems = []
    exact = bit_exact(ours, ref, keep)
    if exact < 1 - allowance:
        problems.append(f"{name}: {exact:.4%} bit-exact, at least {1 - allowance:.4%} expected")
    beyond = np.abs(ours - ref) > bf16_value_bound(ref, roundings)
    if keep is not None:
        beyond &= np.broadcast_to(keep.reshape(keep.shape + (1,) * (ref.ndim - keep.ndim)), ref.shape)
    if beyond.any():
        i = tuple(np.argwhere(beyond)[0])
        problems.append(f"{name}: {int(beyond.sum())} value(s) beyond {roundings} bf16 steps, e.g. {i}: "
                        f"ours {ours[i]:.6g} ref {ref[i]:.6g}")
    return problems


def check_layer(layer: int, got: dict, ref: dict, router_w: np.ndarray, config, k: int) -> list[str]:
    """Problems of one teacher-forced decoder layer (`got`: our activations by golden name), [] if none.
    `router_w` is the fp32 router weight, haiku layout [D, E]."""
    p = f"decoder_layer_{layer}."
    seq = ref[p + "input"].shape[1]
    allowance = bf16_flip_allowance(longest_reduction(config, seq), ROUNDINGS_PER_LAYER)
    problems = []
    # The router's operands are identical where our router input (moe_norm) is bit-exact; elsewhere the
    # difference is the bf16 one counted against moe_norm, inherited.
    same_input = np.all(np.asarray(got[p + "moe_norm"], np.float32).reshape(ref[p + "moe_norm"].shape)
                        == ref[p + "moe_norm"], axis=-1)
    x = ref[p + "moe_norm"].astype(np.float64)
    logit_bound = fp32_sum_bound(np.abs(x) @ np.abs(router_w.astype(np.float64)), config.emb_size)
    d_logits = np.abs(np.asarray(got[p + "router_logits"], np.float64) - ref[p + "router_logits"])
    if np.any((d_logits > logit_bound)[same_input]):
        problems.append(f"{p}router_logits: beyond the fp32 dot-product bound by up to "
                        f"{float(np.max((d_logits - logit_bound)[same_input])):.3g}")
    prob_bound = softmax_bound(ref[p + "router_probs"].astype(np.float64), logit_bound.max(-1, keepdims=True))
    d_probs = np.abs(np.asarray(got[p + "router_probs"], np.float64) - ref[p + "router_probs"])
    if np.any((d_probs > prob_bound)[same_input]):
        problems.append(f"{p}router_probs: beyond the softmax bound")
    # Another expert choice only where the top-k margin is within twice the probability bound.
    probs = ref[p + "router_probs"].astype(np.float64)
    top = -np.sort(-probs, axis=-1)
    margin = top[..., k - 1] - top[..., k] if k < probs.shape[-1] else np.full(probs.shape[:-1], np.inf)
    agree = np.all(np.sort(got[p + "expert_index"], -1) == np.sort(ref[p + "expert_index"], -1), axis=-1)
    legitimate = (same_input & (margin <= 2 * prob_bound.max(-1))) | ~same_input
    if np.any(~agree & ~legitimate):
        problems.append(f"{p}expert_index: {int(np.sum(~agree & ~legitimate))} token(s) with a clear router "
                        f"margin chose other experts")
    gates_same = agree & same_input
    gate_bound = np.take_along_axis(prob_bound, ref[p + "expert_index"].astype(np.int64), -1)
    d_gates = np.abs(np.asarray(got[p + "expert_gate"], np.float64) - ref[p + "expert_gate"])
    if np.any((d_gates > gate_bound)[gates_same]):
        problems.append(f"{p}expert_gate: beyond the softmax bound")
    for key in BF16_LAYER_TENSORS:
        keep = agree if key in AFTER_EXPERTS else None
        problems += _check_bf16(p + key, got[p + key], ref[p + key], allowance, ROUNDINGS_PER_LAYER, keep)
    return problems


def check_head(got: dict, ref: dict, config) -> list[str]:
    """Problems of the final norm and the logits computed from the golden last hidden state."""
    allowance = bf16_flip_allowance(config.emb_size, ROUNDINGS_IN_HEAD)
    return [problem for key in ("final_norm", "logits")
            for problem in _check_bf16(key, got[key], ref[key], allowance, ROUNDINGS_IN_HEAD)]
