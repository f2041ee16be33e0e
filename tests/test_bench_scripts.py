"""scripts/make_synthetic_checkpoint and scripts/bench at a tiny size (the full-width runs are benchmarks,
not tests: see the README's Performance section)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convert.upstream.param_names import checkpoint_layout
from convert.upstream.raw_checkpoint import read_raw_checkpoint, validate_raw_checkpoint
from convert.upstream.quantized import QuantizedWeight8bit
from grok_torch.config import GrokConfig

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
GROK_TORCH = [sys.executable, "-c", "import sys; from grok_torch.cli import main; sys.argv[0] = 'grok-torch'; main()"]
TINY_FORWARD = ["--fwd-dim", "64", "--fwd-key-size", "16", "--fwd-heads", "4", "--fwd-kv-heads", "2",
                "--fwd-layers", "2", "--fwd-experts", "4", "--fwd-vocab", "512", "--fwd-tokens", "32",
                "--fwd-repeat", "2"]


def run(*args, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check and done.returncode:
        raise AssertionError(f"{args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def load_bench_module():
    loader = importlib.machinery.SourceFileLoader("bench_script", str(SCRIPTS / "bench"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("bench_script", loader))
    sys.modules["bench_script"] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


def test_scripts_have_help():
    for script in ("make_synthetic_checkpoint", "bench"):
        done = run(sys.executable, SCRIPTS / script, "--help")
        assert "usage:" in done.stdout.lower() and "--layers" in done.stdout
    assert "--forward" in run(sys.executable, SCRIPTS / "bench", "--help").stdout


def _tiny_int8_weight_bytes_per_token(c: GrokConfig) -> int:
    """What one token reads of an int8 model of `c` (counted here by hand): per layer q/k/v (int8 + one bf16 scale
    per output), o (8 scale groups), 4 fp32 norms, the fp32 router, k experts of gate/up (one scale per output)
    and down (8 groups); the final norm and the bf16 tied head."""
    d, f, hd, k = c.emb_size, c.ffn_size, c.key_size, c.num_selected_experts
    q, kv = c.num_q_heads * hd, c.num_kv_heads * hd
    attention = (d * q + 2 * q) + 2 * (d * kv + 2 * kv) + (q * d + 2 * d * 8)
    expert = 2 * (d * f + 2 * f) + (f * d + 2 * d * 8)
    layer = attention + 4 * 4 * d + 4 * d * c.num_experts + k * expert
    return c.num_layers * layer + 4 * d + 2 * c.vocab_size * d


def test_bench_forward_quick(tmp_path):
    """--forward --quick: every field, for every weight format and numerics mode, each ratio in (0, 1.5]."""
    report = tmp_path / "forward.json"
    done = run(sys.executable, SCRIPTS / "bench", "--forward", "--quick", "--threads", "1", "--json", report)
    assert "| numerics | weights | prefill tok/s |" in done.stdout and "| target |" in done.stdout
    forward = json.loads(report.read_text())["forward"]
    assert forward["threads"] == 1 and forward["numerics_modes"] == ["upstream", "fast"]
    assert forward["bandwidth"]["bytes_per_s"] > 0
    tiny = forward["sizes"]["tiny"]
    assert tiny["gemm_peak"]["flops_per_s"] > 0 and tiny["config"]["emb_size"] == 64
    runs = {(r["weights"], r["numerics"]): r for r in tiny["runs"]}
    assert set(runs) == {(w, m) for w in ("int8", "bf16", "bf16-plain") for m in ("upstream", "fast")}
    for r in runs.values():
        for field in ("prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b8_tokens_per_s",
                      "roofline_b1_tokens_per_s", "roofline_b8_tokens_per_s"):
            assert r[field] > 0, field
        for ratio in ("prefill_vs_gemm_peak", "decode_b1_vs_roofline", "decode_b8_vs_roofline"):
            assert 0 < r[ratio] <= 1.5, (ratio, r[ratio])
        assert r["bytes_per_step_b1"]["experts_read"] == 2 and 2 < r["bytes_per_step_b8"]["experts_read"] <= 4
    config = GrokConfig.from_name("grok-1", **{k: tiny["config"][k] for k in (
        "emb_size", "key_size", "num_q_heads", "num_kv_heads", "num_layers", "num_experts", "vocab_size")})
    read = {w: runs[w, "upstream"]["bytes_per_step_b1"]["weights"] for w in ("int8", "bf16", "bf16-plain")}
    assert read["int8"] == _tiny_int8_weight_bytes_per_token(config)
    assert read["int8"] < read["bf16"] < read["bf16-plain"]  # bf16 keeps the down projections int8
    long = forward["long_prefill"]
    assert long["tokens"] == 32 and long["weight_bytes"] > 0 and 0 <= long["activation_bytes"] < 1 << 30
    assert {t["target"] for t in forward["targets"]} >= {"decode b1 >= 60 % of roofline",
                                                        "prefill >= 50 % of GEMM peak", "int8 >= 1.6x bf16 decode (b1)",
                                                        "32-token prefill activation <= 2 GB"}
    assert all(isinstance(t["met"], bool) for t in forward["targets"])


def test_synthetic_checkpoint_is_valid_converts_and_verifies(tmp_path):
    src = tmp_path / "src"
    done = run(sys.executable, SCRIPTS / "make_synthetic_checkpoint", src, "--config", "tiny", "--layers", "3",
               "--quiet")
    summary = json.loads(done.stdout)
    config = GrokConfig.from_name("tiny", num_layers=3)
    layout = checkpoint_layout(config)
    assert summary["files"] == len(layout) == 2 + 12 * 3
    assert GrokConfig.from_json(src / "config.json") == config
    # every file matches the config's kind, dtype and shape (QuantizedWeight8bit for linears)
    pairs = validate_raw_checkpoint(src, config)
    assert [info.quantized for _, info in pairs] == [e.quantizable for e in layout]
    assert summary["payload_bytes"] == sum(info.nbytes for _, info in pairs)
    tree = read_raw_checkpoint(src, config)
    for entry in layout:
        value = tree[entry.haiku_module][entry.haiku_param]
        if entry.quantizable:
            assert isinstance(value, QuantizedWeight8bit)
            assert value.weight.min() >= -127 and value.weight.max() <= 127
            assert len(np.unique(value.weight)) > 200  # random, not constant
            scales = value.scales.astype(np.float32)
            assert np.all(scales > 0) and np.all(np.isfinite(scales))
        else:
            assert value.dtype == np.float32 and np.all(np.isfinite(value)) and value.std() > 0
    # the pickles are what upstream's loader reads: plain pickle with its class under __main__
    main = sys.modules["__main__"]
    had = hasattr(main, "QuantizedWeight8bit")
    main.QuantizedWeight8bit = QuantizedWeight8bit
    try:
        import pickle

        first = next(e for e in layout if e.quantizable)
        with open(src / "ckpt-0" / f"tensor{first.index:05d}_000", "rb") as file:
            loaded = pickle.load(file)
        np.testing.assert_array_equal(loaded.weight, tree[first.haiku_module][first.haiku_param].weight)
    finally:
        if not had:
            del main.QuantizedWeight8bit
    # deterministic for a seed
    again = tmp_path / "again"
    run(sys.executable, SCRIPTS / "make_synthetic_checkpoint", again, "--config", "tiny", "--layers", "3", "--quiet")
    assert all((src / "ckpt-0" / p.name).read_bytes() == p.read_bytes() for p in (again / "ckpt-0").iterdir())
    # it converts (config.json picked up from SRC) and verifies bit for bit
    for dtype in ("int8", "bf16"):
        out = tmp_path / f"out-{dtype}"
        run(*GROK_TORCH, "convert", src, out, "--weights", dtype, "--no-progress")
        assert "ok:" in run(*GROK_TORCH, "verify", src, out).stdout
    # refuses to write into a non-empty directory
    refused = run(sys.executable, SCRIPTS / "make_synthetic_checkpoint", src, "--config", "tiny", check=False)
    assert refused.returncode == 1 and refused.stderr.strip() == f"error: {src} exists and is not empty (use --overwrite)"


def test_synthetic_checkpoint_keeps_the_config_files_layers(tmp_path):
    """--layers overrides the config only when given: a JSON config's num_layers stands."""
    values = GrokConfig.from_name("tiny", num_layers=5).to_dict()
    (tmp_path / "five.json").write_text(json.dumps(values))
    done = run(sys.executable, SCRIPTS / "make_synthetic_checkpoint", tmp_path / "a", "--config", tmp_path / "five.json",
               "--no-progress")
    assert json.loads(done.stdout)["files"] == 2 + 12 * 5
    assert GrokConfig.from_json(tmp_path / "a" / "config.json").num_layers == 5
    done = run(sys.executable, SCRIPTS / "make_synthetic_checkpoint", tmp_path / "b", "--config", tmp_path / "five.json",
               "--layers", "2", "--progress")
    assert json.loads(done.stdout)["files"] == 2 + 12 * 2 and "synthetic checkpoint: 100%" in done.stderr
    quiet = run(sys.executable, SCRIPTS / "make_synthetic_checkpoint", tmp_path / "c", "--config", "tiny", "--quiet")
    assert quiet.stderr == ""


