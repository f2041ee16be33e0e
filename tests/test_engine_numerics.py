"""The serving engines' numerics as presets of grok_torch (vllm, vllm-legacy, sglang), and the report on them.

Each decision is checked against an independent computation (math.erf, numpy with ml_dtypes rounding one
fp32 value at a time); "upstream" must still give the golden reference's bits wherever it did; an engine
preset must move the forward; an export read back into grok_torch in that engine's numerics must give
grok_torch's own logits in that mode bit for bit (same process, same numerics mode); and the report
(`parity --engine`, scripts/engine-deviation) names tensors and numbers.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import json
import math
import re

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import grok_torch
from grok_torch.cli import main
from grok_torch.config import GrokConfig
from grok_torch.model import (apply_multiplier, apply_rope, apply_rope_in_activation_dtype, choose_experts,
                              engine_router_logits, erf_gelu, expert_activation, gated_product, output_head,
                              scale_normed, select_experts)
from grok_torch.numerics import ENGINE_PRESETS, PRESETS, UPSTREAM, decisions
from support.checkpoints import random_conversion
from support.paths import ASSETS, GOLDEN_DIR

BF16 = ml_dtypes.bfloat16


def _bf16(a: np.ndarray) -> np.ndarray:
    """One rounding of float32 values to bf16 (round to nearest even), back as float32."""
    return np.asarray(a, dtype=np.float32).astype(BF16).astype(np.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).numpy()


# ---- each decision against an independent computation ---------------------------------------------------------

def test_erf_gelu_is_the_exact_form_and_tanh_stays_upstreams():
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    erf = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()]
    tanh = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))) for v in x.tolist()]
    assert np.allclose(erf_gelu(x).numpy(), erf, rtol=0, atol=1e-12)
    assert np.allclose(expert_activation(x).numpy(), tanh, rtol=0, atol=1e-12)
    assert np.max(np.abs(np.subtract(erf, tanh))) > 1e-4  # the two forms are not the same function
    x, up = x[None], torch.ones_like(x[None])
    erf_only = dataclasses.replace(UPSTREAM, expert_gelu=PRESETS["vllm"].expert_gelu)
    assert torch.equal(gated_product(up, x, torch.float64, erf_only), erf_gelu(x))
    assert torch.equal(gated_product(up, x, torch.float64, UPSTREAM), expert_activation(x))
    with pytest.raises(ValueError, match="numerics 'upstream': expert_gelu must be one of tanh, erf, got 'silu'"):
        dataclasses.replace(UPSTREAM, expert_gelu="silu")  # refused when made, before any forward
    for field, bad in (("bf16_matmul", "bf16"), ("int8_matmul", "fused"), ("output_multiplier", "none"),
                       ("expert_hidden_dtype", "fp16"), ("embedding_multiplier", "folded")):
        with pytest.raises(ValueError, match=f"{field} must be one of"):
            dataclasses.replace(UPSTREAM, **{field: bad})


def test_renormalised_gates_sum_to_one_and_keep_the_experts():
    probs = torch.softmax(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    raw, experts = select_experts(probs, 2)
    renormalised, same = choose_experts(probs, 2, PRESETS["vllm-legacy"])
    top2 = -np.sort(-probs.numpy(), axis=-1)[:, :2]
    assert torch.equal(experts, same)
    assert np.allclose(raw.numpy(), top2, rtol=0, atol=0)
    assert np.allclose(renormalised.numpy(), top2 / top2.sum(-1, keepdims=True), rtol=1e-6, atol=0)
    assert np.allclose(renormalised.sum(-1).numpy(), 1.0, atol=1e-6) and (raw.sum(-1) < 1).all()
    assert torch.equal(choose_experts(probs, 2, PRESETS["vllm"])[0], raw)  # the export switches it off


def test_router_softcap_bounds_and_router_dtypes():
    # Small integers and halves: every dot product is exact in fp32 and in float64, so bits can be compared.
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-8, 9, (32, 64), generator=gen).to(torch.bfloat16)
    weight = torch.randint(-8, 9, (8, 64), generator=gen).to(torch.float32) / 2
    dot = x.double().numpy() @ weight.double().numpy().T  # |dot| in the hundreds: the cap bends it
    assert np.abs(dot).max() > 100
    sglang = engine_router_logits(x, weight, PRESETS["sglang"])  # fp32 dot, fp32 cap
    assert sglang.dtype == torch.float32 and (sglang.abs() < 30).all()
    assert np.allclose(sglang.numpy(), [[30 * math.tanh(v / 30) for v in row] for row in dot], rtol=2e-7, atol=0)
    vllm = engine_router_logits(x, weight, PRESETS["vllm"])  # bf16 gate, no cap (router_logit_softcapping 0)
    assert vllm.dtype == torch.bfloat16 and np.array_equal(_np(vllm), _bf16(dot))
    legacy = engine_router_logits(x, weight, PRESETS["vllm-legacy"])  # bf16 gate, 30 * tanh(x / 30) in bf16
    assert legacy.dtype == torch.bfloat16 and (legacy.abs() <= 30).all()
    assert np.allclose(_np(legacy), 30 * np.tanh(_bf16(dot) / 30), rtol=2 ** -7, atol=0)  # three bf16 roundings


def test_multipliers_rounded_exact_and_folded():
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    value = 78.38367176906169
    rounded = apply_multiplier(x, value, "rounded")
    exact = apply_multiplier(x, value, "exact")
    assert np.array_equal(_np(rounded), _bf16(_np(x).astype(np.float64) * 78.5))  # bf16(78.38...) = 78.5
    assert np.array_equal(_np(exact), _bf16(_np(x) * np.float32(value)))
    assert not torch.equal(rounded, exact)
    config = GrokConfig.from_name("tiny")
    h = torch.randn(2, 3, config.emb_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    table = torch.randn(config.vocab_size, config.emb_size, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    folded = output_head(h, table, config, PRESETS["sglang"])
    weight = _bf16(_np(table) * np.float32(config.output_multiplier_scale))  # lm_head * scale, stored bf16
    want = _bf16((torch.from_numpy(_np(h)) @ torch.from_numpy(weight).T).numpy())  # one fp32 GEMM, one rounding
    assert np.array_equal(_np(folded), want)


def test_rmsnorm_scale_orders():
    gen = torch.Generator().manual_seed(5)
    normed = torch.randn(16, 64, generator=gen)
    scale = torch.rand(64, generator=gen) + 0.5
    n, s = normed.numpy(), scale.numpy()
    upstream = scale_normed(normed, scale, torch.bfloat16, UPSTREAM)
    vllm = scale_normed(normed, scale, torch.bfloat16, PRESETS["vllm"])
    sglang = scale_normed(normed, scale, torch.bfloat16, PRESETS["sglang"])
    assert np.array_equal(_np(upstream), _bf16(s * n))  # fp32 scale, one rounding
    assert np.array_equal(_np(vllm), _bf16(_bf16(n) * _bf16(s)))  # (bf16)(x * r) * bf16 weight
    assert np.array_equal(_np(sglang), _bf16(n * _bf16(s)))  # fp32 product with the bf16 weight, one rounding
    assert not torch.equal(upstream, vllm) and not torch.equal(upstream, sglang) and not torch.equal(vllm, sglang)


def test_rope_in_the_activation_dtype_rounds_tables_and_products():
    x = torch.randn(1, 40, 2, 16, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    got = apply_rope_in_activation_dtype(x, 3, 10000)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    phase = torch.outer(torch.arange(40, dtype=torch.float32) + 3, inv_freq).repeat(1, 2)[None, :, None, :]
    cos, sin = _bf16(torch.cos(phase).numpy()), _bf16(torch.sin(phase).numpy())
    xs = _np(x)
    rotated = np.concatenate([-xs[..., 8:], xs[..., :8]], axis=-1)
    want = _bf16(_bf16(xs * cos) + _bf16(rotated * sin))
    assert np.array_equal(_np(got), want)
    assert not torch.equal(got, apply_rope(x, 3, 10000))


def test_presets_name_the_engines_decisions():
    assert decisions(UPSTREAM) == {} and set(ENGINE_PRESETS) == {"vllm", "vllm-legacy", "sglang"}
    vllm, legacy, sglang = (ENGINE_PRESETS[n] for n in ("vllm", "vllm-legacy", "sglang"))
    for mode in (vllm, legacy, sglang):
        assert mode.expert_gelu == "erf" and mode.round_gated_product and mode.round_down_proj
        assert mode.embedding_multiplier == "exact" and not mode.head_partial_sums
    # the export's config switches off V2's router cap and renormalisation; V1 hard-codes both
    assert (vllm.router_softcap, vllm.renormalize_gates) == (0.0, False)
    assert (legacy.router_softcap, legacy.renormalize_gates) == (30.0, True)
    assert decisions(legacy).keys() - decisions(vllm).keys() == {"router_softcap", "renormalize_gates"}
    assert (sglang.router_softcap, sglang.renormalize_gates, sglang.router_in_activation_dtype) == (30.0, False, False)
    assert (vllm.output_multiplier, sglang.output_multiplier) == ("exact", "folded")


# ---- the whole forward ----------------------------------------------------------------------------------------

# Tensors the upstream code recorded that grok_torch reproduces bit for bit, teacher-forced.
GOLDEN_BIT_EXACT = ("input_embeddings", "decoder_layer_0.attn_norm", "decoder_layer_0.q_proj",
                    "decoder_layer_0.attn_context", "decoder_layer_0.attn_out", "decoder_layer_0.attn_post_norm",
                    "decoder_layer_0.h_after_attn", "decoder_layer_0.moe_norm", "decoder_layer_0.expert_index")


@pytest.fixture(scope="module")
def golden():
    from parity.harness import load_golden

    config, state, tokens, ref = load_golden(GOLDEN_DIR)
    return grok_torch.from_state_dict(state, config, dtype="bf16", numerics="upstream"), tokens, ref


def test_upstream_keeps_the_golden_bits_and_every_engine_moves_the_forward(golden):
    from parity.harness import torch_end_to_end, torch_teacher_forced

    model, tokens, ref = golden
    ours = torch_teacher_forced(model, tokens, ref)
    for name in GOLDEN_BIT_EXACT:
        assert np.array_equal(ours[name], ref[name]), name
    upstream = torch_end_to_end(model, tokens)["logits"]
    for name in ENGINE_PRESETS:
        model.numerics = name
        engine = torch_end_to_end(model, tokens)
        assert not np.array_equal(engine["input_embeddings"], ref["input_embeddings"]), name  # exact multiplier
        assert not np.array_equal(engine["logits"], upstream), name
        assert np.mean(np.argmax(engine["logits"], -1) == np.argmax(upstream, -1)) > 0.9, name
    model.numerics = "upstream"
    assert np.array_equal(torch_end_to_end(model, tokens)["logits"], upstream)


# ---- an export read back, in the engine's numerics ---------------------------------------------------------------

SERVING = GrokConfig.from_name("tiny-serving")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from convert.serving.exporter import export_serving

    converted, _ = random_conversion(tmp_path_factory.mktemp("engine-src"), SERVING)
    root = tmp_path_factory.mktemp("engine-out")
    out = {key: export_serving(converted, root / "-".join(key), engine=key[0], weights=key[1], progress=False).dst
           for key in (("vllm", "bf16"), ("vllm", "int8"), ("sglang", "bf16"))}
    return converted, out


@pytest.mark.parametrize("engine,weights,numerics", [("vllm", "bf16", "vllm"), ("vllm", "int8", "vllm"),
                                                     ("vllm", "bf16", "vllm-legacy"), ("sglang", "bf16", "sglang")])
def test_an_export_read_back_reproduces_grok_torch_in_the_engines_numerics(exports, engine, weights, numerics):
    from convert.serving.readback import read_export

    converted, out = exports
    tokens = torch.randint(1, SERVING.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    ours = grok_torch.load(converted, dtype="bf16", numerics=numerics)
    back = read_export(out[engine, weights])
    served = grok_torch.from_state_dict(back.state, back.config, dtype="bf16", numerics=numerics)
    with torch.no_grad():
        want, got = ours(tokens), served(tokens)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        if weights == "bf16":  # without the engine's linear_1 rounding the bf16 export would not round-trip
            ours.numerics = served.numerics = "upstream"
            assert not torch.equal(served(tokens), ours(tokens))


# ---- the report ------------------------------------------------------------------------------------------------

def test_parity_engine_reports_tensors_and_numbers(tmp_path):
    path = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["parity", "--engine", "vllm", "--config", "tiny", "--seq-len", "16",
                                       "--json", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    for needle in ("teacher_forced:", "end_to_end:", "attn_out relRMS/exact", "router_logits", "moe_post_norm"):
        assert needle in out
    kl = re.search(r"end_to_end: KL\(upstream\|\|vllm\) ([0-9.e+-]+), argmax agreement ([0-9.]+), runner-up "
                   r"([0-9.]+), top-5 overlap ([0-9.]+), experts ([0-9.]+)", out)
    assert kl and 0 < float(kl[1]) < 1 and all(0 <= float(v) <= 1 for v in kl.groups()[1:])
    report = json.loads(path.read_text())
    tensors = {t["name"]: t for t in report["runs"]["end_to_end"]["tensors"]}
    assert {"input_embeddings", "decoder_layer_1.moe_out", "logits"} <= set(tensors)
    assert 0 < tensors["logits"]["rel_rms"] < 1 and tensors["logits"]["bit_exact"] < 1
    assert report["decisions"]["expert_gelu"] == "erf"


def test_parity_engine_refuses_what_does_not_apply():
    bad = CliRunner().invoke(main, ["parity", "--engine", "sglang", "--dtype", "fp32"])
    assert bad.exit_code == 1 and "--dtype does not apply with --engine" in bad.stderr
    bad = CliRunner().invoke(main, ["parity", "--breakdown"])
    assert bad.exit_code == 1 and "--breakdown applies only with --engine" in bad.stderr


def _script(name: str):
    path = ASSETS.parents[1] / "scripts" / name
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_engine_deviation_script_prints_the_table_and_each_decision(tmp_path):
    path = tmp_path / "deviation.json"
    result = CliRunner().invoke(_script("engine-deviation").main,
                                ["--config", "tiny", "--seq-len", "8", "--engine", "sglang", "--json", str(path)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| `sglang` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert 0 < float(cells[1]) < 1 and all(0 <= float(c) <= 1 for c in cells[2:6])
    assert "router_softcap=30.0: KL" in result.output and "output_multiplier=folded: KL" in result.output
    summary = json.loads(path.read_text())["engines"]["sglang"]
    assert set(summary["breakdown"]) == {f"{k}={v}" for k, v in decisions(PRESETS["sglang"]).items()}
    assert summary["end_to_end"]["mean_kl"] == pytest.approx(float(cells[1]), rel=1e-2)


def test_parity_engine_on_a_converted_directory(exports):
    converted, _ = exports
    result = CliRunner().invoke(main, ["parity", "--engine", "sglang", "--checkpoint", str(converted),
                                       "--seq-len", "8"])
    assert result.exit_code == 0, result.output
    assert f"on {converted} (its weights as stored)" in result.output
    assert re.search(r"end_to_end: KL\(upstream\|\|sglang\) [0-9.e+-]+, argmax agreement", result.output)
    bad = CliRunner().invoke(main, ["parity", "--engine", "sglang", "--checkpoint", str(converted), "--raw", "."])
    assert bad.exit_code == 1 and "--raw does not apply with --engine" in bad.stderr
