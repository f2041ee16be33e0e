"""How far each serving engine's forward is from upstream's on the same weights: a report, not a test.

grok_torch runs twice on the same weights and tokens, in bf16: once in "upstream" numerics (bit-exact to
upstream's JAX forward on the CPU) and once in an engine's preset (grok_torch.numerics: "vllm",
"vllm-legacy", "sglang"), which reproduces the casts that engine's Grok-1 code makes. Every recorded
sub-module output is compared, layer by layer, in both of the parity harness's modes (end to end: errors
compound as in use; teacher-forced: each engine layer fed upstream's input to it, so a layer shows what it
adds), with the relative RMS error and the bit-exact fraction; the expert choices by token agreement; the
next-token distributions by KL(upstream || engine), argmax, runner-up and top-5 agreement.

`decision_breakdown` switches the preset's decisions on one at a time (the rest upstream's) and measures
each alone end to end, so it says which one moves the distribution most.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from grok_torch.config import GrokConfig
from grok_torch.loading import from_state_dict
from grok_torch.model import Grok
from grok_torch.numerics import ENGINE_PRESETS, UPSTREAM, Numerics, decisions, resolve
from parity.compare import (DistributionAgreement, TensorComparison, compare_tensor, distribution_agreement,
                            forward_order)
from parity.harness import MODES, parity_tokens, torch_end_to_end, torch_teacher_forced
from parity.tolerances import Tolerance

# Metrics only: nothing here passes or fails, so every element is counted as "beyond" no tolerance.
_NO_TOLERANCE = Tolerance(rtol=0.0, atol=0.0, max_mismatch_fraction=1.0, max_rel_rms=float("inf"),
                          reason="a measurement of the engines' numerics, not a parity check")
SHOWN = ("attn_out", "moe_out", "out")  # per layer in the terminal table


@dataclass
class EngineRun:
    """One mode (end_to_end | teacher_forced) of one engine preset against upstream."""

    mode: str
    comparisons: list[TensorComparison]
    experts: list[float]  # per layer: fraction of real tokens whose chosen experts equal upstream's
    distribution: DistributionAgreement

    @property
    def expert_agreement(self) -> float:
        return float(np.mean(self.experts)) if self.experts else 1.0

    def layer_error(self, layer: int, suffix: str = "out") -> TensorComparison:
        return next(c for c in self.comparisons if c.name == f"decoder_layer_{layer}.{suffix}")

    def worst_layer(self) -> tuple[int, float]:
        """(layer, rel RMS) of the layer output furthest from upstream's."""
        layers = {int(c.name.split(".")[0].rsplit("_", 1)[1]): c.rel_rms for c in self.comparisons
                  if c.name.startswith("decoder_layer_") and c.name.endswith(".out")}
        worst = max(layers, key=layers.get)
        return worst, layers[worst]

    def to_json(self) -> dict:
        return {"mode": self.mode, "distribution": self.distribution.to_json(),
                "expert_agreement": self.expert_agreement, "expert_agreement_per_layer": self.experts,
                "worst_layer": dict(zip(("layer", "rel_rms"), self.worst_layer())),
                "tensors": [{"name": c.name, "rel_rms": c.rel_rms, "bit_exact": c.bit_exact, "max_abs": c.max_abs}
                            for c in self.comparisons]}


@dataclass
class EngineReport:
    engine: Numerics
    label: str  # the weights and tokens compared on
    config: GrokConfig
    runs: dict[str, EngineRun]
    breakdown: dict[str, DistributionAgreement] = field(default_factory=dict)  # decision -> its effect alone

    def to_json(self) -> dict:
        return {"engine": self.engine.name, "summary": self.engine.summary, "on": self.label,
                "decisions": {k: v for k, v in decisions(self.engine).items()},
                "runs": {m: r.to_json() for m, r in self.runs.items()},
                "breakdown": {k: v.to_json() for k, v in self.breakdown.items()}}


