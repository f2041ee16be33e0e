"""Presenting a ParityReport: a terminal table, JSON, and a PNG of the per-layer error."""

from __future__ import annotations

import json
from pathlib import Path

from parity.harness import MODES, ParityReport

# Per layer, the sub-module outputs shown in the table and the plot.
SHOWN = ("attn_out", "router_probs", "moe_out", "out")
PLOT_FLOOR = 1e-12  # bit-exact tensors are drawn here on the log scale


def _by_name(report: ParityReport, mode: str) -> dict:
    return {c.name: c for c in report.runs[mode].comparisons} if mode in report.runs else {}


def _cell(comparison) -> str:
    if comparison is None:
        return "-"
    mark = "" if comparison.passed else " !"
    if comparison.tier == "experts":
        return f"{comparison.compared - int(comparison.max_abs)}/{comparison.compared}{mark}"
    return f"{comparison.rel_rms:.1e}{mark}"


def format_report(report: ParityReport) -> str:
    """Relative RMS error per layer and sub-module (`!` marks a tensor beyond tolerance), then the
    distribution agreement and the first failure."""
    cfg = report.config
    lines = [f"parity: grok_torch vs {report.label} ({report.dtype}); D={cfg.emb_size} layers={cfg.num_layers} "
             f"heads={cfg.num_q_heads}/{cfg.num_kv_heads} experts={cfg.num_selected_experts}/{cfg.num_experts} "
             f"vocab={cfg.vocab_size}"]
    columns = [(mode, s) for mode in MODES if mode in report.runs for s in (*SHOWN[:2], "expert_index", *SHOWN[2:])]
    header = ["layer"] + [f"{'TF' if m == 'teacher_forced' else 'E2E'} {s}" for m, s in columns]
    rows = []
    tables = {mode: _by_name(report, mode) for mode in MODES}
    for name in ("input_embeddings",):
        rows.append([name] + [_cell(tables[m].get(name)) if s == "out" else "" for m, s in columns])
    for i in range(cfg.num_layers):
        rows.append([str(i)] + [_cell(tables[m].get(f"decoder_layer_{i}.{s}")) for m, s in columns])
    for name in ("final_norm", "logits"):
        rows.append([name] + [_cell(tables[m].get(name)) if s == "out" else "" for m, s in columns])
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines.append("relative RMS error per tensor (experts: tokens that chose the same experts):")
    lines += [fmt.format(*header)] + [fmt.format(*r) for r in rows]
    for mode, run in report.runs.items():
        lines.append(f"bit-exact fraction per sub-module ({mode}, least over layers): " + bit_exact_summary(run))
    for mode, run in report.runs.items():
        status = "PASS" if run.passed else "FAIL"
        worst = max((c for c in run.comparisons if c.tier != "experts"), key=lambda c: c.rel_rms, default=None)
        d = run.distribution
        lines.append(f"{mode}: {status}  top-1 agreement {d.top1:.4f}, runner-up {d.runner_up:.4f}, "
                     f"top-5 overlap {d.top5_overlap:.4f}, mean KL {d.mean_kl:.3g}"
                     + (f", largest rel RMS {worst.rel_rms:.3g} ({worst.name})" if worst else ""))
    failure = report.first_failure
    if failure is not None:
        mode, comparison = failure
        lines.append(f"first divergence ({mode}): {comparison.describe()}")
    elif not report.passed:
        lines.append("every tensor is within tolerance, but the final distributions disagree")
    lines.append("PARITY PASSED" if report.passed else "PARITY FAILED")
    return "\n".join(lines)


def bit_exact_by_submodule(run) -> dict[str, float]:
    """The least bit-exact fraction of each sub-module's output over the layers (experts: tokens that chose
    the same experts), in forward order."""
    least: dict[str, float] = {}
    for c in run.comparisons:
        suffix = c.name.rsplit(".", 1)[-1]
        least[suffix] = min(least.get(suffix, 1.0), c.bit_exact)
    return least


def bit_exact_summary(run) -> str:
    return ", ".join(f"{name} {fraction:.4f}" for name, fraction in bit_exact_by_submodule(run).items())


def write_json(report: ParityReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=1) + "\n")


def plot_report(report: ParityReport, path: str | Path) -> None:
    """Per-layer relative RMS error of each shown sub-module, both modes, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report.runs), figsize=(6 * len(report.runs), 4), squeeze=False)
    layers = list(range(report.config.num_layers))
    for ax, (mode, run) in zip(axes[0], report.runs.items()):
        table = {c.name: c for c in run.comparisons}
        for suffix in ("attn_out", "moe_out", "out"):
            errors = [max(table[f"decoder_layer_{i}.{suffix}"].rel_rms, PLOT_FLOOR) for i in layers]
            ax.plot(layers, errors, marker="o", label=suffix)
        ax.axhline(PLOT_FLOOR, color="grey", lw=0.5, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("relative RMS error")
        ax.set_title(f"{mode.replace('_', ' ')} ({report.dtype}): {'pass' if run.passed else 'FAIL'}")
        ax.legend()
    fig.suptitle(f"grok_torch vs {report.label} (bit-exact drawn at {PLOT_FLOOR:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
