"""`scripts/bench --forward`: the forward pass against this machine's limits, measured in one run.

For each size (the mid-size config and a true-width slice: real D and F, fewer layers and experts), each
stored weight format (int8, bf16 with its int8 down projections, bf16-plain) and each numerics mode
("upstream" and "fast"; --numerics may name any preset of grok_torch.numerics), on random weights:

- prefill tokens/s (one prompt of --prefill-tokens) and its fraction of the GEMM peak: the time the same
  linear-layer matmuls take alone (`x @ w` at the shapes of that prefill: attention projections on every
  token, each expert on tokens * k / E of them, the tied head; each distinct shape timed, times its count;
  native bf16, or fp32 where that is faster: see gemm_peak), divided by the prefill's time;
- decode tokens/s at batch 1 and batch 8 (--decode-steps steps with the KV cache after the prompt; the
  batch-8 cache is the prompt's, repeated) and their fraction of the decode roofline: bandwidth / bytes
  read per step. The bytes counted per step: every layer's attention projections (with scales), norms and
  router, the experts the step's tokens read (k for one token; for B tokens the expected number of
  distinct experts under uniform routing, E * (1 - (1 - k/E)^B)), the final norm and the tied head
  (the embedding table, read whole), and the KV cache rows read (at the mean position of the decode);
- the memory bandwidth: bytes read + written per second by a large tensor copy (best of 5);
- peak memory of a long prefill (--long-tokens, 8192 by default) at the widest size, int8 weights, the
  fastest mode, in a child process: its peak resident memory during the forward (the peak is reset after
  the model is built) minus its resident memory before it (the weights and the interpreter), and the
  child's whole-life peak RSS minus the weights' bytes.

These are benchmarks, not tests: the unit test runs them at a tiny size (--quick).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9
SIZES = {
    # the mid-size config: D 1024, F 5464, 8 experts top-2, 4 layers, 8 q / 2 kv heads of 128
    "mid": dict(emb_size=1024, key_size=128, num_q_heads=8, num_kv_heads=2, num_layers=4, num_experts=8,
                num_selected_experts=2, vocab_size=8192),
    # the real width (D 6144, F 32768, 48 q / 8 kv heads of 128), 1 layer of 4 experts: int8 2.5 GB, bf16-plain 4.9 GB
    "true-width": dict(emb_size=6144, key_size=128, num_q_heads=48, num_kv_heads=8, num_layers=1, num_experts=4,
                       num_selected_experts=2, vocab_size=8192),
    # what the unit test runs
    "tiny": dict(emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2, num_layers=2, num_experts=4,
                 num_selected_experts=2, vocab_size=512),
}
FORMATS = ("int8", "bf16", "bf16-plain")
BATCHES = (1, 8)
TARGETS = {"decode_vs_roofline": 0.60, "int8_vs_bf16_decode": 1.6, "prefill_vs_gemm_peak": 0.50,
           "upstream_vs_fast": 1 / 3, "long_prefill_activation_bytes": 2e9}


def size_config(name: str, sequence_len: int):
    from grok_torch.config import GrokConfig

    return GrokConfig.from_name("grok-1", sequence_len=sequence_len, **SIZES[name])


def numerics_modes() -> list[str]:
    """The modes the targets are about: "upstream" and "fast" (the serving engines' presets only model
    other rounding and are not benchmarked by default; --numerics names them)."""
    from grok_torch.numerics import PRESETS

    return [m for m in ("upstream", "fast") if m in PRESETS]


def fastest_mode(modes: list[str]) -> str:
    return "fast" if "fast" in modes else modes[0]


# ---- random weights --------------------------------------------------------------------------------------

def random_state(config, seed: int = 0) -> dict:
    """A state dict of `config`'s model with int8 + bf16 scales linears, made in torch at its final dtype (no
    wider temporaries): int8 uniform in [-127, 127], scales giving each output about unit variance."""
    import torch

    from grok_torch.model import Grok

    generator = torch.Generator().manual_seed(seed)
    meta = Grok(config, weights="int8", device="meta").state_dict()
    state = {}
    for name, t in meta.items():
        if t.dtype == torch.int8:
            state[name] = torch.randint(-127, 128, t.shape, dtype=torch.int8, generator=generator)
        elif name.endswith(".scales"):
            fan_in = meta[name[: -len("scales")] + "weight"].shape[-1]
            scale = 1.0 / (73.3 * math.sqrt(fan_in))  # int8 uniform on [-127, 127] has std 73.3
            state[name] = (torch.rand(t.shape, generator=generator) + 0.5).mul_(scale).to(torch.bfloat16)
        elif name.endswith("norm.weight"):  # RMSNorm scales
            state[name] = torch.ones(t.shape, dtype=torch.float32)
        else:  # embedding, router
            state[name] = torch.randn(t.shape, generator=generator, dtype=torch.float32).mul_(
                1.0 if name == "embedding.weight" else 1 / math.sqrt(t.shape[-1]))
    return state


def build_model(config, weights: str, mode: str, device: str = "cpu"):
    from grok_torch.loading import from_state_dict

    state = random_state(config)
    model = from_state_dict(state, config, weights=weights, dtype="bf16", numerics=mode, device=device)
    del state
    gc.collect()
    return model


def prompt(config, batch: int, tokens: int, seed: int = 1):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(config.pad_token + 1, config.vocab_size, (batch, tokens), generator=generator)


# ---- what is read, what is computed ----------------------------------------------------------------------

def _nbytes(module) -> int:
    return sum(t.nbytes for t in module.state_dict().values())


def distinct_experts(config, batch: int) -> float:
    """Expected distinct experts read by `batch` tokens of k picks each, under uniform routing."""
    e, k = config.num_experts, config.num_selected_experts
    return e * (1 - (1 - k / e) ** batch) if batch > 1 else float(k)


def decode_bytes_per_step(model, batch: int, position: float) -> dict:
    """Bytes one decode step of `batch` rows reads: weights (attention, norms, router, the experts its tokens
    read, final norm, the tied head) and the KV cache up to `position`."""
    config = model.config
    experts_read = distinct_experts(config, batch)
    weights = _nbytes(model.norm) + model.embedding.weight.nbytes
    for layer in model.layers:
        moe = layer.moe
        experts = sum(_nbytes(linear) for linear in (moe.gate_proj, moe.up_proj, moe.down_proj))
        weights += _nbytes(layer) - experts + experts * experts_read / config.num_experts
    itemsize = model.embedding.weight.element_size()
    cache = 2 * config.num_layers * position * config.num_kv_heads * config.key_size * itemsize * batch
    return {"weights": weights, "kv_cache": cache, "total": weights + cache, "experts_read": experts_read}


def prefill_matmuls(config, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every linear-layer matmul of a `tokens` prefill (router aside: fp32, E columns)."""
    d, f, hd = config.emb_size, config.ffn_size, config.key_size
    q, kv = config.num_q_heads * hd, config.num_kv_heads * hd
    per_expert = max(1, round(tokens * config.num_selected_experts / config.num_experts))
    layer = [(tokens, d, q), (tokens, d, kv), (tokens, d, kv), (tokens, q, d)]
    layer += [(per_expert, d, f), (per_expert, d, f), (per_expert, f, d)] * config.num_experts
    return layer * config.num_layers + [(tokens, d, config.vocab_size)]


