"""The parity harness: grok_torch agrees with the haiku reference on several configs, and every
known port bug injected into grok_torch makes parity fail at the right sub-module."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import grok_torch.linear
import grok_torch.model
from grok_torch.cli import main
from grok_torch.config import GrokConfig
from parity.harness import run_parity

SEQ = 256  # long enough that RoPE frequency bugs show

CONFIGS = {
    "tiny-fp32": (GrokConfig.from_name("tiny"), "fp32", {}),
    "tiny-bf16": (GrokConfig.from_name("tiny"), "bf16", {}),
    "one-layer-wide-heads": (GrokConfig.from_name("tiny-1l"), "fp32", {}),
    "twelve-layers-mqa": (GrokConfig.from_name("tiny-12l"), "bf16", {}),
    "plain-attention": (GrokConfig.from_name("tiny", num_q_heads=8, num_kv_heads=8, key_size=8), "fp32",
                        {"quantize_attention": False}),
    "plain-everything-bf16": (GrokConfig.from_name("tiny", emb_size=96), "bf16",
                              {"quantize_attention": False, "quantize_moe": False}),
    "four-experts-top1": (GrokConfig.from_name("tiny", num_experts=4, num_selected_experts=1), "fp32", {}),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_parity_passes(case):
    config, dtype, init = CONFIGS[case]
    report = run_parity(config, dtype=dtype, seq_len=SEQ, **init)
    assert report.passed, f"{case}: first failure {report.first_failure and report.first_failure[1].describe()}"
    forced = report.runs["teacher_forced"]
    if dtype == "fp32":
        worst = max(c.rel_rms for c in forced.comparisons if c.tier != "experts")
        assert worst <= 1e-5, f"fp32 teacher-forced relative RMS error {worst}"
    assert report.runs["end_to_end"].top1_agreement >= (1.0 if dtype == "fp32" else 0.98)


# ---- injected bugs ------------------------------------------------------------------------------

def erf_gelu(x):
    return torch.nn.functional.gelu(x)


def renormalized_top_k(probs, k):
    gates, experts = torch.topk(probs, k, dim=-1)
    return gates / gates.sum(-1, keepdim=True), experts


def no_soft_cap(logits, cap):
    return logits


def interleaved_rope(x, offset, base):
    head_dim, seq = x.shape[-1], x.shape[1]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    phase = torch.outer(torch.arange(seq, dtype=torch.float32) + offset, inv_freq)[None, :, None, :]
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    rotated = torch.stack((even * phase.cos() - odd * phase.sin(), even * phase.sin() + odd * phase.cos()), -1)
    return rotated.flatten(-2).to(x.dtype)


def groups_interleaved_dequantize(weight, scales, round_to_bf16=True):
    """Scale group g applied to every G-th input column instead of a contiguous block."""
    *lead, out_features, in_features = weight.shape
    groups = scales.shape[-1]
    w = weight.float().reshape(*lead, out_features, in_features // groups, groups) * scales.float().unsqueeze(-2)
    w = w.reshape(*lead, out_features, in_features)
    return w.to(torch.bfloat16) if round_to_bf16 else w


def exact_multiplier(value, like):
    return torch.tensor(value, dtype=torch.float32)


BUGS = {
    # bug: (module, attribute, replacement, dtype, tensors that may be named first)
    "exact-erf gelu": (grok_torch.model, "expert_activation", erf_gelu, "fp32", {"moe_out"}),
    "renormalized top-2 gates": (grok_torch.model, "select_experts", renormalized_top_k, "fp32",
                                 {"expert_gate", "moe_out"}),
    "missing attention soft-cap": (grok_torch.model, "soft_cap", no_soft_cap, "fp32", {"attn_context"}),
    "interleaved RoPE": (grok_torch.model, "apply_rope", interleaved_rope, "fp32", {"attn_context"}),
    "wrong scale grouping": (grok_torch.linear, "dequantize", groups_interleaved_dequantize, "fp32", {"attn_out"}),
    "unrounded multipliers in bf16": (grok_torch.model, "activation_dtype_multiplier", exact_multiplier, "bf16",
                                      {"input_embeddings"}),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_injected_bug_is_caught_and_located(bug, monkeypatch):
    module, attribute, replacement, dtype, expected = BUGS[bug]
    monkeypatch.setattr(module, attribute, replacement)
    report = run_parity(GrokConfig.from_name("tiny"), dtype=dtype, seq_len=SEQ)
    assert not report.passed, f"{bug} went unnoticed"
    mode, failure = report.first_failure
    assert mode == "teacher_forced"
    assert failure.name.rsplit(".", 1)[-1] in expected, f"{bug}: first failure named {failure.name}"


# ---- the command line -------------------------------------------------------------------------

def test_parity_cli_writes_report_json_and_plot(tmp_path):
    result = CliRunner().invoke(main, ["parity", "--config", "tiny-1l", "--dtype", "fp32", "--seq-len", "64",
                                       "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    assert "PARITY PASSED" in result.output and "teacher_forced: PASS" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["runs"]["teacher_forced"]["tensors"][0]["name"] == "input_embeddings"
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parity_cli_golden(golden_dir):
    result = CliRunner().invoke(main, ["parity", "--golden", str(golden_dir)])
    assert result.exit_code == 0, result.output
    assert "vs golden golden-12l (bf16)" in result.output


def test_parity_cli_fails_with_exit_code_on_divergence(monkeypatch):
    monkeypatch.setattr(grok_torch.model, "soft_cap", no_soft_cap)
    result = CliRunner().invoke(main, ["parity", "--config", "tiny-1l", "--seq-len", "64"])
    assert result.exit_code == 1
    assert "first divergence (teacher_forced): decoder_layer_0.attn_context" in result.output


def test_parity_cli_unknown_config_is_one_clear_line():
    result = CliRunner().invoke(main, ["parity", "--config", "no-such-preset"])
    assert result.exit_code == 1 and "neither a preset" in result.output
    assert "Traceback" not in result.output


def test_parity_cli_refuses_options_that_do_not_apply(golden_dir):
    result = CliRunner().invoke(main, ["parity", "--golden", str(golden_dir), "--dtype", "fp32", "--config", "tiny",
                                       "--seed", "3"])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: --config, --dtype, --seed do not apply with --golden: the golden run "
                                     "fixes its config, weights, tokens and bf16 compute")
    result = CliRunner().invoke(main, ["parity", "--weights", "bf16", "--plain-moe"])
    assert result.exit_code == 1 and "apply only to --weights int8" in result.output


def test_parity_weights_option_stores_the_random_linears_as_asked():
    seen = []
    hook = lambda model: seen.append((model.layers[0].attn.q_proj.weight.dtype, model.layers[0].moe.down_proj.quantized))
    report = run_parity(GrokConfig.from_name("tiny-1l"), dtype="bf16", weights="bf16", seq_len=32, model_hook=hook)
    assert report.passed and report.details["weights"] == "bf16"
    assert seen == [(torch.bfloat16, False)]


def test_parity_on_a_users_converted_checkpoint(tmp_path, golden_dir):
    from convert.converter import convert_checkpoint
    from grok_torch.config import GrokConfig as Config

    config = Config.from_json(golden_dir / "config.json")
    converted = convert_checkpoint(golden_dir, tmp_path / "int8", config, progress=False).dst
    for extra in ([], ["--raw", str(golden_dir)]):
        result = CliRunner().invoke(main, ["parity", "--checkpoint", str(converted), "--dtype", "bf16",
                                           "--seq-len", "16", "--json", str(tmp_path / "r.json"), *extra])
        assert result.exit_code == 0, result.output
        assert "PARITY PASSED" in result.output and ("on " + str(golden_dir if extra else converted)) in result.output
        details = json.loads((tmp_path / "r.json").read_text())["details"]
        assert details["checkpoint"] == str(converted) and details["weights"] == "int8"
    # the reference on other weights than the conversion's: it must fail
    other = tmp_path / "other"
    shutil.copytree(golden_dir / "ckpt-0", other / "ckpt-0")
    shutil.copyfile(golden_dir / "ckpt-0" / "tensor00014_000", other / "ckpt-0" / "tensor00002_000")  # layer 1's
    result = CliRunner().invoke(main, ["parity", "--checkpoint", str(converted), "--raw", str(other), "--dtype",
                                       "bf16", "--seq-len", "16"])
    assert result.exit_code == 1 and "first divergence (teacher_forced): decoder_layer_0." in result.output
    result = CliRunner().invoke(main, ["parity", "--checkpoint", str(converted), "--config", "tiny"])
    assert result.exit_code == 1 and "--config does not apply with --checkpoint" in result.output
    assert "--raw applies only with --checkpoint" in CliRunner().invoke(main, ["parity", "--raw", str(golden_dir)]).output


def test_plot_has_tolerance_lines_integer_ticks_shared_axes_and_outside_legends():
    from parity.report import PLOT_PANELS, report_figure

    report = run_parity(GrokConfig.from_name("tiny"), dtype="bf16", seq_len=32)
    fig = report_figure(report)
    axes = fig.axes
    assert len(axes) == 2 * (len(PLOT_PANELS) + 1)  # two modes x (blocks, router, head)
    assert len({ax.get_ylim() for ax in axes}) == 1  # shared y
    titles = [ax.get_title() for ax in axes]
    assert "teacher forced: router (fp32)" in titles and "head: pass" in titles
    fig.canvas.draw()
    for ax in axes[:len(PLOT_PANELS)]:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert any(line.get_label().endswith("tolerance") for line in ax.get_lines())
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1 - 1  # beside the axes, not over the data