def _expert_agreement(ours: dict, ref: dict, config: GrokConfig, real: np.ndarray) -> list[float]:
    out = []
    for i in range(config.num_layers):
        a, b = ours[f"decoder_layer_{i}.expert_index"], ref[f"decoder_layer_{i}.expert_index"]
        same = np.all(np.sort(a, axis=-1) == np.sort(b, axis=-1), axis=-1)
        out.append(float(same[real].mean()) if real.any() else 1.0)
    return out


def compare_runs(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], config: GrokConfig,
                 tokens: np.ndarray, mode: str) -> EngineRun:
    """Every recorded float tensor (forward order) and the expert choices, over all tokens; the distributions
    over the real (non-padding) positions."""
    real = np.asarray(tokens) > config.pad_token
    comparisons = [compare_tensor(name, ours[name], ref[name], _NO_TOLERANCE, "metrics")
                   for name in forward_order(config.num_layers)
                   if name in ref and not name.endswith(".expert_index")]
    return EngineRun(mode, comparisons, _expert_agreement(ours, ref, config, real),
                     distribution_agreement(ours["logits"], ref["logits"], real))


def _activations(model: Grok, numerics: Numerics, tokens: np.ndarray, ref: dict | None, mode: str) -> dict:
    model.numerics = numerics
    return torch_end_to_end(model, tokens) if mode == "end_to_end" else torch_teacher_forced(model, tokens, ref)


def engine_deviation(model: Grok, tokens: np.ndarray, engine: str | Numerics, *, label: str,
                     breakdown: bool = False, upstream: dict | None = None) -> EngineReport:
    """`model` (bf16) in `engine`'s numerics against itself in upstream's, on `tokens`. `upstream`: the
    upstream end-to-end activations, if already computed (they are the same for every engine)."""
    engine = resolve(engine)
    if model.dtype != torch.bfloat16:
        raise ValueError("the engine deviation is measured in bf16, the dtype the engines serve Grok-1 in")
    ref = upstream if upstream is not None else _activations(model, UPSTREAM, tokens, None, "end_to_end")
    runs = {mode: compare_runs(_activations(model, engine, tokens, ref, mode), ref, model.config, tokens, mode)
            for mode in MODES}
    report = EngineReport(engine, label, model.config, runs)
    if breakdown:
        real = np.asarray(tokens) > model.config.pad_token
        for name, value in decisions(engine).items():
            alone = dataclasses.replace(UPSTREAM, name=f"upstream+{name}", summary=f"upstream with {name}={value!r}",
                                        **{name: value})
            ours = _activations(model, alone, tokens, None, "end_to_end")
            report.breakdown[f"{name}={value}"] = distribution_agreement(ours["logits"], ref["logits"], real)
    model.numerics = UPSTREAM
    return report


# ---- the weights and tokens -------------------------------------------------------------------------------

def golden_model(golden_dir: str | Path) -> tuple[Grok, np.ndarray, str]:
    """The golden directory's official-format checkpoint as a bf16 model, and its tokens."""
    from parity.harness import load_golden

    config, state, tokens, _ = load_golden(golden_dir)
    return (from_state_dict(state, config, dtype="bf16", numerics="upstream"), tokens,
            f"golden {Path(golden_dir).name} (its checkpoint and tokens)")


def random_model(config: GrokConfig, *, seed: int = 0, seq_len: int = 256, batch: int = 4,
                 weights: str = "int8") -> tuple[Grok, np.ndarray, str]:
    """parity.init's seeded random weights for `config` (no JAX) and parity_tokens."""
    from convert.upstream.tree import haiku_tree_to_state_dict
    from parity.init import init_params

    quantized = weights == "int8"
    params = init_params(config, seed=seed, quantize_attention=quantized, quantize_moe=quantized,
                         float_dtype="fp32" if quantized else weights)
    model = from_state_dict(haiku_tree_to_state_dict(params, config), config, dtype="bf16", numerics="upstream")
    tokens = parity_tokens(config, seed=seed, batch=batch, seq_len=min(seq_len, config.sequence_len))
    return model, tokens, f"seeded random {weights} weights (seed {seed}), tokens {list(tokens.shape)}"


