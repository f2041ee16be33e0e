"""`grok-torch parity`: the parity report on the command line."""

from __future__ import annotations

import sys
from functools import partial

import click

from grok_torch.errors import UserError, cli_errors
from grok_torch.numerics import ENGINE_PRESETS


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
@click.option("--engine", type=click.Choice(list(ENGINE_PRESETS)),
              help="Instead of a parity check: how far this serving engine's forward (grok_torch in its numerics "
                   "preset) is from upstream's on the same weights (--golden, --checkpoint or --config), layer by "
                   "layer, in bf16. A report: exits 0.")
@click.option("--breakdown", is_flag=True, help="With --engine: also each of its decisions alone (slower).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), help="Write the full report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True),
              help="Draw the per-layer error (log scale) as a PNG.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads torch computes with [default: one per physical core this process may use].")
@click.option("--tp", type=click.IntRange(min=1), default=None,
              help="Run grok_torch tensor-parallel over W local processes (gloo, CPU); the reference runs once.")
@click.pass_context
@cli_errors
def parity_cmd(ctx, config_name, dtype, seed, seq_len, weights, quantize_attention, quantize_moe, golden_dir,
               checkpoint_dir, raw_dir, engine, breakdown, json_path, plot_path, threads=None, tp=None):
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
    if breakdown and not engine:
        raise UserError("--breakdown applies only with --engine")
    if engine and tp is not None:
        raise _not_applicable(["--tp"], "--engine", "the deviation report runs in one process")
    if engine:
        _engine_report(ctx, engine, breakdown, given, config_name, seed, seq_len, weights, golden_dir,
                       checkpoint_dir, raw_dir, json_path, plot_path)
        return
    if raw_dir and not checkpoint_dir:
        raise UserError("--raw applies only with --checkpoint CONVERTED_DIR")
    if golden_dir and checkpoint_dir:
        raise UserError("give --golden or --checkpoint, not both")
    if tp is not None and checkpoint_dir:
        raise UserError("--tp applies to the random-weights and --golden modes, not to --checkpoint")
    if checkpoint_dir:
        fixed = [g for g in given if g in ("--config", "--weights", "--quantize-attention/--plain-attention",
                                           "--quantize-moe/--plain-moe")]
        if fixed:
            raise _not_applicable(fixed, "--checkpoint", "the converted directory fixes its config and weights")
        report = run_checkpoint(checkpoint_dir, raw_dir=raw_dir, dtype=dtype, seed=seed, seq_len=seq_len)
    elif golden_dir:
        if given:
            raise _not_applicable(given, "--golden", "the golden run fixes its config, weights, tokens and bf16 compute")
        report = run_golden(golden_dir) if tp is None else _tp_runs().run_golden_tp(golden_dir, tp=tp)
    else:  # seeded random weights
        if weights != "int8" and (quantize_attention is not None or quantize_moe is not None):
            raise UserError(f"--quantize-attention/--plain-attention and --quantize-moe/--plain-moe apply only to "
                            f"--weights int8 (with --weights {weights} every linear is a plain {weights} array)")
        config = GrokConfig.resolve(config_name)
        run = run_parity if tp is None else partial(_tp_runs().run_parity_tp, tp=tp)
        report = run(config, dtype=dtype, seed=seed, seq_len=seq_len, weights=weights,
                            quantize_attention=quantize_attention is not False, quantize_moe=quantize_moe is not False)
    click.echo(format_report(report))
    if json_path:
        write_json(report, json_path)
        click.echo(f"report written to {json_path}")
    if plot_path:
        plot_report(report, plot_path)
        click.echo(f"plot written to {plot_path}")
    sys.exit(0 if report.passed else 1)


def _engine_report(ctx, engine, breakdown, given, config_name, seed, seq_len, weights, golden_dir, checkpoint_dir,
                   raw_dir, json_path, plot_path) -> None:
    """`parity --engine`: parity.engine_deviation on the golden run, a converted directory or random weights."""
    import json
    from pathlib import Path

    from grok_torch.config import GrokConfig
    from parity.engine_deviation import engine_deviation, format_engine_report, golden_model, random_model

    refused = [g for g in given if g in ("--dtype", "--quantize-attention/--plain-attention",
                                         "--quantize-moe/--plain-moe")]
    refused += [name for name, value in (("--raw", raw_dir), ("--plot", plot_path)) if value]
    if refused:
        raise _not_applicable(refused, "--engine", "the engines serve Grok-1 in bf16, and the report is a table")
    if golden_dir and checkpoint_dir:
        raise UserError("give --golden or --checkpoint, not both")
    if golden_dir:
        if given:
            raise _not_applicable(given, "--golden", "the golden run fixes its config, weights and tokens")
        model, tokens, label = golden_model(golden_dir)
    elif checkpoint_dir:
        fixed = [g for g in given if g in ("--config", "--weights")]
        if fixed:
            raise _not_applicable(fixed, "--checkpoint", "the converted directory fixes its config and weights")
        import grok_torch
        from parity.harness import parity_tokens

        model = grok_torch.load(checkpoint_dir, dtype="bf16", numerics="upstream")
        tokens = parity_tokens(model.config, seed=seed, seq_len=min(seq_len, model.config.sequence_len))
        label = f"{checkpoint_dir} (its weights as stored), tokens {list(tokens.shape)} (seed {seed})"
    else:
        model, tokens, label = random_model(GrokConfig.resolve(config_name), seed=seed, seq_len=seq_len,
                                            weights=weights)
    report = engine_deviation(model, tokens, engine, label=label, breakdown=breakdown)
    click.echo(format_engine_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=1) + "\n")
        click.echo(f"report written to {json_path}")


def _tp_runs():
    """parity.harness's tensor-parallel runs (grok_torch over W local gloo processes)."""
    import parity.harness

    return parity.harness