def test_bench_tiny_end_to_end(tmp_path):
    workdir = tmp_path / "work"
    report = tmp_path / "bench.json"
    done = run(sys.executable, SCRIPTS / "bench", "--workdir", workdir, "--config", "tiny", "--layers", "1",
               "--json", report, *TINY_FORWARD)
    assert not workdir.exists()  # cleaned up
    results = json.loads(report.read_text())
    assert "| convert int8 -> int8 |" in done.stdout and "tokens/s" in done.stdout

    machine = results["machine"]
    assert machine["cpus"] >= 1 and machine["memory_gib"] > 0 and machine["torch_threads"] >= 1

    checkpoint = results["checkpoint"]
    tiny = GrokConfig.from_name("tiny", num_layers=1)
    assert checkpoint["files"] == 14
    largest = max(math.prod(e.haiku_shape) * (1 if e.quantizable else 4) for e in checkpoint_layout(tiny))
    assert checkpoint["largest_tensor_bytes"] == largest > 0

    rows = {r["name"]: r for r in results["conversion"]}
    assert set(rows) == {"cp -r", "convert int8 -> int8", "convert int8 -> bf16"}
    for row in rows.values():
        assert row["cache"] == "cold"
        assert row["total_seconds"] >= row["seconds"] > 0 and row["input_gb_per_s"] > 0
        assert row["input_bytes"] == rows["cp -r"]["input_bytes"] > 0
        # peak RSS from the OS, of that child alone: cp is small, a converter is a Python process
        assert 0 < row["peak_rss_bytes"] < 8 << 30
        if row["name"] != "cp -r":
            assert row["vs_cp"] > 0 and row["peak_rss_bytes"] > rows["cp -r"]["peak_rss_bytes"]
    assert rows["cp -r"]["output_bytes"] == rows["cp -r"]["input_bytes"]
    assert rows["cp -r"]["peak_rss_bytes"] < 100 << 20  # not this Python's size: the launcher is small
    # bf16 output: about twice the int8 weights (scales dropped), more than int8's
    assert rows["convert int8 -> bf16"]["output_bytes"] > rows["convert int8 -> int8"]["output_bytes"]

    loads = {r["directory"]: r for r in results["load"]}
    assert set(loads) == {"int8 -> int8", "int8 -> bf16"}
    for row in loads.values():
        assert row["bytes"] > 0 and row["read_s"] > 0 and row["load_s"] > 0 and row["touch_s"] >= 0
        assert math.isclose(row["load_and_touch_s"], row["load_s"] + row["touch_s"])

    forward = results["forward"]
    assert forward["tokens"] == 32 and forward["config"]["num_experts"] == 4
    runs = {(r["impl"], r["weights"]): r for r in forward["runs"]}
    assert len(runs) == 6
    for (impl, _), r in runs.items():
        assert r["tokens_per_s"] > 0 and len(r["times"]) == 2
        if impl.startswith("all-experts") or impl.startswith("JAX"):
            assert r["argmax_agreement_vs_sparse"] >= 0.9
    assert set(forward["ratios"]) >= {"sparse_vs_dense_int8", "sparse_vs_dense_bf16", "sparse_vs_haiku_int8",
                                      "sparse_vs_haiku_bf16", "sparse_int8_vs_bf16"}
    assert set(results["targets"]) == {"int8 conversion vs cp", "conversion peak RSS / largest tensor"}


