"""`grok-torch parity`: the parity report on the command line."""

from __future__ import annotations

import sys

import click

from grok_torch.errors import cli_errors


@click.command("parity")
@click.option("--config", "config_name", default="tiny", show_default=True,
              help="Preset name (tiny, small, tiny-1l, tiny-12l, golden-12l, ...) or a JSON file with upstream field names.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Compute precision of both sides: fp32 for exact agreement, bf16 for upstream's numerics.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights and tokens.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per row (>= 256 exposes RoPE bugs).")
@click.option("--quantize-attention/--plain-attention", default=True, show_default=True,
              help="Attention weights as int8 + bf16 scales, or plain float arrays.")
@click.option("--quantize-moe/--plain-moe", default=True, show_default=True,
              help="Expert weights as int8 + bf16 scales, or plain float arrays.")
@click.option("--golden", "golden_dir", type=click.Path(exists=True, file_okay=False),
              help="Compare against a golden directory (official ckpt-0 + reference.npz from the upstream code) "
                   "instead of the haiku reference; --config/--dtype/--seed do not apply.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), help="Write the full report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True),
              help="Draw the per-layer error (log scale) as a PNG.")
@cli_errors
def parity_cmd(config_name, dtype, seed, seq_len, quantize_attention, quantize_moe, golden_dir, json_path, plot_path):
    """Run grok_torch and a reference on the same weights and tokens and compare every layer.

    Both modes run: end to end, and teacher-forced (each grok_torch layer fed the reference's
    input to that layer, so an error shows where it is made). Per tensor it reports max abs/rel
    diff and mismatches, names the first tensor beyond tolerance, and gives top-1 agreement and
    KL of the final distributions. Exits 1 when parity fails.
    """
    from grok_torch.config import GrokConfig
    from parity.harness import run_golden, run_parity
    from parity.report import format_report, plot_report, write_json

    if golden_dir:
        report = run_golden(golden_dir)
    else:
        config = GrokConfig.resolve(config_name)
        report = run_parity(config, dtype=dtype, seed=seed, seq_len=seq_len,
                            quantize_attention=quantize_attention, quantize_moe=quantize_moe)
    click.echo(format_report(report))
    if json_path:
        write_json(report, json_path)
        click.echo(f"report written to {json_path}")
    if plot_path:
        plot_report(report, plot_path)
        click.echo(f"plot written to {plot_path}")
    sys.exit(0 if report.passed else 1)
