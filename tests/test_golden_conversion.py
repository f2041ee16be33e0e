"""The golden upstream checkpoint through the converter: every output format loads in grok_torch and
agrees with the activations recorded from the upstream code; a layer-order mix-up in the files fails."""

import numpy as np
import pytest
import torch

import grok_torch
from convert.converter import convert_checkpoint
from parity.harness import load_golden, run_golden, torch_end_to_end

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
            for fmt in ("int8", "bf16", "fp32")}


BF16_ROUNDS_THE_DOWN_PROJECTION = pytest.mark.xfail(strict=True, reason=(
    "bf16 weights round the MoE down projection, whose exact int8 x scale product upstream uses: end to end "
    "the golden KL is 1.25e-4 and runner-up agreement 0.964 (int8: 4.3e-6 and 1.000), outside the bf16 tier"))


@pytest.mark.parametrize("weight_format", ["int8", pytest.param("bf16", marks=BF16_ROUNDS_THE_DOWN_PROJECTION), "fp32"])
def test_converted_golden_passes_the_golden_comparison(converted, golden, weight_format):
    _, _, tokens, ref = golden
    model = grok_torch.load(converted[weight_format], dtype="bf16")
    report = run_golden(GOLDEN_DIR, model=model)
    failure = report.first_failure
    assert report.passed, failure[1].describe() if failure else report.runs["end_to_end"].distribution
    logits = torch_end_to_end(model, tokens)["logits"]
    real = tokens > 0
    assert np.array_equal(logits.argmax(-1)[real], ref["logits"].argmax(-1)[real])


def test_fp32_and_int8_conversions_compute_identical_logits(converted, golden):
    """fp32 holds exactly the weights upstream computes with, so in bf16 it runs bit for bit like int8."""
    tokens = torch.from_numpy(golden[2])
    int8 = grok_torch.load(converted["int8"], dtype="bf16")
    fp32 = grok_torch.load(converted["fp32"], dtype="bf16")
    with torch.no_grad():
        assert torch.equal(int8(tokens), fp32(tokens))


def test_layer_files_in_numeric_order_convert_but_fail_the_golden_comparison(tmp_path, golden):
    config = golden[0]
    permuted = permute_layers_numeric(GOLDEN_DIR, tmp_path / "permuted", config)
    dst = convert_checkpoint(permuted, tmp_path / "converted", config, progress=False).dst  # shapes agree
    model = grok_torch.load(dst, dtype="bf16")
    report = run_golden(GOLDEN_DIR, model=model)
    assert not report.passed
    mode, failure = report.first_failure
    assert failure.name.startswith("decoder_layer_2."), failure.name  # layer 2 holds file order's layer 10


def test_golden_needs_a_bf16_model_of_its_config(converted):
    model = grok_torch.load(converted["int8"], dtype="fp32")
    with pytest.raises(ValueError, match=r"differs in compute dtype: bf16 needed, the model computes in float32$"):
        run_golden(GOLDEN_DIR, model=model)
