"""Tensor-by-tensor comparison of two sets of named activations, in forward order."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from parity.tolerances import Tolerance

LAYER_SUFFIXES = ("input", "attn_norm", "q_proj", "k_proj", "v_proj", "attn_context", "attn_out",
                  "attn_post_norm", "h_after_attn", "moe_norm", "router_logits", "router_probs",
                  "expert_index", "expert_gate", "moe_out", "moe_post_norm", "out")
# Tensors of a layer computed after the expert choice: a legitimate near-tie flip changes them.
AFTER_EXPERT_CHOICE = ("expert_gate", "moe_out", "moe_post_norm", "out")


def forward_order(num_layers: int) -> list[str]:
    """Every compared tensor name, in the order the forward pass produces them."""
    names = ["input_embeddings"]
    for i in range(num_layers):
        names += [f"decoder_layer_{i}.{s}" for s in LAYER_SUFFIXES if s != "input"]
    return names + ["final_norm", "logits"]


@dataclass
class TensorComparison:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    rel_rms: float
    mismatches: int
    compared: int
    passed: bool
    tier: str
    excluded_tokens: int = 0  # near-tie tokens left out (their expert choice legitimately differs)
    samples: list[dict] = field(default_factory=list)  # a few of the worst elements
    bit_exact: float = 1.0  # fraction of compared elements (experts: tokens) identical to the reference

    def describe(self) -> str:
        if self.tier == "experts":
            return (f"{self.name}: {int(self.max_abs)}/{self.compared} tokens chose other experts, "
                    f"{self.excluded_tokens} of them near-ties; e.g. "
                    + ", ".join(f"token {s['index']}: ours {s['ours']} ref {s['ref']}" for s in self.samples[:3]))
        text = (f"{self.name}: max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g}, "
                f"rel RMS {self.rel_rms:.3g}, {self.mismatches}/{self.compared} beyond tolerance")
        if self.samples:
            text += "; e.g. " + ", ".join(f"{s['index']}: ours {s['ours']:.6g} ref {s['ref']:.6g}" for s in self.samples[:3])
        return text

    def to_json(self) -> dict:
        return asdict(self)


def compare_tensor(name: str, ours: np.ndarray, ref: np.ndarray, tol: Tolerance, tier: str,
                   token_mask: np.ndarray | None = None) -> TensorComparison:
    """Compare `ours` with `ref` ([B, T, ...]); `token_mask` [B, T] selects the tokens compared."""
    ours = np.asarray(ours, dtype=np.float64).reshape(ref.shape)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: shape {ours.shape} differs from the reference's {ref.shape}")
    keep = np.ones(ref.shape, dtype=bool)
    excluded = 0
    if token_mask is not None:
        keep = np.broadcast_to(token_mask.reshape(token_mask.shape + (1,) * (ref.ndim - 2)), ref.shape)
        excluded = int((~token_mask).sum())
    diff = np.abs(ours - ref)
    scale = float(np.sqrt(np.mean(ref[keep] ** 2))) if keep.any() else 0.0
    allowed = tol.rtol * np.abs(ref) + tol.atol * scale
    beyond = (diff > allowed) & keep
    nonfinite = ~np.isfinite(ours) & keep
    beyond |= nonfinite
    compared = int(keep.sum())
    kept_diff = np.where(keep, diff, 0.0)
    max_abs = float(np.nanmax(np.where(nonfinite, np.inf, kept_diff))) if compared else 0.0
    rel = kept_diff / (np.abs(ref) + max(scale, 1e-30) * 1e-3)
    max_rel = float(np.max(np.where(nonfinite, np.inf, rel))) if compared else 0.0
    err_rms = float(np.sqrt(np.sum(np.where(keep, np.nan_to_num(diff, nan=np.inf, posinf=np.inf) ** 2, 0.0)) / max(compared, 1)))
    rel_rms = err_rms / scale if scale > 0 else (0.0 if err_rms == 0 else np.inf)
    mismatches = int(beyond.sum())
    same = (ours == ref) & keep
    bit_exact = float(same.sum() / compared) if compared else 1.0
    passed = bool(nonfinite.sum() == 0 and mismatches <= tol.max_mismatch_fraction * compared
                  and rel_rms <= tol.max_rel_rms)
    # The (up to) five worst elements beyond tolerance; a partial sort, as logits run to millions.
    flagged = np.flatnonzero(beyond)
    flagged_diff = np.nan_to_num(diff.reshape(-1)[flagged], nan=np.inf)
    if flagged.size > 5:
        top = np.argpartition(flagged_diff, -5)[-5:]
        flagged, flagged_diff = flagged[top], flagged_diff[top]
    worst = flagged[np.argsort(flagged_diff)[::-1]]
    samples = [{"index": list(map(int, np.unravel_index(i, ref.shape))), "ours": float(ours.flat[i]),
                "ref": float(ref.flat[i])} for i in worst]
    return TensorComparison(name, tuple(ref.shape), max_abs, max_rel, rel_rms, mismatches, compared, passed,
                            tier, excluded, samples, bit_exact)


def router_margin(probs: np.ndarray, k: int) -> np.ndarray:
    """[B, T, E] probabilities -> [B, T]: k-th largest minus (k+1)-th (infinite when k == E)."""
    if k >= probs.shape[-1]:
        return np.full(probs.shape[:-1], np.inf)
    top = -np.sort(-probs, axis=-1)
    return top[..., k - 1] - top[..., k]


def compare_experts(name: str, ours: np.ndarray, ref: np.ndarray, ref_probs: np.ndarray,
                    near_tie_margin: float, skip: np.ndarray | None = None) -> tuple[TensorComparison, np.ndarray]:
    """Chosen experts [B, T, k]: a token may differ only where the reference's router margin is a
    near-tie (or where `skip` [B, T] says the token already diverged). Returns the comparison and
    the [B, T] mask of tokens whose choices agree."""
    ours = np.asarray(ours).reshape(ref.shape)
    agree = np.all(np.sort(ours, axis=-1) == np.sort(ref, axis=-1), axis=-1)
    near_tie = router_margin(ref_probs, ref.shape[-1]) < near_tie_margin
    if skip is not None:
        near_tie = near_tie | skip
    bad = ~agree & ~near_tie
    samples = [{"index": list(map(int, idx)), "ours": ours[tuple(idx)].tolist(), "ref": ref[tuple(idx)].tolist()}
               for idx in np.argwhere(bad)[:5]]
    # For experts: max_abs counts the tokens that disagree, rel_rms is their fraction.
    comparison = TensorComparison(name, tuple(ref.shape), float((~agree).sum()), 0.0, float(np.mean(~agree)),
                                  int(bad.sum()), int(agree.size), bool(bad.sum() == 0), "experts",
                                  int((~agree & near_tie).sum()), samples, float(np.mean(agree)))
    return comparison, agree


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass
class DistributionAgreement:
    """How alike two sets of next-token distributions are, over the real (non-padding) positions.

    On small random models with tied embeddings the most likely token is nearly always the input token,
    so top-1 agreement is reached even by a misconfigured port; the runner-up (second most likely token),
    the overlap of the top-5 sets and KL(ref || ours) are what tell a faithful port from a bad one.
    """

    top1: float
    runner_up: float
    top5_overlap: float  # mean |top5(ours) & top5(ref)| / 5
    mean_kl: float
    positions: int

    def to_json(self) -> dict:
        return asdict(self)


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, best first (a partial sort: vocabularies run to 131072)."""
    k = min(k, logits.shape[-1])
    part = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(logits, part, -1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, -1)


def distribution_agreement(ours: np.ndarray, ref: np.ndarray, real: np.ndarray) -> DistributionAgreement:
    """Top-1, runner-up and top-5 agreement and mean KL(ref || ours) of the final distributions."""
    ours, ref = np.asarray(ours)[real].astype(np.float64), np.asarray(ref)[real].astype(np.float64)
    if not len(ref):
        return DistributionAgreement(1.0, 1.0, 1.0, 0.0, 0)
    top_ours, top_ref = _top_k(ours, 5), _top_k(ref, 5)
    top1 = float(np.mean(top_ours[:, 0] == top_ref[:, 0]))
    runner_up = float(np.mean(top_ours[:, 1] == top_ref[:, 1])) if top_ref.shape[1] > 1 else 1.0
    overlap = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(top_ours, top_ref)]))
    log_p, log_q = log_softmax(ref), log_softmax(ours)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return DistributionAgreement(top1, runner_up, overlap, float(np.mean(kl)), len(ref))
