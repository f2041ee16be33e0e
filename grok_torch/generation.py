"""Batched text generation with the KV cache: left-padded prompts, one prefill, then one-token steps.

    from grok_torch.generation import generate
    result = generate(model, [tokenizer.encode("The answer is"), tokenizer.encode("Hi")],
                      max_new_tokens=100, temperature=0.01, top_p=1.0, seed=42,
                      on_token=lambda row, token: ...)
    result.tokens[i]           # generated ids of prompt i (EOS not included)
    result.finish_reasons[i]   # "eos" or "length"
    result.stats.prefill_tokens_per_s, result.stats.decode_tokens_per_s

Prompts of different lengths are left-padded with pad_token, so every row shares the cache positions
and a step is one batched forward pass; padding is masked as keys (as upstream masks it), so a row
sees only its own tokens. RoPE positions are raw cache indices, as in upstream's forward pass, so a
row's logits equal those of a full forward pass over the same padded batch. A row stops at EOS or
after max_new_tokens; finished rows keep feeding pad tokens (masked, harmless) until all stop.
Sampling follows upstream's runner (grok_torch.sampling); the defaults are upstream run.py's
(temperature 0.01, top_p 1.0, seed 42, 100 tokens), but generation stops at EOS, which upstream's
runner does not (pass eos_token=-1 for that).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from grok_torch.model import Grok, KVCache
from grok_torch.numerics import Numerics
from grok_torch.sampling import check_temperature, sample_next


class GenerationError(ValueError):
    """Generation refused before any computation: a prompt too long for the model, bad settings."""


class PromptTruncatedWarning(UserWarning):
    """A prompt was left-truncated to fit the model's sequence_len (truncate=True)."""


@dataclass
class GenerationStats:
    prompt_tokens: int  # real prompt tokens, padding excluded
    padded_prompt_tokens: int  # batch x padded prompt length: what the prefill computed
    prefill_seconds: float  # the prefill forward pass and the first sampled token of every row
    decode_steps: int  # one-token forward passes after the prefill
    decode_tokens: int  # tokens those steps produced for rows still running
    decode_seconds: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"prefill: {self.prompt_tokens} tokens in {self.prefill_seconds:.3f} s "
                f"({self.prefill_tokens_per_s:.1f} tokens/s); decode: {self.decode_tokens} tokens in "
                f"{self.decode_seconds:.3f} s ({self.decode_tokens_per_s:.1f} tokens/s)")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt, EOS excluded
    finish_reasons: list[str]  # per prompt: "eos" or "length"
    prompts: list[list[int]]  # the prompts as used (left-truncated ones shortened)
    stats: GenerationStats


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, sequence_len: int, vocab_size: int,
                truncate: bool = False) -> list[list[int]]:
    """Check prompts against the model; too long (prompt + max_new_tokens > sequence_len) is an
    error, or with `truncate` the prompt keeps its last tokens and a PromptTruncatedWarning is issued."""
    if not prompts:
        raise GenerationError("no prompts given")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    room = sequence_len - max_new_tokens
    if room < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                              f"sequence_len={sequence_len}")
    fitted = []
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise GenerationError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        if len(prompt) > room:
            message = (f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} the model's "
                       f"sequence_len={sequence_len} allows at most {room}")
            if not truncate:
                raise GenerationError(message + " (shorten it, lower max_new_tokens, or truncate it)")
            warnings.warn(message + f": kept its last {room} tokens", PromptTruncatedWarning, stacklevel=3)
            prompt = prompt[-room:]
        fitted.append(prompt)
    return fitted


