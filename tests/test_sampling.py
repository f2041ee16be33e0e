"""Sampling: upstream's nucleus rule on hand-made distributions, temperature, greedy, seeded draws.

The expected kept sets are worked out by hand from upstream's rule (runners.py top_p_filter): sort
the probabilities ascending, take running sums from the least likely token, find the FIRST position
whose running sum is >= 1 - top_p (position 0 if none), keep every token whose probability is >=
the probability at that position. The distributions are dyadic so every sum is exact.
"""

import math
import random

import pytest
import torch
from jaxtyping import TypeCheckError

from grok_torch.sampling import FILTERED_LOGIT, nucleus_filter, nucleus_keep_mask, sample_next


def kept(probs, top_p):
    return set(torch.nonzero(nucleus_keep_mask(torch.tensor(probs), top_p)).flatten().tolist())


def test_exact_boundary_keeps_the_threshold_token():
    probs = [0.125, 0.5, 0.125, 0.25]
    # ascending 0.125, 0.125, 0.25, 0.5; running sums 0.125, 0.25, 0.5, 1.0.
    # top_p 0.75: 1 - p = 0.25, first reached at position 1 (a 0.125): keep p >= 0.125 -> all four.
    assert kept(probs, 0.75) == {0, 1, 2, 3}
    # top_p 0.5: 1 - p = 0.5, first reached at position 2 (0.25): keep p >= 0.25 -> tokens 1, 3.
    assert kept(probs, 0.5) == {1, 3}
    # top_p 0.625: 1 - p = 0.375, first reached at position 2 (0.5 >= 0.375): tokens 1, 3.
    assert kept(probs, 0.625) == {1, 3}
    # top_p 0.4: 1 - p = 0.6, first reached at position 3 (1.0): only token 1.
    assert kept(probs, 0.4) == {1}


def test_ties_are_kept_together():
    probs = [0.125, 0.125, 0.25, 0.125, 0.125, 0.125, 0.125]
    # ascending six 0.125 then 0.25; running sums 0.125, 0.25, 0.375, 0.5, ...
    # top_p 0.5: 1 - p = 0.5 first reached at position 3, a 0.125: every 0.125 stays (a positional
    # cut would keep the 0.25 and only some of the tied 0.125s).
    assert kept(probs, 0.5) == set(range(7))
    # top_p 0.2: 1 - p = 0.8 (float32: 0.800000011920929), first reached at position 6 (1.0): only the 0.25.
    assert kept(probs, 0.2) == {2}
    # Tied top tokens: [0.375, 0.25, 0.375], ascending 0.25, 0.375, 0.375, sums 0.25, 0.625, 1.0.
    # tiny top_p 1e-6: 1 - p is reached only by the full sum, at position 2 (0.375): both 0.375s.
    assert kept([0.375, 0.25, 0.375], 1e-6) == {0, 2}


def test_top_p_one_keeps_everything():
    # 1 - p = 0: position 0 qualifies, threshold = the smallest probability, here 0.
    assert kept([0.5, 0.0, 0.25, 0.25, 0.0], 1.0) == {0, 1, 2, 3, 4}


def test_tiny_top_p_keeps_the_top_token():
    probs = [0.125, 0.5, 0.125, 0.25]
    # p = 2**-30: 1 - p rounds to 1.0 in float32; the exact running sum reaches 1.0 at the last position.
    assert kept(probs, 2.0**-30) == {1}
    assert kept(probs, 1e-3) == {1}


def test_no_position_reaching_one_minus_p_keeps_everything():
    # Mass 0.9375 (as when rounding leaves a softmax short of 1 - p): sums 0.0625, 0.1875, 0.4375,
    # 0.9375, none >= 0.99; argmax of all-false is position 0, threshold 0.0625 -> all kept.
    assert kept([0.5, 0.25, 0.125, 0.0625], 0.01) == {0, 1, 2, 3}


