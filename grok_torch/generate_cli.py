"""`grok-torch generate`: sample text from a converted directory, streamed to the terminal."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import click

from grok_torch.errors import UserError, cli_errors


class _FiniteFloat(click.FloatRange):
    """click's FloatRange, refusing inf and nan (which compare as inside any range, or take every token)."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


@click.command("generate")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="Text to continue; repeat for a batch (rows are left-padded and run together).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=100, show_default=True,
              help="Tokens to generate per prompt at most (a row also stops at EOS).")
@click.option("--temperature", type=_FiniteFloat(min=0), default=0.01, show_default=True,
              help="Softmax temperature; 0 is greedy (argmax). The default is upstream run.py's.")
@click.option("--top-p", type=_FiniteFloat(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling with upstream's rule; 1 keeps every token.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the sampling generator.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
              help="SentencePiece model (the release's tokenizer.model) [default: $GROK_TOKENIZER, else the copy "
                   "convert made in PATH, else the development checkout's ../shared/grok1/tokenizer.model].")
@click.option("--weights", type=click.Choice(["int8", "bf16", "bf16-plain", "fp32"]), default=None,
              help="Stored weight format to compute with [default: as PATH stores them]: int8 keeps int8 weights "
                   "(weight-only quantized matmuls, needs an int8 conversion); bf16 dequantizes all but the MoE "
                   "down projections (kept int8: their exact product), bf16-plain and fp32 dequantize them all.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Compute dtype (bf16 is upstream's).")
@click.option("--numerics", type=click.Choice(["fast", "upstream"]), default="fast", show_default=True,
              help="Numerics mode: fast (int8 weight-only kernels, blocked matmuls, native bf16 GEMMs where the "
                   "hardware has them; README: Fidelity, measured) "
                   "or upstream (every cast as upstream's JAX forward, bit-exact to it on the CPU).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads torch computes with [default: one per physical core this process may use].")
@click.option("--truncate", is_flag=True,
              help="Left-truncate prompts too long for the model's sequence_len instead of refusing them.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda (cuda:LOCAL_RANK with --tp or torchrun) or cuda:N; weights are read straight onto it.")
@click.option("--tp", type=click.IntRange(min=1), default=None,
              help="Tensor-parallel degree W: start W local processes (one per GPU with --device cuda; gloo on "
                   "the CPU). Under torchrun it is the world size [default there: WORLD_SIZE].")
@click.pass_context
@cli_errors
def generate_cmd(ctx: click.Context, path: Path, prompts: tuple[str, ...], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, tokenizer_path: Path | None, weights: str, dtype: str, numerics: str, threads: int | None,
                 truncate: bool, device: str, tp: int | None) -> None:
    """Continue each --prompt with the model in the converted directory PATH.

    One prompt streams its continuation as it is produced; several print each row, labelled, as it
    finishes. A closing line gives the prefill and decode speeds in tokens/s.
    """
    if temperature == 0:  # greedy: nothing is drawn
        ignored = [f"--{name.replace('_', '-')}" for name in ("top_p", "seed")
                   if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
        if ignored:
            raise UserError(f"{' and '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply with "
                            f"--temperature 0 (greedy decoding draws nothing)")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a converted grok-torch directory)")
    _check_device(device)
    options = dict(path=path, prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   seed=seed, tokenizer_path=tokenizer_path, weights=weights, dtype=dtype, truncate=truncate,
                   device=device, numerics=numerics, threads=threads)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        world = int(os.environ["WORLD_SIZE"])
        if tp is not None and tp != world:
            raise UserError(f"--tp {tp} but torchrun started {world} processes (WORLD_SIZE): give the same W or "
                            f"leave --tp out")
        _generate_rank(int(os.environ["RANK"]), world, options, True)
    elif tp is not None and tp > 1:
        _launch_ranks(tp, options)
    else:
        _generate(**options)


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected cpu, cuda or cuda:N")


def _launch_ranks(tp: int, options: dict) -> None:
    """W local processes in one process group (torch.multiprocessing, env:// rendezvous), each a rank."""
    from grok_torch.distributed import backend_for, launch

    import torch

    if torch.device(options["device"]).type == "cuda" and torch.cuda.device_count() < tp:
        raise UserError(f"--tp {tp} --device {options['device']}: {tp} ranks need {tp} CUDA devices, this host has "
                        f"{torch.cuda.device_count()} (use --device cpu, a smaller --tp, or torchrun over several hosts)")
    results = launch(_generate_rank, tp, tp, options, False, backend=backend_for(options["device"]))
    failed = [r for r in results if r.error]
    if failed:  # a rank's agreed error is the same on every rank: say it once
        messages = list(dict.fromkeys(r.error.split(": ", 1)[-1] for r in failed))
        raise UserError("; ".join(messages))


def _generate_rank(rank: int, world: int, options: dict, from_env: bool) -> None:
    """One rank of `generate --tp`: the same generation on every rank; rank 0 prints."""
    from grok_torch.distributed import init_from_env

    if from_env:
        init_from_env(options["device"])
    _generate(**options, tp=world, quiet=rank != 0)


def _generate(*, path: Path, prompts: tuple[str, ...], max_new_tokens: int, temperature: float, top_p: float,
              seed: int, tokenizer_path: Path | None, weights: str, dtype: str, truncate: bool, device: str,
              numerics: str = "fast", threads: int | None = None, tp: int | None = None, quiet: bool = False) -> None:
    """Load, encode, generate and print (nothing printed with `quiet`: the ranks other than 0)."""
    import grok_torch
    from grok_torch.generation import PromptTruncatedWarning, fit_prompts, generate
    from grok_torch.tokenizer import StreamDecoder, Tokenizer, find_tokenizer

    def echo(*args, **kwargs) -> None:
        if not quiet:
            click.echo(*args, **kwargs)

    tokenizer = Tokenizer(find_tokenizer(tokenizer_path, path)[0])
    model = grok_torch.load(path, weights=weights, dtype=dtype, numerics=numerics, threads=threads, device=device,
                            tp=tp)
    tokenizer.check_model_vocab(model.config.vocab_size)

    encoded = [tokenizer.encode(text) for text in prompts]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptTruncatedWarning)
        fitted = fit_prompts(encoded, max_new_tokens, model.config.sequence_len, model.config.vocab_size, truncate)
    for warning in caught:
        echo(f"Warning: {warning.message}", err=True)

    single = len(prompts) == 1
    decoders = [StreamDecoder(tokenizer, prompt) for prompt in fitted]

    def on_token(row: int, token: int) -> None:
        text = decoders[row].push(token)
        if single and text:
            echo(text, nl=False)

    def on_finish(row: int, reason: str) -> None:
        if single:
            echo(decoders[row].flush())
        else:  # a whole row at a time keeps a batch readable
            echo(f"[{row + 1}] ({reason}) {tokenizer.decode(fitted[row])}{decoders[row].text}")

    if single:
        echo(tokenizer.decode(fitted[0]), nl=False)
    result = generate(model, fitted, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      seed=seed, on_token=on_token, on_finish=on_finish)
    echo(result.stats.summary())