def test_dense_dispatch_matches_sparse_and_a_wrong_one_is_caught():
    import types

    import torch

    from convert.upstream.tree import haiku_tree_to_state_dict
    from grok_torch.loading import from_state_dict
    from parity.init import init_params

    bench = load_bench_module()
    config = GrokConfig.from_name("tiny")
    model = from_state_dict(haiku_tree_to_state_dict(init_params(config, seed=2), config), config, dtype="bf16",
                            numerics="upstream")
    tokens = torch.randint(1, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        sparse = [layer.moe(x) for layer, x in zip(model.layers, _moe_inputs(model, tokens))]
        for layer in model.layers:
            layer.moe.forward = types.MethodType(bench.dense_moe_forward, layer.moe)
        dense = [layer.moe(x) for layer, x in zip(model.layers, _moe_inputs(model, tokens))]
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-2)

    def renormalised(self, x, record=None, prefix=""):  # a common port bug: gates renormalised
        out = bench.dense_moe_forward(self, x)
        return out * 2
    with torch.inference_mode():
        layer = model.layers[0]
        layer.moe.forward = types.MethodType(renormalised, layer.moe)
        wrong = layer.moe(_moe_inputs(model, tokens)[0])
    assert not torch.allclose(wrong.float(), sparse[0].float(), rtol=1e-2, atol=1e-2)


