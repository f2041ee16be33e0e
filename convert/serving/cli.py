"""`grok-torch export-serving`: a converted directory as a directory vLLM or SGLang serves as it is."""

from __future__ import annotations

from pathlib import Path

import click

from convert.cli import _sigterm_as_interrupt, sharded_output_options
from grok_torch.errors import cli_errors

_HELP = """Write the converted directory CONVERTED_DIR as OUT, a directory that the serving engine loads as
it is:

\b
  vllm serve OUT --tensor-parallel-size 8
  python -m sglang.launch_server --model-path OUT --tp 8

OUT holds the engine's own tensor names and per-expert tensors (sharded safetensors + index), a
config.json with every key the engine's Grok-1 code reads (its switches set to upstream's numerics:
vLLM's router soft-cap off and top-2 gates not renormalised, SGLang's pre-sharded loader off),
generation_config.json, and with --tokenizer the tokenizer.model and a tokenizer_config.json (no BOS
added to prompts, as upstream).

\b
--weights bf16 (both engines): every linear is upstream's bf16 dequantization bf16(int8 x scale),
  the MoE down projection too (upstream keeps its exact fp32 product; bf16 rounds it once).
--weights int8 (vLLM only, from an int8 conversion): compressed-tensors W8A16 (pack-quantized,
  int8 as uint8b128 in int32 words, bf16 scales in symmetric groups of 128 along the input, each
  of upstream's scales repeated over the groups it covers): every weight dequantizes to exactly
  bf16(int8 x scale). The scales cost 4.92 GB instead of 0.125 GB for Grok-1 (+1.5 % over the
  int8). vLLM's support for an 8-bit group-128 MoE depends on its version: smoke-test yours.

Stays bf16 in an int8 export, as no engine quantizes it: the embedding (vLLM ties the output head
to it). Stays fp32 in every export: RMSNorm scales and the router (the engines cast them at load:
vLLM to bf16, SGLang keeps an fp32 router). SGLang has no int8 format for Grok's GELU experts (both
of its int8 MoE methods assert SiLU): sglang exports are bf16.

Same guarantees as convert: streamed a block of rows at a time, built in .OUT.partial and renamed
when complete, --resume after an interruption, free space checked first, CONVERTED_DIR only read.
Engine code read: vllm-project/vllm grok1.py @02082de9 and @048a32c7, sgl-project/sglang grok.py
@031ad4ce, compressed-tensors @ac8e2ba8 / 0.20.1."""


@click.command("export-serving", help=_HELP)
@click.argument("converted_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--engine", type=click.Choice(["vllm", "sglang"]), required=True, help="The serving engine.")
@click.option("--weights", type=click.Choice(["bf16", "int8"]), default="bf16", show_default=True,
              help="Linear weights: bf16 (both engines) or compressed-tensors W8A16 int8 (vllm only).")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="The release's tokenizer.model, shipped in OUT with a tokenizer_config.json [default: "
                   "CONVERTED_DIR's copy, when convert made one].")
@sharded_output_options("export", "OUT", "a previous export")
@cli_errors
def export_serving_cmd(converted_dir: Path, out: Path, engine: str, weights: str, tokenizer: Path | None,
                       max_shard_size: int, overwrite: bool, resume: bool, space_check: bool,
                       progress: bool | None) -> None:
    from convert.serving.exporter import export_serving
    from grok_torch.progress import human_bytes

    with _sigterm_as_interrupt():
        result = export_serving(converted_dir, out, engine=engine, weights=weights, tokenizer=tokenizer,
                                max_shard_size=max_shard_size, overwrite=overwrite, resume=resume,
                                check_space=space_check, progress=progress,
                                log=lambda message: click.echo(message, err=True))
    reused = f" ({result.reused_shards} reused after checking)" if result.reused_shards else ""
    click.echo(f"wrote {result.dst} for {engine} ({weights}): {result.tensors} tensors, {result.total_bytes:,} bytes "
               f"in {len(result.shards)} shard(s){reused}")
    if result.scale_bytes is not None:
        native, grouped = result.scale_bytes
        click.echo(f"compressed-tensors scales (groups of 128): {human_bytes(grouped)}, upstream's own: "
                   f"{human_bytes(native)}")
    if not result.tokenizer:
        click.echo("no tokenizer shipped: give --tokenizer tokenizer.model, or point the engine at one "
                   "(vllm --tokenizer, sglang --tokenizer-path)", err=True)
