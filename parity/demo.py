"""`grok-torch demo`: the whole toolkit on a tiny random Grok, end to end, in well under a minute.

1. draw seeded random weights for a tiny config (parity.init, numpy only) and write them in the
   official format (`ckpt-0/tensorNNNNN_000` pickles, int8 + grouped bf16 scales) with export-upstream;
2. convert that checkpoint to sharded safetensors (int8) and verify every tensor;
3. load the conversion in grok_torch (meta device, memory-mapped, int8 kept);
4. run the parity report against the JAX/haiku reference on the raw checkpoint read back
   (fp32 and bf16), when JAX is installed;
5. generate a few tokens from a prompt with the release's tokenizer when one is found (the weights
   are random, so the text is noise: the point is the machinery).

The default config, `demo`, has the real 131072-token vocabulary so the real tokenizer fits it.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import click

from grok_torch.errors import UserError, cli_errors

DEFAULT_PROMPT = "The answer to life, the universe and everything is"
def _jax_available() -> bool:
    """JAX and haiku belong to the parity extra; the rest of the demo runs without them."""
    try:
        import haiku  # noqa: F401
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


class Steps:
    """Numbered steps, each printed with its wall time."""

    def __init__(self, total: int, echo=click.echo):
        self.total, self.done, self.echo = total, 0, echo
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, title: str):
        self.done += 1
        self.echo(f"[{self.done}/{self.total}] {title} ...")
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.timings[title] = seconds
        self.echo(f"      done in {seconds:.1f} s")


def run_demo(workdir: Path, *, config_name: str = "demo", tokenizer: Path | None = None,
             prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 12, seed: int = 0, echo=click.echo) -> bool:
    """Runs every step in `workdir` (which must be empty or absent); True when parity passed."""
    import torch

    import grok_torch
    from convert.converter import convert_checkpoint
    from convert.upstream.export import export_upstream
    from convert.upstream.raw_checkpoint import read_raw_checkpoint
    from convert.upstream.tree import haiku_tree_to_state_dict
    from convert.verify import verify
    from grok_torch.config import GrokConfig
    from grok_torch.generation import generate
    from parity.init import init_params

    config = GrokConfig.resolve(config_name)
    have_jax = _jax_available()
    steps = Steps(5 + (2 if have_jax else 0), echo)
    raw_dir, converted_dir = workdir / "upstream", workdir / "converted"
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    echo(f"grok-torch demo: config {config_name!r} (D={config.emb_size}, {config.num_layers} layers, "
         f"{config.num_experts} experts, vocab {config.vocab_size}, {config.num_parameters() / 1e6:.1f}M "
         f"parameters) in {workdir}")

    with steps.step("random checkpoint in the official format (export-upstream)"):
        params = init_params(config, seed=seed)
        export_upstream(haiku_tree_to_state_dict(params, config), raw_dir, config=config, progress=False)
        config.save_json(raw_dir / "config.json")
        files = sorted((raw_dir / "ckpt-0").iterdir())
        echo(f"      {len(files)} pickles, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB in {raw_dir / 'ckpt-0'}")
    with steps.step("convert to sharded safetensors (int8 weights, bf16 scales)"):
        result = convert_checkpoint(raw_dir, converted_dir, config, weights="int8", progress=False)
        echo(f"      {result.dst}: {', '.join(sorted(p.name for p in result.dst.iterdir()))}")
    with steps.step("verify every converted tensor against the pickles"):
        mismatches = verify(raw_dir, converted_dir)
        if mismatches:
            raise UserError("verify failed: " + "; ".join(mismatches[:3]))
        echo("      every tensor bit-exact")
    with steps.step("load in grok_torch (meta device, memory-mapped, int8 kept)"):
        model = grok_torch.load(converted_dir, weights="int8", dtype="fp32", numerics="upstream")
        int8 = sum(b.numel() for n, b in model.named_buffers() if b.dtype == torch.int8)
        echo(f"      {type(model).__name__}: {int8 / 1e6:.1f}M int8 weights")

    passed = True
    bf16_model = None  # loaded once, for the bf16 parity run and for generation
    if have_jax:
        from parity.harness import run_parity
        from parity.report import format_report

        raw_params = read_raw_checkpoint(raw_dir, config)
        for dtype in ("fp32", "bf16"):
            with steps.step(f"parity with the JAX/haiku reference on the same checkpoint ({dtype})"):
                if dtype == "fp32":
                    loaded = model
                else:
                    loaded = bf16_model = grok_torch.load(converted_dir, weights="int8", dtype=dtype, numerics="upstream")
                report = run_parity(config, dtype=dtype, seed=seed, params=raw_params, model=loaded,
                                    seq_len=32, label="haiku reference (raw checkpoint)")
                echo("\n".join("      " + line for line in format_report(report).splitlines()))
                passed &= report.passed
    else:
        echo("(parity skipped: JAX and dm-haiku are not installed; pip install 'grok-torch[parity]')")

    with steps.step("generate (greedy, KV cache)"):
        from grok_torch.tokenizer import Tokenizer, TokenizerError, find_tokenizer

        model = bf16_model if bf16_model is not None else grok_torch.load(converted_dir, weights="int8", dtype="bf16")
        tok = None
        try:
            path, source = find_tokenizer(tokenizer, converted_dir)
        except TokenizerError as err:  # none found: the demo runs on token ids
            path, source = None, str(err)
        if path is not None:
            tok = Tokenizer(path)
            if tokenizer is None and tok.vocab_size != config.vocab_size:  # found, not asked for: pass on it
                source += f", but its {tok.vocab_size} pieces do not fit this config's vocab {config.vocab_size}"
                tok = None
            else:
                tok.check_model_vocab(config.vocab_size)
        if tok is None:
            echo(f"      {source}; generating from token ids instead of text")
            prompts = [[config.pad_token + 1 + (i * 7919) % (config.vocab_size - config.pad_token - 1)
                        for i in range(1, 6)]]
            result = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
            echo(f"      prompt ids {prompts[0]} -> {result.tokens[0]}")
        else:
            ids = tok.encode(prompt)
            result = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=0.0)
            echo(f"      tokenizer {path} ({source}); the weights are random, so the words are too")
            echo(f"      {prompt!r} -> {tok.decode(result.tokens[0])!r}")
        echo(f"      {result.stats.summary()}")

    total = sum(steps.timings.values())
    echo(f"demo {'PASSED' if passed else 'FAILED (parity)'} in {total:.1f} s")
    return passed


@click.command("demo")
@click.option("--config", "config_name", default="demo", show_default=True, metavar="NAME|JSON",
              help="Model config: a preset name or a JSON file (the default has the real vocabulary).")
@click.option("--tokenizer", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The release's tokenizer.model [default: $GROK_TOKENIZER, else the development checkout's "
                   "../shared/grok1/tokenizer.model; without one the demo generates token ids].")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=12, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep the checkpoint and conversion here (must not exist) [default: a temporary "
                   "directory, removed at the end].")
@cli_errors
def demo_cmd(config_name: str, tokenizer: Path | None, prompt: str, max_new_tokens: int, seed: int,
             workdir: Path | None) -> None:
    """Write a tiny random Grok checkpoint in the official format, convert it, load it in PyTorch,
    check parity with the JAX reference and generate a few tokens, timing each step.

    Needs no network and no GPU. Exits with status 1 when parity fails.
    """
    if workdir is not None:
        if workdir.exists():
            raise UserError(f"--workdir {workdir} already exists; give a new path")
        passed = run_demo(workdir, config_name=config_name, tokenizer=tokenizer, prompt=prompt,
                          max_new_tokens=max_new_tokens, seed=seed)
    else:
        with tempfile.TemporaryDirectory(prefix="grok-torch-demo-") as tmp:
            passed = run_demo(Path(tmp) / "demo", config_name=config_name, tokenizer=tokenizer, prompt=prompt,
                              max_new_tokens=max_new_tokens, seed=seed)
    if not passed:
        raise SystemExit(1)