def _moe_inputs(model, tokens):
    """Deterministic MoE inputs of the model's width, one per layer (the MoE is tested on its own)."""
    import torch

    generator = torch.Generator().manual_seed(5)
    return [torch.randn(*tokens.shape, model.config.emb_size, generator=generator).to(model.dtype)
            for _ in model.layers]


def test_page_cache_helpers(tmp_path):
    bench = load_bench_module()
    path = tmp_path / "data"
    path.write_bytes(np.random.default_rng(0).bytes(1 << 20))
    bench.warm_cache([path])
    resident = bench.resident_fraction([path])
    if resident is None:
        pytest.skip("mincore not available here")
    assert resident == pytest.approx(1.0)
    bench.drop_cache([path])  # only a hint to the kernel, but it must not fail
    assert 0.0 <= bench.resident_fraction([path]) <= 1.0


def test_gemv_bench_prints_each_way_side_by_side():
    from grok_torch import gemv

    if not gemv.available():
        pytest.skip(f"gemv kernel not built here: {gemv.why_unavailable()}")
    out = run(sys.executable, SCRIPTS / "gemv-bench", "--quick", "--threads", "1").stdout
    assert out.startswith("copy bandwidth ") and "1 threads, 1 row(s)" in out.splitlines()[0]
    rows = [line for line in out.splitlines() if line.startswith("| gate/up") or line.startswith("| down")]
    assert [r.split(" | ")[1] for r in rows] == ["_weight_int8pack_mm", "blocked dequantization"]
    for row in rows:
        rates = [float(cell) for cell in row.strip("| ").split(" | ")[2:]]
        assert len(rates) == 4 and all(r > 0 for r in rates), row
