"""`grok-torch plan`: one rank's memory for a tensor-parallel degree, from a conversion or a config."""

from __future__ import annotations

from pathlib import Path

import click

from grok_torch.errors import UserError, cli_errors


def _sizes(values: tuple[str, ...]) -> list[tuple[str, int]]:
    from grok_torch.memory_plan import parse_bytes

    try:
        return [(v, parse_bytes(v)) for v in values]
    except ValueError as err:
        raise UserError(f"--device-memory: {err}") from None


def _source(path: Path | None, config_name: str | None, weights: str | None):
    """(config, stored weight format, float linears of an int8 directory, label) of the plan's model."""
    import torch

    from grok_torch.config import GrokConfig

    if (path is None) == (config_name is None):
        raise UserError("give a CONVERTED_DIR or --config NAME_OR_JSON (with --weights), not both or neither")
    if path is not None:
        from grok_torch.converted_dir import ConvertedDir

        if weights is not None:
            raise UserError("--weights applies only with --config: a converted directory fixes its stored format")
        directory = ConvertedDir(path)  # headers and index only: no tensor data is read
        stored = directory.config.weight_format
        floats = {}
        if stored == "int8":
            for name, quantized in directory.config.quantized.items():
                if not quantized:
                    dtype = directory.tensors[name].dtype
                    floats[name.removesuffix(".weight")] = torch.float32 if dtype == "float32" else torch.bfloat16
        return directory.config.config, stored, floats, str(path)
    try:
        config = GrokConfig.resolve(config_name)
    except (ValueError, KeyError) as err:
        raise UserError(str(err)) from None
    return config, weights or "int8", {}, f"--config {config_name}"


@click.command("plan")
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.option("--config", "config_name", default=None,
              help="Plan for a preset (grok-1, ...) or config JSON instead of a converted directory.")
@click.option("--weights", type=click.Choice(["int8", "bf16", "fp32"]), default=None,
              help="With --config: the stored format of the linear layers [default: int8].")
@click.option("--tp", "degrees", type=click.IntRange(min=1), multiple=True, default=(1,), show_default=True,
              help="Tensor-parallel degree W (one rank per device); repeat for a table.")
@click.option("--device-memory", "memories", multiple=True, default=("80GiB",), show_default=True,
              help="Memory of one device (80GiB, 141GB, ...); repeat for more columns. Use --host for a CPU host.")
@click.option("--host", is_flag=True, help="The devices are CPU hosts: no CUDA runtime reserve.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Rows decoded together.")
@click.option("--max-len", type=click.IntRange(min=1), default=None,
              help="KV cache positions per row [default: the config's sequence_len].")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Compute dtype.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=512, show_default=True,
              help="Positions per forward pass of the prefill (generate's default).")
@cli_errors
def plan_cmd(path, config_name, weights, degrees, memories, host, batch, max_len, dtype, prefill_chunk) -> None:
    """Per-rank weight, KV cache and activation bytes of the model in the converted directory PATH (or
    of --config) over W ranks, and whether they fit a device of --device-memory.

    Computed from the config and the stored formats only (no tensor data is read); activations are an
    estimate of the peak of one prefill chunk. A GPU also keeps 2 GiB for the CUDA runtime.
    """
    from grok_torch.memory_plan import RUNTIME_RESERVE, format_bytes, plan

    config, stored, floats, label = _source(path, config_name, weights)
    sizes = _sizes(memories)
    device = "cpu" if host else "cuda"
    plans = [plan(config, tp=w, weights=stored, dtype=dtype, batch=batch, max_len=max_len,
                  prefill_chunk=prefill_chunk, stored_float=floats) for w in degrees]
    first = plans[0]
    click.echo(f"{label}: {stored} weights, {dtype} compute, batch {batch}, KV cache of {first.max_len} positions, "
               f"prefill chunk {first.prefill_chunk}; per rank (one rank per {'host' if host else 'GPU'})"
               + ("" if host else f", plus {format_bytes(RUNTIME_RESERVE)} CUDA runtime reserve"))
    header = ["W", "weights", "KV cache", "activations", "total"] + [f"fits {name}" for name, _ in sizes]
    rows = [[str(p.tp), format_bytes(p.weight_bytes), format_bytes(p.cache_bytes), format_bytes(p.activation_bytes),
             format_bytes(p.total_bytes)] + ["yes" if p.fits(n, device) else "no" for _, n in sizes] for p in plans]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