def test_per_row_top_p():
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25], [0.125, 0.5, 0.125, 0.25]])
    mask = nucleus_keep_mask(probs, torch.tensor([0.75, 0.4]))
    assert mask.tolist() == [[True, True, True, True], [False, True, False, False]]


def rule_by_hand(probs: list[float], top_p: float) -> set[int]:
    """Upstream's rule, step by step in plain Python (the reference for random distributions)."""
    order = sorted(range(len(probs)), key=lambda i: probs[i])
    running, threshold_position = 0.0, 0
    for position, index in enumerate(order):
        running += probs[index]
        if running >= 1 - top_p:
            threshold_position = position
            break
    threshold = probs[order[threshold_position]]
    return {i for i, p in enumerate(probs) if p >= threshold}


def test_random_distributions_match_the_rule_step_by_step():
    rng = random.Random(0)
    for _ in range(200):
        size = rng.randint(1, 40)
        weights = [rng.choice([rng.random(), rng.random() ** 6, 0.25]) for _ in range(size)]
        total = sum(weights)
        probs = [w / total for w in weights]
        top_p = rng.choice([rng.random(), 1.0, 0.999, 1e-9])
        if top_p == 0:
            continue
        got = set(torch.nonzero(nucleus_keep_mask(torch.tensor(probs, dtype=torch.float64), top_p)).flatten().tolist())
        assert got == rule_by_hand(probs, top_p), (probs, top_p)


def test_filter_on_logits():
    logits = torch.log(torch.tensor([[0.6, 0.25, 0.1, 0.05], [0.05, 0.6, 0.25, 0.1]]))
    # probabilities 0.6, 0.25, 0.1, 0.05; top_p 0.8: 1 - p = 0.2; ascending sums 0.05, 0.15, 0.4:
    # first >= 0.2 at 0.25 -> keep 0.6 and 0.25.
    out = nucleus_filter(logits, 0.8)
    assert torch.equal(out == FILTERED_LOGIT, torch.tensor([[False, False, True, True], [True, False, False, True]]))
    assert torch.equal(out[out != FILTERED_LOGIT], logits[out != FILTERED_LOGIT])
    assert torch.equal(nucleus_filter(logits, 1.0), logits)


def test_invalid_settings_are_refused():
    logits = torch.zeros(1, 4)
    for top_p in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="top_p must be in"):
            sample_next(logits, 1.0, top_p)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample_next(logits, -1.0)


def test_temperature_zero_is_argmax():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1  # a tie: the lowest index
    out = sample_next(logits, 0.0, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(out, torch.argmax(logits, dim=-1)) and out[3] == 7


def test_sampling_is_deterministic_per_seed():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    draw = lambda seed: sample_next(logits, 1.0, 0.95, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_draws_follow_the_filtered_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature, top_p = 0.7, 0.9
    probs = torch.softmax(logits / temperature, -1)
    # Expected kept set by the rule: ascending sums of the tempered probabilities.
    ascending = sorted(probs.tolist())
    sums = [sum(ascending[: i + 1]) for i in range(len(ascending))]
    threshold = ascending[next(i for i, s in enumerate(sums) if s >= 1 - top_p)]
    keep = probs >= threshold
    expected = torch.where(keep, probs, 0) / probs[keep].sum()
    n = 40000
    draws = sample_next(logits.expand(n, -1), temperature, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / n
    assert torch.all(freq[~keep] == 0)
    assert torch.allclose(freq, expected.double(), atol=4 * math.sqrt(0.25 / n))


def test_only_the_top_token_is_drawn_with_a_tiny_top_p():
    logits = torch.randn(32, 500, generator=torch.Generator().manual_seed(2))
    draws = sample_next(logits, 1.5, 1e-4, torch.Generator().manual_seed(0))
    assert torch.equal(draws, logits.argmax(-1))


def test_shapes_are_checked():
    with pytest.raises(TypeCheckError):
        sample_next(torch.zeros(2, 3, 4), 1.0)
