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


def _table(report: ParityReport, cell) -> list[str]:
    """The per-layer table of `cell(comparison)` for the shown sub-modules, both modes (`!` marks a tensor
    beyond tolerance)."""
    cfg = report.config
    columns = [(mode, s) for mode in MODES if mode in report.runs for s in (*SHOWN[:2], "expert_index", *SHOWN[2:])]
    header = ["layer"] + [f"{'TF' if m == 'teacher_forced' else 'E2E'} {s}" for m, s in columns]
    tables = {mode: _by_name(report, mode) for mode in MODES}

    def value(mode: str, name: str) -> str:
        comparison = tables[mode].get(name)
        return "-" if comparison is None else cell(comparison) + ("" if comparison.passed else " !")

    rows = [["input_embeddings"] + [value(m, "input_embeddings") if s == "out" else "" for m, s in columns]]
    rows += [[str(i)] + [value(m, f"decoder_layer_{i}.{s}") for m, s in columns] for i in range(cfg.num_layers)]
    rows += [[name] + [value(m, name) if s == "out" else "" for m, s in columns] for name in ("final_norm", "logits")]
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return [fmt.format(*header)] + [fmt.format(*r) for r in rows]


def _cell(comparison) -> str:
    if comparison.tier == "experts":
        return f"{comparison.compared - int(comparison.max_abs)}/{comparison.compared}"
    return f"{comparison.rel_rms:.1e}"


def format_report(report: ParityReport) -> str:
    """Relative RMS error and bit-exact fraction per layer and sub-module, then the distribution agreement
    and the first failure."""
    cfg = report.config
    lines = [f"parity: grok_torch vs {report.label} ({report.dtype}); D={cfg.emb_size} layers={cfg.num_layers} "
             f"heads={cfg.num_q_heads}/{cfg.num_kv_heads} experts={cfg.num_selected_experts}/{cfg.num_experts} "
             f"vocab={cfg.vocab_size}"]
    lines.append("relative RMS error per tensor (experts: tokens that chose the same experts):")
    lines += _table(report, _cell)
    lines.append("bit-exact fraction per tensor:")
    lines += _table(report, lambda c: f"{c.bit_exact:.4f}")
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


PLOT_PANELS = {  # panel title -> the per-layer sub-modules drawn in it
    "attention and experts": ("attn_out", "moe_out", "out"),
    "router (fp32)": ("router_logits", "router_probs", "expert_gate"),
}


def report_figure(report: ParityReport):
    """The figure of `plot_report`: one row per mode; per layer the relative RMS error of the block outputs
    and of the router, and the head (final norm, logits), on shared log y-axes, with the tolerance of each
    tier as a dashed line, integer layer ticks, and the legends beside the axes (never over the data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from parity.tolerances import TOLERANCES, tier_of

    modes = [m for m in MODES if m in report.runs]
    panels = len(PLOT_PANELS) + 1
    fig, axes = plt.subplots(len(modes), panels, figsize=(5 * panels + 2, 3.6 * len(modes)), squeeze=False,
                             sharey=True, gridspec_kw={"width_ratios": [3] * len(PLOT_PANELS) + [1]})
    layers = list(range(report.config.num_layers))
    for row, mode in zip(axes, modes):
        run = report.runs[mode]
        table = {c.name: c for c in run.comparisons}
        tolerances = TOLERANCES[(report.dtype, mode)]
        for ax, (title, suffixes) in zip(row, PLOT_PANELS.items()):
            tiers = {}
            for suffix in suffixes:
                errors = [max(table[f"decoder_layer_{i}.{suffix}"].rel_rms, PLOT_FLOOR)
                          for i in layers if f"decoder_layer_{i}.{suffix}" in table]
                if errors:
                    line, = ax.plot(layers[:len(errors)], errors, marker="o", ms=3, label=suffix)
                    tiers.setdefault(tier_of(suffix), line.get_color())
            for tier, color in tiers.items():
                ax.axhline(max(tolerances[tier].max_rel_rms, PLOT_FLOOR), color=color, lw=1, ls="--",
                           label=f"{tier} tolerance")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("layer")
            ax.set_title(f"{mode.replace('_', ' ')}: {title}")
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
        head = row[-1]
        names = [n for n in ("final_norm", "logits") if n in table]
        head.bar(names, [max(table[n].rel_rms, PLOT_FLOOR) for n in names], color=["tab:gray", "tab:red"][:len(names)])
        for n in names:
            head.axhline(max(tolerances[tier_of(n)].max_rel_rms, PLOT_FLOOR), color="black", lw=1, ls="--")
        head.set_title(f"head: {'pass' if run.passed else 'FAIL'}")
        row[0].set_yscale("log")
        row[0].set_ylabel("relative RMS error")
    fig.suptitle(f"grok_torch vs {report.label} ({report.dtype}); bit-exact drawn at {PLOT_FLOOR:g}, "
                 f"dashed: the tier's tolerance")
    fig.tight_layout()
    return fig


def plot_report(report: ParityReport, path: str | Path) -> None:
    """Write `report_figure(report)` as a PNG."""
    import matplotlib.pyplot as plt

    fig = report_figure(report)
    fig.savefig(path, dpi=100)
    plt.close(fig)
