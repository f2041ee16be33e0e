"""The golden upstream checkpoint through the converter: every output format loads in grok_torch and
agrees with the activations recorded from the upstream code (bf16 as faithfully as int8; bf16-plain, which
rounds the MoE down projection, measurably less); a layer-order mix-up in the files fails."""

import numpy as np
import pytest
import torch

import grok_torch
from convert.converter import convert_checkpoint
from parity.harness import load_golden, run_golden, torch_end_to_end
from parity.report import bit_exact_by_submodule

from support.paths import GOLDEN_DIR
from support.checkpoints import permute_layers_numeric


@pytest.fixture(scope="module")
def golden():
    return load_golden(GOLDEN_DIR)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, golden):
    config = golden[0]
    root = tmp_path_factory.mktemp("golden-converted")
    return {fmt: convert_checkpoint(GOLDEN_DIR, root / fmt, config, weights=fmt, progress=False).dst
            for fmt in ("int8", "bf16", "bf16-plain", "fp32")}


def _golden_fidelity(model) -> tuple[float, float, bool]:
    """(least bit-exact fraction of moe_out over the layers, teacher-forced; the logits' relative RMS error
    end to end; whether the golden comparison passes)."""
    report = run_golden(GOLDEN_DIR, model=model)
    logits = next(c for c in report.runs["end_to_end"].comparisons if c.name == "logits")
    return bit_exact_by_submodule(report.runs["teacher_forced"])["moe_out"], logits.rel_rms, report.passed


@pytest.mark.parametrize("weight_format", ["int8", "bf16", "fp32"])
def test_converted_golden_passes_the_golden_comparison(converted, golden, weight_format):
    _, _, tokens, ref = golden
    model = grok_torch.load(converted[weight_format], dtype="bf16", numerics="upstream")
    report = run_golden(GOLDEN_DIR, model=model)
    failure = report.first_failure
    assert report.passed, failure[1].describe() if failure else report.runs["end_to_end"].distribution
    logits = torch_end_to_end(model, tokens)["logits"]
    real = tokens > 0
    assert np.array_equal(logits.argmax(-1)[real], ref["logits"].argmax(-1)[real])


def test_fp32_and_int8_conversions_compute_identical_logits(converted, golden):
    """fp32 holds exactly the weights upstream computes with, so in bf16 it runs bit for bit like int8; so does
    bf16, converted or loaded (it keeps the MoE down projections int8 + scales)."""
    tokens = torch.from_numpy(golden[2])
    int8 = grok_torch.load(converted["int8"], dtype="bf16", numerics="upstream")
    others = {"fp32": grok_torch.load(converted["fp32"], dtype="bf16", numerics="upstream"),
              "bf16": grok_torch.load(converted["bf16"], dtype="bf16", numerics="upstream"),
              "bf16 loaded from int8": grok_torch.load(converted["int8"], weights="bf16", dtype="bf16",
                                                       numerics="upstream")}
    with torch.no_grad():
        expected = int8(tokens)
        for name, model in others.items():
            assert torch.equal(model(tokens), expected), name


def test_bf16_reaches_int8s_golden_fidelity_and_bf16_plain_falls_short_as_measured(converted):
    """Measured (README, Numerics): int8 and bf16 reach 98.78 % bit-exact moe_out (the least over the 12
    layers, teacher-forced) and a logits rel RMS of 0.0049 end to end; bf16-plain, whose down projection is
    rounded to bf16, 56.5 % and 0.0171. The bounds sit between the two."""
    models = {"int8": grok_torch.load(converted["int8"], dtype="bf16", numerics="upstream"),
              "bf16": grok_torch.load(converted["bf16"], dtype="bf16", numerics="upstream"),
              "bf16 loaded": grok_torch.load(converted["int8"], weights="bf16", dtype="bf16", numerics="upstream"),
              "bf16-plain": grok_torch.load(converted["bf16-plain"], dtype="bf16", numerics="upstream"),
              "bf16-plain loaded": grok_torch.load(converted["int8"], weights="bf16-plain", dtype="bf16",
                                                   numerics="upstream")}
    assert {name: m.weights for name, m in models.items()} == {
        "int8": "int8", "bf16": "bf16", "bf16 loaded": "bf16", "bf16-plain": "bf16-plain",
        "bf16-plain loaded": "bf16-plain"}
    # the loaded ones hold the same weights as the converted ones (bit for bit: test_convert.py), so three runs
    fidelity = {name: _golden_fidelity(models[name]) for name in ("int8", "bf16", "bf16-plain")}
    moe_int8, rms_int8, passed = fidelity["int8"]
    assert moe_int8 >= 0.98 and rms_int8 < 0.006 and passed, fidelity
    assert fidelity["bf16"] == fidelity["int8"], fidelity
    moe, rms, passed = fidelity["bf16-plain"]
    assert moe < 0.7 and rms > 2.5 * rms_int8 and not passed, fidelity  # outside the bf16 end-to-end tier


def test_layer_files_in_numeric_order_convert_but_fail_the_golden_comparison(tmp_path, golden):
    config = golden[0]
    permuted = permute_layers_numeric(GOLDEN_DIR, tmp_path / "permuted", config)
    dst = convert_checkpoint(permuted, tmp_path / "converted", config, progress=False).dst  # shapes agree
    model = grok_torch.load(dst, dtype="bf16", numerics="upstream")
    report = run_golden(GOLDEN_DIR, model=model)
    assert not report.passed
    mode, failure = report.first_failure
    assert failure.name.startswith("decoder_layer_2."), failure.name  # layer 2 holds file order's layer 10


def test_golden_needs_a_bf16_model_of_its_config(converted):
    model = grok_torch.load(converted["int8"], dtype="fp32", numerics="upstream")
    with pytest.raises(ValueError, match=r"differs in compute dtype: bf16 needed, the model computes in float32$"):
        run_golden(GOLDEN_DIR, model=model)
