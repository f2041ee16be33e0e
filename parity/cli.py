"""`grok-torch parity`: the parity report on the command line."""

from __future__ import annotations

import sys

import click

from grok_torch.errors import UserError, cli_errors


def _not_applicable(options: list[str], mode: str, why: str) -> UserError:
    return UserError(f"{', '.join(options)} {'does' if len(options) == 1 else 'do'} not apply with {mode}: {why}")


@click.command("parity")
@click.option("--config", "config_name", default="tiny", show_default=True,
              help="Preset name (tiny, small, tiny-1l, tiny-12l, golden-12l, ...) or a JSON file with upstream field names.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Compute precision of both sides: fp32 for exact agreement, bf16 for upstream's numerics.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights and tokens.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per row (>= 256 exposes RoPE bugs).")
@click.option("--weights", type=click.Choice(["int8", "bf16", "fp32"]), default="int8", show_default=True,
              help="Stored format of the random weights' linear layers: int8 + bf16 scales as released, or plain "
                   "bf16/fp32 arrays.")
@click.option("--quantize-attention/--plain-attention", default=None,
              help="With --weights int8: attention weights int8 (default) or plain fp32 arrays.")
@click.option("--quantize-moe/--plain-moe", default=None,
              help="With --weights int8: expert weights int8 (default) or plain fp32 arrays.")
@click.option("--golden", "golden_dir", type=click.Path(exists=True, file_okay=False),
              help="Compare against a golden directory (official ckpt-0 + reference.npz from the upstream code) "
                   "instead of the haiku reference (bf16, its own weights and tokens: --config, --dtype, --seed, "
                   "--seq-len and the weight options are refused with it).")
@click.option("--checkpoint", "checkpoint_dir", type=click.Path(exists=True, file_okay=False),
              help="Check your own converted directory: grok_torch loaded from it against the haiku reference on "
                   "the same weights (--config and the weight options do not apply).")
@click.option("--raw", "raw_dir", type=click.Path(exists=True, file_okay=False),
              help="With --checkpoint: the raw checkpoint it was converted from, for the reference's weights "
                   "[default: the converted tensors themselves].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), help="Write the full report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True),
              help="Draw the per-layer error (log scale) as a PNG.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads torch computes with [default: one per physical core this process may use].")
@click.pass_context
@cli_errors
def parity_cmd(ctx, config_name, dtype, seed, seq_len, weights, quantize_attention, quantize_moe, golden_dir,
               checkpoint_dir, raw_dir, json_path, plot_path, threads):
    """Run grok_torch and a reference on the same weights and tokens and compare every layer.

    Both modes run: end to end, and teacher-forced (each grok_torch layer fed the reference's
    input to that layer, so an error shows where it is made). Per tensor it reports max abs/rel
    diff and mismatches, names the first tensor beyond tolerance, and gives top-1 agreement and
    KL of the final distributions. Exits 1 when parity fails.
    """
    from grok_torch.config import GrokConfig
    from parity.harness import run_checkpoint, run_golden, run_parity
    from parity.report import format_report, plot_report, write_json
    from grok_torch.threads import set_threads

    set_threads(threads)

    given = [f"--{name.replace('_', '-')}" for name in ("config_name", "dtype", "seed", "seq_len", "weights",
                                                         "quantize_attention", "quantize_moe")
             if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
    given = [{"--config-name": "--config", "--quantize-attention": "--quantize-attention/--plain-attention",
              "--quantize-moe": "--quantize-moe/--plain-moe"}.get(g, g) for g in given]
    if raw_dir and not checkpoint_dir:
        raise UserError("--raw applies only with --checkpoint CONVERTED_DIR")
    if golden_dir and checkpoint_dir:
        raise UserError("give --golden or --checkpoint, not both")
    if checkpoint_dir:
        fixed = [g for g in given if g in ("--config", "--weights", "--quantize-attention/--plain-attention",
                                           "--quantize-moe/--plain-moe")]
        if fixed:
            raise _not_applicable(fixed, "--checkpoint", "the converted directory fixes its config and weights")
        report = run_checkpoint(checkpoint_dir, raw_dir=raw_dir, dtype=dtype, seed=seed, seq_len=seq_len)
    elif golden_dir:
        if given:
            raise _not_applicable(given, "--golden", "the golden run fixes its config, weights, tokens and bf16 compute")
        report = run_golden(golden_dir)
    else:  # seeded random weights
        if weights != "int8" and (quantize_attention is not None or quantize_moe is not None):
            raise UserError(f"--quantize-attention/--plain-attention and --quantize-moe/--plain-moe apply only to "
                            f"--weights int8 (with --weights {weights} every linear is a plain {weights} array)")
        config = GrokConfig.resolve(config_name)
        report = run_parity(config, dtype=dtype, seed=seed, seq_len=seq_len, weights=weights,
                            quantize_attention=quantize_attention is not False, quantize_moe=quantize_moe is not False)
    click.echo(format_report(report))
    if json_path:
        write_json(report, json_path)
        click.echo(f"report written to {json_path}")
    if plot_path:
        plot_report(report, plot_path)
        click.echo(f"plot written to {plot_path}")
    sys.exit(0 if report.passed else 1)