def left_pad(prompts: list[list[int]], pad_token: int) -> Int[Tensor, "batch seq"]:
    """[B, longest] int64, each prompt right-aligned after pad_token fill."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_token, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.int64)
    return tokens


def prefill(model: Grok, tokens: Int[Tensor, "batch seq"], cache: KVCache,
            chunk: int | None = None) -> Float[Tensor, "batch vocab"]:
    """Run the prompts through the model into `cache`; the logits of the last position.

    With `chunk`, the prompts go in pieces of `chunk` positions (the same attention through the
    cache), so only [batch, chunk, vocab] logits exist at a time.
    """
    step = tokens.shape[1] if not chunk else chunk
    logits = None
    for start in range(0, tokens.shape[1], step):
        logits = model(tokens[:, start:start + step], cache)[:, -1]
    return logits


def decode_step(model: Grok, tokens: Int[Tensor, "batch"], cache: KVCache) -> Float[Tensor, "batch vocab"]:
    """One token per row through the cache; the next-token logits."""
    return model(tokens[:, None], cache)[:, -1]


def generate(model: Grok, prompts: list[list[int]], *, max_new_tokens: int = 100, temperature: float = 0.01,
             top_p: float = 1.0, seed: int = 42, eos_token: int | None = None,
             on_token: Callable[[int, int], None] | None = None,
             on_finish: Callable[[int, str], None] | None = None,
             truncate: bool = False, prefill_chunk: int | None = 512,
             numerics: str | Numerics | None = None) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after each prompt (lists of token ids, no BOS needed).

    temperature 0 is greedy; top_p is upstream's nucleus rule; `seed` seeds the draws (a CPU
    torch.Generator: the same seed, model and prompts give the same tokens). eos_token: None uses the
    model config's (2); a negative id never stops. on_token(row, token) is called as each token is
    produced (not for EOS), on_finish(row, reason) when a row stops ("eos" or "length").
    A prompt with len(prompt) + max_new_tokens > sequence_len raises GenerationError, or with
    `truncate` is left-truncated with a PromptTruncatedWarning. prefill_chunk bounds the prefill's
    logits memory (None: one pass). numerics: the numerics mode for this call ("fast" or "upstream";
    None: the model's own, which is "fast" unless chosen otherwise at load); the model's mode is
    restored afterwards.
    """
    if numerics is not None:
        before = model.numerics
        model.numerics = numerics
        try:
            return generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, eos_token=eos_token, on_token=on_token, on_finish=on_finish,
                            truncate=truncate, prefill_chunk=prefill_chunk)
        finally:
            model.numerics = before
    config = model.config
    try:
        check_temperature(temperature)
    except ValueError as err:
        raise GenerationError(str(err)) from None
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p} (for greedy decoding use temperature 0)")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise GenerationError(f"prefill_chunk must be positive, got {prefill_chunk}")
    prompts = fit_prompts(prompts, max_new_tokens, config.sequence_len, config.vocab_size, truncate)
    eos = config.eos_token if eos_token is None else eos_token
    batch = len(prompts)
    device = model.embedding.weight.device
    tokens = left_pad(prompts, config.pad_token)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    generated: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * batch

    def take(next_tokens: Tensor, produced: int) -> int:
        """Record this step's tokens of the running rows; how many rows were running."""
        running = 0
        for row, token in enumerate(next_tokens.tolist()):
            if reasons[row] is not None:
                continue
            running += 1
            if token == eos:
                reasons[row] = "eos"
            else:
                generated[row].append(token)
                if on_token is not None:
                    on_token(row, token)
                if produced == max_new_tokens:
                    reasons[row] = "length"
            if reasons[row] is not None and on_finish is not None:
                on_finish(row, reasons[row])
        return running

    def sample(logits: Tensor) -> Tensor:
        return sample_next(logits.to(torch.float32).cpu(), temperature, top_p, generator)

    with torch.inference_mode():
        cache = model.new_cache(batch, tokens.shape[1] + max_new_tokens)
        start = time.perf_counter()
        next_tokens = sample(prefill(model, tokens.to(device), cache, prefill_chunk))
        take(next_tokens, 1)
        prefill_seconds = time.perf_counter() - start

        start = time.perf_counter()
        steps = decode_tokens = 0
        pad = torch.tensor(config.pad_token)
        while any(reason is None for reason in reasons):
            running = torch.tensor([r is None for r in reasons])
            feed = torch.where(running, next_tokens, pad)  # finished rows feed padding (masked)
            next_tokens = sample(decode_step(model, feed.to(device), cache))
            steps += 1
            decode_tokens += take(next_tokens, steps + 1)
        decode_seconds = time.perf_counter() - start

    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts), padded_prompt_tokens=tokens.numel(),
                            prefill_seconds=prefill_seconds, decode_steps=steps, decode_tokens=decode_tokens,
                            decode_seconds=decode_seconds)
    return GenerationResult(tokens=generated, finish_reasons=[str(r) for r in reasons], prompts=prompts, stats=stats)