def all_engines(model: Grok, tokens: np.ndarray, label: str, engines=tuple(ENGINE_PRESETS),
                breakdown: bool = False) -> list[EngineReport]:
    upstream = _activations(model, UPSTREAM, tokens, None, "end_to_end")
    return [engine_deviation(model, tokens, e, label=label, breakdown=breakdown, upstream=upstream) for e in engines]


# ---- presentation -----------------------------------------------------------------------------------------

def format_engine_report(report: EngineReport) -> str:
    """Per layer the rel RMS and bit-exact fraction of the shown sub-modules and the expert agreement, in both
    modes; the least bit-exact fraction per sub-module; the distributions; the decisions."""
    cfg, e = report.config, report.engine
    lines = [f"engine deviation: grok_torch in {e.name!r} numerics vs 'upstream', bf16, on {report.label}; "
             f"D={cfg.emb_size} layers={cfg.num_layers}",
             f"  {e.name}: {e.summary}",
             "  decisions: " + ", ".join(f"{k}={v}" for k, v in decisions(e).items())]
    for mode, run in report.runs.items():
        table = {c.name: c for c in run.comparisons}
        header = ["layer"] + [f"{s} relRMS/exact" for s in SHOWN] + ["experts"]
        rows = [["embed", f"{table['input_embeddings'].rel_rms:.1e}/{table['input_embeddings'].bit_exact:.3f}", "", "",
                 ""]]
        for i in range(cfg.num_layers):
            cells = [f"{table[f'decoder_layer_{i}.{s}'].rel_rms:.1e}/{table[f'decoder_layer_{i}.{s}'].bit_exact:.3f}"
                     for s in SHOWN]
            rows.append([str(i), *cells, f"{run.experts[i]:.3f}"])
        for name in ("final_norm", "logits"):
            rows.append([name, "", "", f"{table[name].rel_rms:.1e}/{table[name].bit_exact:.3f}", ""])
        widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
        lines.append(f"{mode}:")
        lines += ["  " + "  ".join(f"{v:>{w}}" for v, w in zip(r, widths)) for r in [header] + rows]
        least: dict[str, float] = {}
        for c in run.comparisons:
            suffix = c.name.rsplit(".", 1)[-1]
            least[suffix] = min(least.get(suffix, 1.0), c.bit_exact)
        lines.append("  least bit-exact fraction per sub-module: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in least.items()))
        d = run.distribution
        layer, worst = run.worst_layer()
        lines.append(f"  {mode}: KL(upstream||{e.name}) {d.mean_kl:.3g}, argmax agreement {d.top1:.4f}, runner-up "
                     f"{d.runner_up:.4f}, top-5 overlap {d.top5_overlap:.4f}, experts {run.expert_agreement:.4f}, "
                     f"worst layer {layer} (out rel RMS {worst:.2g}); {d.positions} positions")
    if report.breakdown:
        lines.append("each decision alone (end to end, the others upstream's), largest KL first:")
        for name, d in sorted(report.breakdown.items(), key=lambda kv: -kv[1].mean_kl):
            lines.append(f"  {name}: KL {d.mean_kl:.3g}, argmax {d.top1:.4f}, runner-up {d.runner_up:.4f}, "
                         f"top-5 {d.top5_overlap:.4f}")
    return "\n".join(lines)


def deviation_table(reports: list[EngineReport]) -> str:
    """The README's table (markdown): one row per engine preset, end to end."""
    lines = ["| numerics | KL(upstream ‖ engine) | argmax agreement | runner-up | top-5 overlap | experts | "
             "worst layer, teacher-forced (rel RMS of its output) | decision that moves KL most (alone) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        run = r.runs["end_to_end"]
        d = run.distribution
        layer, worst = r.runs["teacher_forced"].worst_layer()
        top = max(r.breakdown.items(), key=lambda kv: kv[1].mean_kl) if r.breakdown else None
        lines.append(f"| `{r.engine.name}` | {d.mean_kl:.2e} | {d.top1:.3f} | {d.runner_up:.3f} | {d.top5_overlap:.3f} | "
                     f"{run.expert_agreement:.3f} | {layer} ({worst:.1e}) | "
                     + (f"`{top[0]}` (KL {top[1].mean_kl:.1e})" if top else "-") + " |")
    return "\n".join(lines)
