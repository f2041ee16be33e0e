"""grok_torch.gemv, decode's C kernel: values against float64, every layout it accepts, the fallback without a
compiler, and where the model uses it (fast mode only: upstream mode never calls it)."""

import os
import subprocess
import sys

import pytest
import torch

from grok_torch import gemv, kernels

pytestmark = pytest.mark.skipif(not gemv.available(), reason=f"gemv kernel not built here: {gemv.why_unavailable()}")


def _int8_reference(x, weight, scales):
    """float64 x @ (int8 x scale)^T and sum |x w|, independent of grok_torch."""
    n, k = weight.shape
    g = scales.shape[-1]
    w = (weight.double().view(n, g, k // g) * scales.double().unsqueeze(-1)).view(n, k)
    return x.double() @ w.t(), x.double().abs() @ w.abs().t()


def _bound(got_dtype, want, magnitude, k):
    """One rounding of the result to `got_dtype` (2**-8 of it for bf16) plus fp32 sums of k terms."""
    rounding = 2**-8 if got_dtype == torch.bfloat16 else 0.0
    return rounding * want.abs() + k * 2**-23 * magnitude + 1e-30


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("groups,k", [(1, 1024), (8, 1024), (8, 5464), (4, 44), (1, 7)])
@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.bfloat16, None), (torch.float32, None),
                                               (torch.bfloat16, torch.float32)])
def test_int8_gemv_against_float64(rows, groups, k, x_dtype, out_dtype):
    gen = torch.Generator().manual_seed(rows * 1000 + groups * 10 + k)
    n = 37  # not a multiple of the kernel's tile of 8 output rows
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=gen).to(x_dtype)
    got = gemv.int8_gemv(x, weight, scales, out_dtype)
    assert got.dtype == (out_dtype or x_dtype) and got.shape == (rows, n)
    want, magnitude = _int8_reference(x, weight, scales)
    err = (got.double() - want).abs()
    bound = _bound(got.dtype, want, magnitude, k)
    assert (err <= bound).all(), f"max abs diff {err.max():.3g}, {(err > bound).sum()} of {err.numel()} beyond"


