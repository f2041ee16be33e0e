"""Tensor parallelism (grok_torch.tp) in real multi-process gloo runs on tiny configs, against the
single-process model: one process group per W (2 and 4) checks everything of that W at once."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import grok_torch
from grok_torch import memory_plan
from grok_torch.config import GrokConfig
from grok_torch.distributed import DistributedError, launch, rank_device
from grok_torch.generation import generate
from grok_torch.loading import from_state_dict
from grok_torch.model import Grok
from grok_torch.tp import TPError, layout, resident_bytes, shard, valid_degrees
from parity.compare import compare_tensor
from parity.harness import compare_activations, load_golden, torch_teacher_forced
from parity.tolerances import TOLERANCES
from support.models import PROMPTS, random_model, write_converted
from support.tp_ranks import check_rank

CONFIG = GrokConfig.from_name("tiny")  # 4 q / 2 kv heads: W=2 splits the kv heads, W=4 replicates them
BIT_EXACT_SLACK = 0.01  # fp32 partial sums added in another order may flip a bf16 rounding now and then


@pytest.fixture(scope="module")
def setup(tmp_path_factory, golden_dir):
    """An int8 conversion of `tiny`, the same without its shard (for rank 1), a conversion of another
    config, and everything the single-process model gives on them."""
    from support.checkpoints import random_conversion

    root = tmp_path_factory.mktemp("tp")
    conversion, _ = random_conversion(root, CONFIG)
    missing = root / "missing-shard"
    shutil.copytree(conversion, missing)
    for shard_file in missing.glob("model-*.safetensors"):
        shard_file.unlink()
    other = root / "other-config"
    write_converted(other, random_model(GrokConfig.from_name("tiny", num_layers=1)))
    tokens = torch.randint(1, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    single = grok_torch.load(conversion, numerics="upstream")
    with torch.inference_mode():
        logits = single(tokens).to(torch.float32)
    greedy = generate(single, PROMPTS, max_new_tokens=6, temperature=0.0).tokens
    config, state, golden_tokens, ref = load_golden(golden_dir)
    golden = from_state_dict(state, config, dtype="bf16", numerics="upstream")
    golden_run = compare_activations(torch_teacher_forced(golden, golden_tokens, ref), ref, config, golden_tokens,
                                     "bf16", "teacher_forced")
    paths = {"conversion": str(conversion), "missing_shard": str(missing), "other_config": str(other),
             "golden": str(golden_dir)}
    return dict(paths=paths, tokens=tokens, logits=logits, greedy=greedy, bytes=resident_bytes(single),
                golden=(config, golden_tokens, ref, golden_run))


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_ranks_match_single_process(setup, world):
    results = launch(check_rank, world, world, setup["paths"], setup["tokens"], PROMPTS)
    assert [r.error for r in results] == [None] * world, [r.traceback for r in results if r.error]
    tolerance = TOLERANCES[("bf16", "end_to_end")]["block"]
    full = setup["bytes"]
    for r in results:
        got = r.value
        # Full logits on every rank, within the block tolerance of the single-process model.
        comparison = compare_tensor("logits", got["logits"].numpy(), setup["logits"].numpy(), tolerance, "block")
        assert comparison.passed, (r.rank, comparison)
        assert got["tokens"] == setup["greedy"], r.rank
        # Resident weights: 1/W of the sharded ones plus the replicated ones (+5 %), from the rank's tensors.
        assert got["bytes"]["replicated"] == full["replicated"]
        assert got["bytes"]["sharded"] <= full["sharded"] / world * 1.05, (r.rank, got["bytes"], full)
        assert got["cache_kv_heads"] == layout(CONFIG, world, r.rank).kv_heads
        # The memory plan's weight figure (meta device, no data) is what a loaded rank holds.
        assert sum(got["bytes"].values()) == memory_plan.plan(CONFIG, tp=world, weights="int8").weight_bytes
        # A shard missing on rank 1, another config on rank 1: every rank fails, naming rank 1.
        assert "rank 1:" in got["missing_shard"] and "model-00001-of-00001" in got["missing_shard"], got
        assert "do not have the same model config" in got["other_config"], got
    # The golden layers, teacher-forced: the same bit-exact fractions as in one process.
    config, golden_tokens, ref, single_run = setup["golden"]
    run = compare_activations(results[0].value["golden"]["teacher_forced"], ref, config, golden_tokens, "bf16",
                              "teacher_forced")
    assert run.passed
    single = {c.name: c.bit_exact for c in single_run.comparisons}
    worse = {c.name: (c.bit_exact, single[c.name]) for c in run.comparisons
             if c.bit_exact < single[c.name] - BIT_EXACT_SLACK}
    assert not worse, worse


def test_degrees_that_the_heads_allow():
    grok1 = GrokConfig.from_name("grok-1")
    assert valid_degrees(grok1) == [1, 2, 4, 8, 16]
    for world in (3, 6, 32):
        with pytest.raises(TPError, match=f"W={world} ranks is impossible for 48 q / 8 kv heads"):
            layout(grok1, world, 0)
    assert layout(grok1, 16, 5).kv_start == 2 and layout(grok1, 16, 5).kv_heads == 1  # q heads 15..17 -> kv 2


def test_int8_scale_groups_that_cannot_be_split_are_refused():
    # 6 q / 3 kv heads, F=48: W=3 splits the heads, but not o_proj's 8 scale groups of 6 input rows.
    config = GrokConfig(emb_size=48, key_size=8, num_q_heads=6, num_kv_heads=3, num_layers=1, vocab_size=384,
                        widening_factor=1.5)
    with pytest.raises(TPError, match="8 scale groups .* cannot be split over W=3"):
        shard(Grok(config, weights="int8", device="meta"), 0, 3)
    shard(Grok(config, weights="bf16", device="meta"), 0, 3)  # float weights have no groups to split


def test_grok1_at_w16_takes_half_a_scale_group():
    model = shard(Grok(GrokConfig.from_name("grok-1", num_layers=1), weights="int8", device="meta"), 3, 16)
    o_proj, down = model.layers[0].attn.o_proj, model.layers[0].moe.down_proj
    assert tuple(o_proj.weight.shape) == (6144, 384) and tuple(o_proj.scales.shape) == (6144, 1)
    assert tuple(down.weight.shape) == (8, 6144, 2048) and tuple(down.scales.shape) == (8, 6144, 1)


def test_more_ranks_than_devices_is_refused():
    count = torch.cuda.device_count()
    with pytest.raises(DistributedError, match=f"this host has {count} CUDA device"):
        rank_device("cuda", count)


def test_gpu_check_runs_on_the_cpu():
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--small", "--layers", "1", "--weights",
                           "int8", "--tokens", "2", "--skip-serving"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = [line for line in done.stdout.splitlines() if line.strip().startswith("int8")]
    assert len(row) == 1 and " pass " in row[0], done.stdout
    assert "gpu-check passed" in done.stdout


def test_plan_of_grok1_int8_at_w8_by_hand():
    # One rank of 8, counted by hand: int8 weights with bf16 scales (one scale row per row-split matrix),
    # the embedding's 1/8 in bf16, fp32 router and norms.
    d, f, e, k = 6144, 32768, 8, 128
    q, kv, o = 6 * k * d + 6 * k * 2, k * d + k * 2, d * 6 * k + d * 2
    experts = 2 * (e * f // 8 * d + e * f // 8 * 2) + e * d * f // 8 + e * d * 2
    layer = q + 2 * kv + o + experts + e * d * 4 + 4 * d * 4
    expected = 64 * layer + 131072 // 8 * d * 2 + d * 4
    got = memory_plan.plan(GrokConfig.from_name("grok-1"), tp=8, weights="int8")
    assert got.weight_bytes == expected
    assert got.cache_bytes == 2 * 64 * 8192 * 1 * k * 2 + 8192  # one kv head per rank, bf16, + key_valid
