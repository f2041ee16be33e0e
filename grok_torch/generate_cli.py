"""`grok-torch generate`: sample text from a converted directory, streamed to the terminal."""

from __future__ import annotations

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
@click.option("--weights", type=click.Choice(["int8", "bf16", "fp32"]), default=None,
              help="Stored weight format to compute with [default: as PATH stores them]: int8 keeps int8 weights "
                   "(weight-only quantized matmuls, needs an int8 conversion), bf16/fp32 dequantize them.")
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
@click.pass_context
@cli_errors
def generate_cmd(ctx: click.Context, path: Path, prompts: tuple[str, ...], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, tokenizer_path: Path | None, weights: str, dtype: str, numerics: str, threads: int | None,
                 truncate: bool) -> None:
    """Continue each --prompt with the model in the converted directory PATH.

    One prompt streams its continuation as it is produced; several print each row, labelled, as it
    finishes. A closing line gives the prefill and decode speeds in tokens/s.
    """
    import grok_torch
    from grok_torch.generation import PromptTruncatedWarning, fit_prompts, generate
    from grok_torch.tokenizer import StreamDecoder, Tokenizer, find_tokenizer

    if temperature == 0:  # greedy: nothing is drawn
        ignored = [f"--{name.replace('_', '-')}" for name in ("top_p", "seed")
                   if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
        if ignored:
            raise UserError(f"{' and '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply with "
                            f"--temperature 0 (greedy decoding draws nothing)")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a converted grok-torch directory)")
    tokenizer = Tokenizer(find_tokenizer(tokenizer_path, path)[0])
    model = grok_torch.load(path, weights=weights, dtype=dtype, numerics=numerics, threads=threads)
    tokenizer.check_model_vocab(model.config.vocab_size)

    encoded = [tokenizer.encode(text) for text in prompts]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptTruncatedWarning)
        fitted = fit_prompts(encoded, max_new_tokens, model.config.sequence_len, model.config.vocab_size, truncate)
    for warning in caught:
        click.echo(f"Warning: {warning.message}", err=True)

    single = len(prompts) == 1
    decoders = [StreamDecoder(tokenizer, prompt) for prompt in fitted]

    def on_token(row: int, token: int) -> None:
        text = decoders[row].push(token)
        if single and text:
            click.echo(text, nl=False)

    def on_finish(row: int, reason: str) -> None:
        if single:
            click.echo(decoders[row].flush())
        else:  # a whole row at a time keeps a batch readable
            click.echo(f"[{row + 1}] ({reason}) {tokenizer.decode(fitted[row])}{decoders[row].text}")

    if single:
        click.echo(tokenizer.decode(fitted[0]), nl=False)
    result = generate(model, fitted, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      seed=seed, on_token=on_token, on_finish=on_finish)
    click.echo(result.stats.summary())