def test_int8_gemv_reads_strided_weight_rows_and_a_batch_shape():
    """A column slice of a wider matrix (row stride > in) and a [2, 1, in] batch, as the model passes them."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randint(-127, 128, (64, 300), dtype=torch.int8, generator=gen)
    weight = wide[:, 44:300]  # 256 columns, row stride 300
    scales = (torch.rand(64, 8, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
    x = torch.randn(2, 1, 256, generator=gen).to(torch.bfloat16)
    got = gemv.int8_gemv(x, weight, scales)
    want, magnitude = _int8_reference(x.view(2, 256), weight, scales)
    assert got.shape == (2, 1, 64)
    assert ((got.view(2, 64).double() - want).abs() <= _bound(torch.bfloat16, want, magnitude, 256)).all()


@pytest.mark.parametrize("rows", [1, 4, 8])
@pytest.mark.parametrize("k", [1024, 6144 + 3])
def test_bf16_gemv_against_float64(rows, k):
    gen = torch.Generator().manual_seed(rows + k)
    weight = torch.randn(21, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    got = gemv.bf16_gemv(x, weight)
    want = x.double() @ weight.double().t()
    magnitude = x.double().abs() @ weight.double().abs().t()
    assert ((got.double() - want).abs() <= _bound(torch.bfloat16, want, magnitude, k)).all()
    got32 = gemv.bf16_gemv(x.float(), weight)  # fp32 in, fp32 out: only the sums' rounding
    assert got32.dtype == torch.float32
    assert ((got32.double() - want).abs() <= _bound(torch.float32, want, magnitude, k)).all()


def test_bf16_output_is_round_to_nearest_even_of_the_fp32_sum():
    """A one-term dot is exact in fp32, so the kernel's bf16 output must be torch's bf16 rounding of it, bit
    for bit (ties included, and NaN and inf kept)."""
    values = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8) * 3, 65504.0, 3.0e38, float("inf"),
                           float("nan"), 2**-130], dtype=torch.float32)
    weight = torch.ones(1, 1, dtype=torch.bfloat16)
    for v in values:
        out = gemv.bf16_gemv(v.view(1, 1), weight, torch.bfloat16)
        assert out.dtype == torch.bfloat16
        if v.isnan():
            assert out.isnan().all()
        else:
            assert out.view(torch.int16).item() == v.to(torch.bfloat16).view(torch.int16).item(), v


def _tiny_int8_model(numerics: str):
    """A 2-layer model at a tiny width with random int8 weights (grouped scales on o_proj and down_proj)."""
    from grok_torch.config import GrokConfig
    from grok_torch.loading import from_state_dict
    from grok_torch.model import Grok

    config = GrokConfig.from_name("grok-1", emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2, num_layers=2,
                                  num_experts=4, num_selected_experts=2, vocab_size=512, sequence_len=16)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, t in Grok(config, weights="int8", device="meta").state_dict().items():
        if t.dtype == torch.int8:
            state[name] = torch.randint(-127, 128, t.shape, dtype=torch.int8, generator=gen)
        elif name.endswith(".scales"):
            state[name] = (torch.rand(t.shape, generator=gen) * 1e-3 + 1e-3).to(torch.bfloat16)
        else:
            state[name] = torch.randn(t.shape, generator=gen) * 0.1 + (1.0 if "norm" in name else 0.0)
    return from_state_dict(state, config, weights="int8", dtype="bf16", numerics=numerics)


def test_fast_mode_decode_uses_the_kernel_and_upstream_mode_never_does(monkeypatch):
    calls = []
    real_int8, real_bf16 = gemv.int8_gemv, gemv.bf16_gemv
    monkeypatch.setattr(gemv, "int8_gemv", lambda *a, **k: calls.append("int8") or real_int8(*a, **k))
    monkeypatch.setattr(gemv, "bf16_gemv", lambda *a, **k: calls.append("bf16") or real_bf16(*a, **k))
    tokens = torch.tensor([[5, 9, 17]])
    for numerics, expect in (("upstream", False), ("fast", True)):
        calls.clear()
        model = _tiny_int8_model(numerics)
        with torch.inference_mode():
            cache = model.new_cache(1, 8)
            model(tokens, cache)  # 3 rows: not a GEMV
            model(tokens[:, :1], cache)  # decode: one row
        assert bool(calls) == expect, (numerics, calls)
        if expect:
            assert "int8" in calls and "bf16" in calls  # the linears and the tied head


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_without_a_compiler_the_model_runs_on_torchs_kernels(tmp_path):
    code = ("import torch; from grok_torch import gemv, kernels\n"
            "assert not gemv.available(), 'built without a compiler?'\n"
            "print(gemv.why_unavailable())\n"
            "w = torch.randint(-127, 128, (16, 32), dtype=torch.int8)\n"
            "s = torch.full((16, 4), 0.01).to(torch.bfloat16)\n"
            "x = torch.randn(1, 32).to(torch.bfloat16)\n"
            "print(kernels.int8_linear(x, w, s).shape)\n")
    done = _run(code, CC="no-such-cc", GROK_TORCH_CACHE=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "no C compiler ('no-such-cc' not found; set CC)" in done.stdout
    assert "torch.Size([1, 16])" in done.stdout
    assert not any(tmp_path.rglob("*.so"))
    off = _run("from grok_torch import gemv; print(gemv.available(), gemv.why_unavailable())",
               GROK_TORCH_GEMV="0", GROK_TORCH_CACHE=str(tmp_path))
    assert off.stdout.strip() == "False disabled by GROK_TORCH_GEMV=0", off.stderr


def test_a_broken_compiler_is_reported_and_nothing_half_written_is_kept(tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: out of luck' >&2\nexit 1\n")
    fake.chmod(0o755)
    done = _run("from grok_torch import gemv; print(gemv.available()); print(gemv.why_unavailable())",
                CC=str(fake), GROK_TORCH_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False\nthe C kernel did not build (-O3 -march=native -fopenmp: cc: error: out of luck")
    assert not any((tmp_path / "cache").rglob("*.so"))


def test_the_library_is_built_once_into_the_cache(tmp_path):
    code = "from grok_torch import gemv; assert gemv.available(), gemv.why_unavailable()"
    assert _run(code, GROK_TORCH_CACHE=str(tmp_path)).returncode == 0
    built = list(tmp_path.rglob("gemv-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert _run(code, GROK_TORCH_CACHE=str(tmp_path)).returncode == 0
    assert built[0].stat().st_mtime_ns == mtime and list(tmp_path.rglob("*.so")) == built


def test_fast_decode_through_the_cache_stays_inside_the_fast_tiers_on_the_golden_run(golden_dir, monkeypatch):
    """Decoding the golden prompts one position at a time (every linear a GEMV: 4 rows, then 1) lands inside
    fast mode's end-to-end tiers against the upstream reference, like fast mode's full forward."""
    import numpy as np

    from grok_torch.loading import from_state_dict
    from parity.compare import distribution_agreement
    from parity.harness import load_golden
    from parity.tolerances import FAST_DISTRIBUTION_TOLERANCES, FAST_TOLERANCES, FAST_VS_UPSTREAM_MIN_TOP1

    config, state, tokens, ref = load_golden(golden_dir)
    tokens = torch.as_tensor(tokens)
    calls = []
    real = gemv.int8_gemv
    monkeypatch.setattr(gemv, "int8_gemv", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    fast = from_state_dict(state, config, dtype="bf16", numerics="fast")
    upstream = from_state_dict(state, config, dtype="bf16", numerics="upstream")

    def stepped(rows):
        with torch.inference_mode():
            cache = fast.new_cache(rows.shape[0], rows.shape[1])
            return torch.cat([fast(rows[:, t:t + 1], cache) for t in range(rows.shape[1])], dim=1).float()

    batch = stepped(tokens)
    alone = torch.cat([stepped(tokens[b:b + 1]) for b in range(tokens.shape[0])])
    assert {s[0] for s in calls} >= {1, tokens.shape[0]}  # both the 1-row and the 4-row kernels ran
    real_tokens = (tokens > config.pad_token).numpy()
    want = np.asarray(ref["logits"], dtype=np.float64)
    with torch.inference_mode():
        upstream_logits = upstream(tokens).float().numpy()
    tier = FAST_TOLERANCES[("bf16", "end_to_end")]["logits"].max_rel_rms
    for name, got in (("batch of 4", batch), ("one row", alone)):
        got = got.numpy().astype(np.float64)
        diff = (got - want)[real_tokens]
        rel_rms = np.sqrt((diff ** 2).mean() / (want[real_tokens] ** 2).mean())
        assert rel_rms <= tier, f"{name}: logits rel RMS {rel_rms:.3g} > {tier}"
        agreement = distribution_agreement(got, want, real_tokens)
        assert FAST_DISTRIBUTION_TOLERANCES[("bf16", "end_to_end")].accepts(agreement), (name, agreement)
        assert distribution_agreement(got, upstream_logits, real_tokens).top1 >= FAST_VS_UPSTREAM_MIN_TOP1, name