# ---- timing --------------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str = "cpu") -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def memory_bandwidth(nbytes: int, device: str = "cpu", repeat: int = 5) -> dict:
    """Bytes read + written per second by `dst.copy_(src)` of `nbytes` (best of `repeat`)."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src), device) for _ in range(repeat))
    return {"copy_bytes": nbytes, "seconds": best, "bytes_per_s": 2 * nbytes / best}


def _matmuls_seconds(shapes, dtype, device: str, repeat: int, budget_s: float = 20.0) -> float:
    """Time of `x @ w` over `shapes` in `dtype`: each distinct shape timed on its own (best of `repeat`, fewer
    once `budget_s` is spent: a slow dtype is slow on its first call too), times how often it occurs. Once
    the budget is spent, the shapes left are counted at the seconds per FLOP of those timed (torch's
    emulated bf16 GEMM would otherwise take minutes per true-width shape on a CPU without bf16 units)."""
    import collections

    import torch

    spent, total = 0.0, 0.0
    timed_seconds, timed_flops = 0.0, 0
    with torch.inference_mode():
        for (m, k, n), count in collections.Counter(shapes).items():
            flops = 2 * m * k * n
            if spent > budget_s and timed_flops:
                total += count * flops * timed_seconds / timed_flops
                continue
            x = torch.randn(m, k, device=device).to(dtype)
            w = torch.randn(k, n, device=device).to(dtype)
            best = math.inf
            for attempt in range(repeat + 1):  # the first is a warm-up unless the budget is gone
                seconds = timed(lambda: torch.matmul(x, w), device)
                spent += seconds
                if attempt:
                    best = min(best, seconds)
                if spent > budget_s:
                    best = min(best, seconds)
                    break
            total += count * best
            timed_seconds += best
            timed_flops += flops
    return total


def gemm_peak(config, tokens: int, device: str = "cpu", repeat: int = 3) -> dict:
    """Time and FLOP/s of a prefill's linear matmuls alone: native bf16 `x @ w`, and fp32 too. The peak is the
    faster of the two: a CPU without bf16 units (no AVX512-BF16/AMX) runs torch's bf16 GEMM tens of times
    slower than fp32 (0.5 against 18 GFLOP/s on this project's 2-core AVX2 machine), and a bf16 model can
    compute its matmuls in fp32 there (upstream's numerics do), so bf16 alone is no ceiling."""
    import torch

    shapes = prefill_matmuls(config, tokens)
    flops = sum(2 * m * k * n for m, k, n in shapes)
    seconds = {"bf16": _matmuls_seconds(shapes, torch.bfloat16, device, repeat),
               "fp32": _matmuls_seconds(shapes, torch.float32, device, repeat)}
    best = min(seconds.values())
    return {"seconds": best, "flops": flops, "flops_per_s": flops / best, "matmuls": len(shapes),
            "dtype": min(seconds, key=seconds.get),
            **{f"{name}_flops_per_s": flops / t for name, t in seconds.items()}}


def _repeated_cache(cache, batch: int):
    """`cache` (batch 1) repeated to `batch` rows: the same prompt in every row."""
    return dataclasses.replace(cache, keys=[k.expand(batch, *k.shape[1:]).clone() for k in cache.keys],
                               values=[v.expand(batch, *v.shape[1:]).clone() for v in cache.values],
                               key_valid=cache.key_valid.expand(batch, -1).clone())


def bench_run(model, tokens: int, steps: int, device: str) -> dict:
    """Prefill of one `tokens` prompt, then `steps` decode steps at batch 1 and batch 8 from its cache."""
    import torch

    config = model.config
    ids = prompt(config, 1, tokens).to(device)
    next_ids = prompt(config, max(BATCHES), steps, seed=2).to(device)
    result = {}
    with torch.inference_mode():
        model(ids[:, :8])  # warm-up (first-call allocations)
        cache = model.new_cache(1, tokens + steps + 1)
        result["prefill_s"] = timed(lambda: model(ids, cache), device)
        result["prefill_tokens_per_s"] = tokens / result["prefill_s"]
        for batch in BATCHES:
            rows = cache if batch == 1 else _repeated_cache(cache, batch)
            start_length = rows.length

            def decode():
                for step in range(steps):
                    model(next_ids[:batch, step:step + 1], rows)

            seconds = timed(decode, device)
            rows.length = start_length  # batch 1 decodes from the prompt again for the next batch size
            rows.key_valid[:, start_length:] = False
            result[f"decode_b{batch}_s"] = seconds
            result[f"decode_b{batch}_tokens_per_s"] = batch * steps / seconds
    return result


# ---- the long prefill, in a child -----------------------------------------------------------------------

def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def long_prefill_child(spec: dict) -> dict:
    """In the child: build the model, reset the peak RSS, prefill `tokens`, report the memory."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    config = size_config(spec["size"], max(spec["tokens"] + 1, 8192))
    model = build_model(config, spec["weights"], spec["mode"], spec["device"])
    weights = _nbytes(model)
    ids = prompt(config, 1, spec["tokens"]).to(spec["device"])
    gc.collect()
    before, build_peak = _status_bytes("VmRSS"), _status_bytes("VmHWM")  # VmHWM: this process's own (exec resets it)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        method = "VmHWM after clear_refs, minus VmRSS before the forward"
    except OSError:
        method = "ru_maxrss (whole life) minus VmRSS before the forward"
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        cache = model.new_cache(1, spec["tokens"])
        seconds = timed(lambda: model(ids, cache), spec["device"])
    peak = _status_bytes("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"size": spec["size"], "tokens": spec["tokens"], "weights": spec["weights"], "numerics": spec["mode"],
              "seconds": seconds, "weight_bytes": weights, "rss_before_bytes": before, "peak_rss_bytes": peak,
              "activation_bytes": peak - before, "method": method, "threads": torch.get_num_threads(),
              "child_peak_rss_bytes": max(peak, build_peak or 0)}
    if spec["device"].startswith("cuda"):
        result["gpu_activation_bytes"] = torch.cuda.max_memory_allocated() - gpu_before
    return result


def long_prefill(size: str, tokens: int, mode: str, device: str, threads: int | None) -> dict:
    """Run `long_prefill_child` in a fresh process (its VmHWM is its own: exec starts a new address space)."""
    spec = {"size": size, "tokens": tokens, "weights": "int8", "mode": mode, "device": device, "threads": threads}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        return {"size": size, "tokens": tokens, "error": f"child exited {done.returncode}: {done.stderr[-500:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["child_peak_rss_minus_weights_bytes"] = result["child_peak_rss_bytes"] - result["weight_bytes"]
    return result


# ---- the whole benchmark ------------------------------------------------------------------------------------

def run_forward_bench(sizes: list[str], formats: list[str], modes: list[str], *, tokens: int, steps: int,
                      long_tokens: int, copy_bytes: int, threads: int | None, device: str = "cpu",
                      log=lambda message: print(message, file=sys.stderr, flush=True)) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    results = {"threads": torch.get_num_threads(), "device": device, "numerics_modes": modes, "weights": formats,
               "prefill_tokens": tokens, "decode_steps": steps, "batches": list(BATCHES)}
    log(f"memory bandwidth: copying {copy_bytes / GB:.2f} GB ...")
    results["bandwidth"] = memory_bandwidth(copy_bytes, device)
    bandwidth = results["bandwidth"]["bytes_per_s"]
    results["sizes"] = {}
    for size in sizes:
        config = size_config(size, max(tokens + steps + 1, 8192))
        log(f"{size}: GEMM peak at the prefill's shapes ...")
        peak = gemm_peak(config, tokens, device)
        entry = {"config": config.to_dict(), "ffn_size": config.ffn_size, "gemm_peak": peak, "runs": []}
        for fmt in formats:
            log(f"{size}: building {fmt} weights ...")
            model = build_model(config, fmt, modes[0], device)
            read = {batch: decode_bytes_per_step(model, batch, tokens + steps / 2) for batch in BATCHES}
            for mode in modes:
                model.numerics = mode
                log(f"{size}: {fmt}, numerics {mode}: prefill {tokens}, decode {steps} steps at batch "
                    f"{', '.join(map(str, BATCHES))} ...")
                run = {"weights": fmt, "numerics": mode, **bench_run(model, tokens, steps, device)}
                run["prefill_vs_gemm_peak"] = peak["seconds"] / run["prefill_s"]
                run["prefill_flops_per_s"] = peak["flops"] / run["prefill_s"]
                for batch in BATCHES:
                    roofline = batch * bandwidth / read[batch]["total"]
                    run[f"bytes_per_step_b{batch}"] = read[batch]
                    run[f"roofline_b{batch}_tokens_per_s"] = roofline
                    run[f"decode_b{batch}_vs_roofline"] = run[f"decode_b{batch}_tokens_per_s"] / roofline
                entry["runs"].append(run)
            del model
            gc.collect()
        results["sizes"][size] = entry
    if long_tokens:
        size = "true-width" if "true-width" in sizes else sizes[-1]
        mode = fastest_mode(modes)
        log(f"{size}: peak memory of a {long_tokens}-token prefill (int8, numerics {mode}) in a child process ...")
        results["long_prefill"] = long_prefill(size, long_tokens, mode, device, threads)
    results["targets"] = forward_targets(results)
    return results


def _run(results: dict, size: str, fmt: str, mode: str) -> dict | None:
    return next((r for r in results["sizes"][size]["runs"] if r["weights"] == fmt and r["numerics"] == mode), None)


def forward_targets(results: dict) -> list[dict]:
    """The issue's targets, each with its measured value and met/missed (fast mode where it exists)."""
    modes = results["numerics_modes"]
    fast = fastest_mode(modes)
    rows = []

    def add(what: str, where: str, value: float | None, goal: float, at_most: bool = False, unit: str = "%") -> None:
        if value is not None:
            rows.append({"target": what, "where": where, "value": value, "goal": goal, "unit": unit,
                         "met": value <= goal if at_most else value >= goal})

    for size in results["sizes"]:
        for fmt in results["weights"]:
            run = _run(results, size, fmt, fast)
            if run is None:
                continue
            add("decode b1 >= 60 % of roofline", f"{size} {fast} {fmt}", run["decode_b1_vs_roofline"],
                TARGETS["decode_vs_roofline"])
            add("prefill >= 50 % of GEMM peak", f"{size} {fast} {fmt}", run["prefill_vs_gemm_peak"],
                TARGETS["prefill_vs_gemm_peak"])
            up = _run(results, size, fmt, "upstream")
            if fast != "upstream" and up is not None:
                for what in ("prefill", "decode_b1"):
                    add(f"upstream within 3x of fast ({what})", f"{size} {fmt}",
                        up[f"{what}_tokens_per_s"] / run[f"{what}_tokens_per_s"], TARGETS["upstream_vs_fast"],
                        unit="x")
        int8 = _run(results, size, "int8", fast)
        for other in ("bf16", "bf16-plain"):
            run = _run(results, size, other, fast)
            if int8 is not None and run is not None:
                add(f"int8 >= 1.6x {other} decode (b1)", f"{size} {fast}",
                    int8["decode_b1_tokens_per_s"] / run["decode_b1_tokens_per_s"], TARGETS["int8_vs_bf16_decode"],
                    unit="x")
    long = results.get("long_prefill")
    if long and "activation_bytes" in long:
        add(f"{long['tokens']}-token prefill activation <= 2 GB", f"{long['size']} {long['numerics']} int8",
            long["activation_bytes"], TARGETS["long_prefill_activation_bytes"], at_most=True, unit="GB")
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def format_forward(results: dict) -> str:
    bandwidth = results["bandwidth"]["bytes_per_s"]
    lines = [f"forward: threads {results['threads']} (torch.get_num_threads), device {results['device']}, "
             f"memory bandwidth {bandwidth / GB:.1f} GB/s (read + write of a "
             f"{results['bandwidth']['copy_bytes'] / GB:.2f} GB copy), prefill {results['prefill_tokens']} tokens, "
             f"decode {results['decode_steps']} steps"]
    for size, entry in results["sizes"].items():
        c, peak = entry["config"], entry["gemm_peak"]
        lines += ["", f"{size}: D {c['emb_size']}, F {entry['ffn_size']}, {c['num_experts']} experts top-"
                      f"{c['num_selected_experts']}, {c['num_layers']} layer(s), {c['num_q_heads']} q / "
                      f"{c['num_kv_heads']} kv heads of {c['key_size']}, vocab {c['vocab_size']}; GEMM peak "
                      f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['dtype']}, the prefill's {peak['matmuls']} "
                      f"matmuls; bf16 {peak['bf16_flops_per_s'] / 1e9:.1f}, fp32 {peak['fp32_flops_per_s'] / 1e9:.1f})",
                  "",
                  "| numerics | weights | prefill tok/s | of GEMM peak | decode b1 tok/s | roofline b1 | of roofline "
                  "| decode b8 tok/s | roofline b8 | of roofline | MB read / token (b1) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in entry["runs"]:
            lines.append(f"| {r['numerics']} | {r['weights']} | {r['prefill_tokens_per_s']:.1f} | "
                         f"{_pct(r['prefill_vs_gemm_peak'])} | {r['decode_b1_tokens_per_s']:.2f} | "
                         f"{r['roofline_b1_tokens_per_s']:.1f} | {_pct(r['decode_b1_vs_roofline'])} | "
                         f"{r['decode_b8_tokens_per_s']:.2f} | {r['roofline_b8_tokens_per_s']:.1f} | "
                         f"{_pct(r['decode_b8_vs_roofline'])} | {r['bytes_per_step_b1']['total'] / 1e6:.1f} |")
    long = results.get("long_prefill")
    if long:
        lines.append("")
        if "error" in long:
            lines.append(f"long prefill ({long['tokens']} tokens at {long['size']}): {long['error']}")
        else:
            lines.append(f"long prefill: {long['tokens']} tokens at {long['size']} (int8, {long['numerics']}) in "
                         f"{long['seconds']:.1f} s: activation peak {long['activation_bytes'] / GB:.2f} GB over "
                         f"{long['rss_before_bytes'] / GB:.2f} GB resident before ({long['method']}); weights "
                         f"{long['weight_bytes'] / GB:.2f} GB; child peak RSS minus weights "
                         f"{long['child_peak_rss_minus_weights_bytes'] / GB:.2f} GB")
    lines += ["", "| target | where | measured | goal | |", "| --- | --- | ---: | ---: | --- |"]
    for t in results["targets"]:
        shown = {"GB": lambda x: f"{x / GB:.2f} GB", "x": lambda x: f"{x:.2f}x", "%": _pct}[t["unit"]]
        value, goal = shown(t["value"]), shown(t["goal"])
        lines.append(f"| {t['target']} | {t['where']} | {value} | {goal} | {'met' if t['met'] else 'missed'} |")
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(json.dumps(long_prefill_child(json.loads(sys.argv[2]))))
