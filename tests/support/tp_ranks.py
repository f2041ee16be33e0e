"""What one rank of the tensor-parallel tests runs (a module-level function: spawned processes import it)."""

from __future__ import annotations

import torch


def check_rank(rank: int, world: int, paths: dict[str, str], tokens: torch.Tensor, prompts: list[list[int]]) -> dict:
    """Everything the tests check on one rank, in one process group: logits, greedy tokens, resident bytes,
    cache heads, the golden layers teacher-forced, and the refusals (a missing shard and another config on
    rank 1)."""
    import torch.distributed as dist

    import grok_torch
    from grok_torch.generation import generate
    from grok_torch.loading import from_state_dict
    from grok_torch.tp import resident_bytes, shard
    from parity.harness import load_golden, torch_activations_tp

    out: dict = {}
    model = grok_torch.load(paths["conversion"], tp=world, numerics="upstream")
    with torch.inference_mode():
        out["logits"] = model(tokens).to(torch.float32)
    out["tokens"] = generate(model, prompts, max_new_tokens=6, temperature=0.0).tokens
    out["bytes"] = resident_bytes(model)
    out["cache_kv_heads"] = model.new_cache(1, 4).keys[0].shape[2]
    config, state, golden_tokens, ref = load_golden(paths["golden"])
    golden = shard(from_state_dict(state, config, dtype="bf16", numerics="upstream"), rank, world, dist.group.WORLD)
    activations = torch_activations_tp(golden, golden_tokens, ref, modes=("teacher_forced",))
    out["golden"] = activations if rank == 0 else None
    for case in ("missing_shard", "other_config"):
        path = paths[case] if rank == 1 else paths["conversion"]
        try:
            grok_torch.load(path, tp=world, numerics="upstream")
            out[case] = None
        except Exception as err:  # the message every rank must raise
            out[case] = f"{type(err).__name__}: {err}"
    return out
