"""Numerics modes: chosen by name at build or load, switched without touching a weight."""

import pytest
import torch

from grok_torch.config import GrokConfig
from grok_torch.model import Grok
from grok_torch.numerics import PRESETS, Numerics, resolve


def test_unknown_mode_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="numerics must be one of upstream.*'fastest'"):
        resolve("fastest")
    with pytest.raises(ValueError, match="numerics must be one of"):
        Grok(GrokConfig.from_name("tiny"), numerics="fastest", device="meta")


def test_mode_reaches_every_module_and_is_not_state():
    model = Grok(GrokConfig.from_name("tiny"), numerics="upstream", device="meta")
    assert model.numerics is PRESETS["upstream"]
    other = Numerics(name="test-only", summary="a mode made in the test")
    before = set(model.state_dict())
    model.numerics = other
    holders = [m for m in model.modules() if m is not model and hasattr(m, "numerics")]
    assert holders and all(m.numerics is other for m in holders)
    assert set(model.state_dict()) == before
    assert resolve(None) is PRESETS["fast"] and resolve(other) is other
    assert isinstance(model.embedding.weight, torch.Tensor)
