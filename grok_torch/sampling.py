"""Next-token sampling as upstream's runner does it: temperature, its nucleus (top-p) rule, a categorical draw.

Upstream's nucleus rule (runners.py `top_p_filter`), in words: sort the probabilities in ASCENDING
order and take their running sum from the least likely token up; the threshold is the first sorted
position whose running sum is >= 1 - top_p (the first one, as argmax of a boolean picks it). Every
token whose probability is >= the probability at that position is kept (so all tokens tied with the
threshold token are kept), the others are set to a logit of -1e10. Consequences:

- the excluded tail (tokens strictly below the threshold) has mass < 1 - top_p, so the kept mass is
  > top_p, and at an exact boundary the threshold token stays: with (0.5, 0.25, 0.125, 0.125) and
  top_p = 0.75 the running sums 0.125, 0.25, ... reach 1 - top_p = 0.25 at the second 0.125, so
  every token is kept (a rule dropping tokens whose running sum is <= 1 - top_p keeps two).
- ties are kept or dropped together, never split by position: with (0.25, 0.125 x 6) and
  top_p = 0.5 the threshold lands on a 0.125 and all seven tokens are kept.
- top_p = 1: 1 - top_p = 0 and the first position qualifies: every token is kept.
- tiny top_p: only the top token (and its ties) is kept, once 1 - top_p is reached only by the
  full sum. If no position qualifies at all (rounding leaves the total mass below 1 - top_p, or the
  given probabilities do not sum to 1), argmax of an all-false vector is 0: the threshold is the
  least likely token and EVERY token is kept. That is upstream's behaviour and is kept here.

Upstream evaluates the rule in the logits' dtype (bf16 for the real model); here it is evaluated in
float32 (float64 inputs stay float64) so that a running sum over 131072 probabilities means what
the rule says. The categorical draw uses torch's generator, so draws are reproducible per seed but
are not JAX's random stream. Temperature 0 (upstream would divide by zero) means greedy argmax.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

# Upstream's value for removed logits (runners.py): finite, so a row never becomes all -inf.
FILTERED_LOGIT = -1e10


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_row(value: float | Tensor, like: Tensor) -> Tensor:
    """A scalar or a per-row tensor [*batch], as [*batch, 1] in like's dtype and device."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value.expand(like.shape[:-1]).unsqueeze(-1)
    if value.shape != like.shape[:-1]:
        raise ValueError(f"top_p has shape {tuple(value.shape)}; expected a scalar or {tuple(like.shape[:-1])}")
    return value.unsqueeze(-1)


def _check_top_p(top_p: float | Tensor) -> None:
    values = torch.as_tensor(top_p, dtype=torch.float64)
    if values.isnan().any() or (values <= 0).any() or (values > 1).any():
        raise ValueError(f"top_p must be in (0, 1], got {top_p} (for greedy decoding use temperature 0)")


def check_temperature(temperature: float) -> None:
    """A finite number >= 0 (infinity would make every token equally likely; NaN, none)."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be >= 0 and finite, got {temperature!r}")


def nucleus_keep_mask(probs: Float[Tensor, "*batch vocab"], top_p: float | Tensor) -> Bool[Tensor, "*batch vocab"]:
    """Which tokens upstream's nucleus rule keeps, given probabilities (not renormalised here).

    top_p: a float, or a tensor [*batch] with one value per row (upstream's settings are per row).
    """
    _check_top_p(top_p)
    probs = probs.to(_work_dtype(probs))
    ascending = torch.sort(probs, dim=-1).values
    running = torch.cumsum(ascending, dim=-1)
    reached = running >= 1 - _per_row(top_p, probs)
    # First position where the running sum reaches 1 - top_p; 0 when none does (argmax of all-false).
    first = torch.argmax(reached.to(torch.uint8), dim=-1, keepdim=True)
    threshold = torch.gather(ascending, -1, first)
    return probs >= threshold


def nucleus_filter(logits: Float[Tensor, "*batch vocab"], top_p: float | Tensor) -> Float[Tensor, "*batch vocab"]:
    """Logits with every token outside upstream's nucleus set to -1e10 (upstream's top_p_filter).

    Keeping by probability or by logit is the same rule: softmax is monotone, and tokens whose
    probabilities underflow to 0 are never drawn either way.
    """
    logits = logits.to(_work_dtype(logits))
    keep = nucleus_keep_mask(torch.softmax(logits, dim=-1), top_p)
    return logits.masked_fill(~keep, FILTERED_LOGIT)


def sample_next(logits: Float[Tensor, "batch vocab"], temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Int[Tensor, "batch"]:
    """One token per row: logits / temperature, upstream's nucleus filter, then a categorical draw.

    temperature 0 is greedy: the argmax (the lowest index among equal maxima), top_p unused. The draw
    uses `generator` (on the logits' device), so a seeded generator makes it reproducible.
    """
    check_temperature(temperature)
    _check_top_p(top_p)
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    scaled = logits.to(_work_dtype(logits)) / temperature
    probs = torch.softmax(nucleus_filter(scaled, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
