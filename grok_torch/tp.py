"""Tensor parallelism on torch.distributed: shard a plain `Grok` in place for rank r of W.

The split follows upstream's "model" mesh axis (ENGINES.md section 1), Megatron style:

- q/k/v and the experts' gate/up projections are split by output (whole heads, F columns): rank r
  computes its own heads and its own F/W hidden units, with no communication;
- o_proj and the experts' down projection are split by input; their partial outputs are summed with
  one all-reduce each, in fp32 (after o_proj, and once after the MoE's gate-weighted sum of experts);
- the router and the norms are replicated, and so is the residual stream between the blocks;
- the embedding table and the tied head are split by vocabulary: rank r holds rows [rV/W, (r+1)V/W).

Why by vocabulary, not by width as upstream: upstream's head is 8 width shards whose bf16 partials
are summed in fp32 (model.tied_output_projection). A vocabulary slice keeps all 8 width shards of its
rows, so each rank computes its logits bit for bit as the single-process model does and an all-gather
(exact) assembles them; a width split would sum W partials of 8/W shards in another order. The lookup
is exact too: the one rank holding a token's row contributes it, the others zeros.

int8 weights stay int8: a row-split matrix keeps its scale groups, which are upstream's 8 shards
(scale_groups=config.model_shards), so rank r of W | 8 takes 8/W whole groups; for W a multiple of 8
(W = 16) a rank takes half (a quarter, ...) of one group and its single scale column; otherwise the
layout is refused. Valid W: W divides the kv heads, or is a multiple of them (each kv head then
replicated on W / kv_heads ranks), and divides the q heads, F and the vocabulary: 1, 2, 4, 8, 16
for Grok-1. The KV cache of a rank holds only its own kv heads.

Sharding slices the Linear's own weight/scales tensors, so Linear.forward (and any kernel behind it)
runs unchanged on the smaller matrices. `shard_index` is the one description of the split: `shard`
applies it to a built model, grok_torch.loading reads exactly those slices from safetensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import Tensor, nn

from grok_torch.config import GrokConfig
from grok_torch.errors import UserError
from grok_torch.linear import Linear

__all__ = ["TPError", "Layout", "layout", "shard_index", "shard", "TensorParallel", "gather_record",
           "resident_bytes", "valid_degrees"]


class TPError(UserError):
    """A tensor-parallel degree or setup that cannot work (the message names W and what it needs)."""


@dataclass(frozen=True)
class Layout:
    """What rank `rank` of `world` holds: [start, start + count) of q heads, kv heads, F and vocabulary."""

    world: int
    rank: int
    q_start: int
    q_heads: int
    kv_start: int
    kv_heads: int
    ffn_start: int
    ffn_size: int
    vocab_start: int
    vocab_size: int


def check_degree(config: GrokConfig, world: int) -> None:
    """TPError naming W and the heads unless W can split this config."""
    if world < 1:
        raise TPError(f"tensor-parallel degree W={world} must be at least 1")
    q, kv = config.num_q_heads, config.num_kv_heads
    problems = []
    if q % world:
        problems.append(f"the {q} q heads are not divisible by W")
    if kv % world and world % kv:
        problems.append(f"W neither divides the {kv} kv heads nor is a multiple of them")
    if config.ffn_size % world:
        problems.append(f"ffn_size={config.ffn_size} is not divisible by W")
    if config.vocab_size % world:
        problems.append(f"vocab_size={config.vocab_size} is not divisible by W")
    if problems:
        raise TPError(f"tensor parallelism over W={world} ranks is impossible for {q} q / {kv} kv heads: "
                      + "; ".join(problems) + f" (valid W: {', '.join(map(str, valid_degrees(config)))})")


def valid_degrees(config: GrokConfig, limit: int = 64) -> list[int]:
    """Every W up to `limit` that the heads, F and the vocabulary allow."""
    q, kv = config.num_q_heads, config.num_kv_heads
    return [w for w in range(1, limit + 1) if not q % w and (not kv % w or not w % kv)
            and not config.ffn_size % w and not config.vocab_size % w]


def layout(config: GrokConfig, world: int, rank: int) -> Layout:
    """Rank `rank`'s share of `config` over `world` ranks (TPError if W cannot split it)."""
    check_degree(config, world)
    if not 0 <= rank < world:
        raise TPError(f"rank {rank} is not in 0..{world - 1}")
    q_heads = config.num_q_heads // world
    q_start = rank * q_heads
    if config.num_kv_heads % world == 0:
        kv_heads = config.num_kv_heads // world
        kv_start = rank * kv_heads
    else:  # W a multiple of the kv heads: this rank's q heads all use one kv head, replicated
        kv_heads, kv_start = 1, q_start // config.q_heads_per_kv_head
    ffn = config.ffn_size // world
    vocab = config.vocab_size // world
    return Layout(world, rank, q_start, q_heads, kv_start, kv_heads, rank * ffn, ffn, rank * vocab, vocab)


def _group_slice(name: str, in_start: int, in_count: int, in_features: int, groups: int, world: int) -> slice:
    """The scale columns of input rows [in_start, in_start + in_count) of a row-split int8 matrix."""
    width = in_features // groups
    if in_count % width == 0:  # whole groups (W divides the groups)
        return slice(in_start // width, (in_start + in_count) // width)
    if width % in_count == 0:  # part of one group (W a multiple of the groups): its one scale column
        return slice(in_start // width, in_start // width + 1)
    raise TPError(f"{name}: its {groups} scale groups (upstream's shards) cannot be split over W={world} ranks "
                  f"(each rank would hold {in_count} of a group's {width} input rows); use W dividing "
                  f"{groups} or a multiple of it, or a bf16/fp32 conversion")


def shard_index(name: str, shape: tuple[int, ...], config: GrokConfig, lay: Layout) -> tuple | None:
    """The index of rank `lay.rank`'s slice of state-dict tensor `name` of full `shape` (None: replicated)."""
    k = config.key_size
    parts = name.split(".")
    module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[-1])
    q_rows = slice(lay.q_start * k, (lay.q_start + lay.q_heads) * k)
    kv_rows = slice(lay.kv_start * k, (lay.kv_start + lay.kv_heads) * k)
    ffn = slice(lay.ffn_start, lay.ffn_start + lay.ffn_size)
    if name == "embedding.weight":
        return (slice(lay.vocab_start, lay.vocab_start + lay.vocab_size),)
    if ".attn." in name and module == "q_proj":
        return (q_rows,)
    if ".attn." in name and module in ("k_proj", "v_proj"):
        return (kv_rows,)
    if ".attn." in name and module == "o_proj":
        if kind == "weight":
            return (slice(None), q_rows)
        return (slice(None), _group_slice(name, q_rows.start, q_rows.stop - q_rows.start, config.num_q_heads * k,
                                          shape[-1], lay.world))
    if ".moe." in name and module in ("gate_proj", "up_proj"):
        return (slice(None), ffn)
    if ".moe." in name and module == "down_proj":
        if kind == "weight":
            return (slice(None), slice(None), ffn)
        return (slice(None), slice(None), _group_slice(name, ffn.start, lay.ffn_size, config.ffn_size, shape[-1],
                                                       lay.world))
    return None


def local_shape(shape: tuple[int, ...], index: tuple | None) -> tuple[int, ...]:
    """The shape of `tensor[index]` for a tensor of `shape` (slices only)."""
    if index is None:
        return tuple(shape)
    dims = list(shape)
    for axis, part in enumerate(index):
        dims[axis] = len(range(*part.indices(dims[axis])))
    return tuple(dims)


def attention_config(config: GrokConfig, lay: Layout) -> GrokConfig:
    """The config a rank's Attention computes with: its local head counts (attention reads nothing else
    that changes; model_shards=1 because the local width need not be a multiple of 8)."""
    return dataclasses.replace(config, num_q_heads=lay.q_heads, num_kv_heads=lay.kv_heads, model_shards=1)


# ---- the collectives ------------------------------------------------------------------------------

class TensorParallel:
    """The communication of one rank: the hooks the sharded modules call (model.py's `tp` attributes)."""

    def __init__(self, config: GrokConfig, lay: Layout, group=None):
        self.config, self.layout, self.group = config, lay, group
        self.attention_config = attention_config(config, lay)

    @property
    def world(self) -> int:
        return self.layout.world

    def _wire(self, x: Tensor) -> Tensor:
        """The tensor as sent: gloo has no bf16 reductions, so the CPU backend moves fp32 (exact casts)."""
        if x.dtype != torch.float32 and dist.get_backend(self.group) == "gloo":
            return x.to(torch.float32)
        return x.contiguous()

    def all_reduce(self, x: Float[Tensor, "*batch"]) -> Float[Tensor, "*batch"]:
        """The sum of every rank's partial `x`, added in fp32 and returned in x's dtype (rounded once)."""
        if self.world == 1:
            return x
        total = x.to(torch.float32).contiguous()
        dist.all_reduce(total, group=self.group)
        return total.to(x.dtype)

    def row_parallel(self, linear: Linear, x: Float[Tensor, "*batch local_in"]) -> Float[Tensor, "*batch out"]:
        """A row-split linear (o_proj): this rank's partial product in fp32 (Linear.forward on fp32
        activations: the same kernels, the weight dequantized a block at a time as Linear.materialize
        does), summed over the ranks in fp32 and rounded once to x's dtype. Rounding each partial first
        would round twice, and upstream does not: measured on the golden layers, attn_out is 58-62 %
        bit-exact that way against 99.7 % in one process."""
        partial = linear(x.to(torch.float32))
        if self.world > 1:
            dist.all_reduce(partial, group=self.group)
        return partial.to(x.dtype)

    def embed(self, embedding: nn.Embedding, tokens: Int[Tensor, "batch seq"],
              dtype: torch.dtype) -> Float[Tensor, "batch seq dim"]:
        """The rows of `tokens` from the vocabulary-split table: the rank holding a row sends it, the
        others zeros, so the sum is the row exactly."""
        lay = self.layout
        local = tokens - lay.vocab_start
        mine = (local >= 0) & (local < lay.vocab_size)
        rows = embedding(local.clamp(0, lay.vocab_size - 1)).to(dtype)
        rows = torch.where(mine[..., None], rows, torch.zeros((), dtype=dtype, device=rows.device))
        if self.world == 1:
            return rows
        total = self._wire(rows)
        dist.all_reduce(total, group=self.group)
        return total.to(dtype)

    def gather_vocab(self, logits: Float[Tensor, "batch seq local_vocab"]) -> Float[Tensor, "batch seq vocab"]:
        """Every rank's vocabulary slice of the logits, concatenated in rank order (exact)."""
        return self.gather_last(logits)

    def gather_last(self, x: Tensor) -> Tensor:
        """Every rank's `x` concatenated along the last axis, in rank order."""
        if self.world == 1:
            return x
        wire = self._wire(x)
        parts = [torch.empty_like(wire) for _ in range(self.world)]
        dist.all_gather(parts, wire, group=self.group)
        return torch.cat(parts, dim=-1).to(x.dtype)


# ---- sharding a model ---------------------------------------------------------------------------------

def _replace_tensor(module: nn.Module, attribute: str, value: Tensor) -> None:
    if attribute in module._parameters:
        module._parameters[attribute] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attribute] = value


def shard(model: nn.Module, rank: int, world: int, group=None) -> nn.Module:
    """Shard a built Grok in place for rank `rank` of `world` (any device, the meta device included):
    every split tensor is replaced by its own slice (a copy, so the full tensor can be freed), the
    Linear's sizes follow, and the modules get their communication hooks. Returns the model."""
    if getattr(model, "tp", None) is not None:
        raise TPError(f"the model is already sharded (rank {model.tp.layout.rank} of W={model.tp.world})")
    config = model.config
    lay = layout(config, world, rank)
    tp = TensorParallel(config, lay, group)
    named = dict(model.named_modules())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        index = shard_index(name, tuple(tensor.shape), config, lay)
        if index is None:
            continue
        owner, attribute = name.rsplit(".", 1)
        part = tensor[index]
        _replace_tensor(named[owner], attribute, part if part.is_meta else part.clone())
    for name, module in named.items():
        if isinstance(module, Linear):
            module.out_features, module.in_features = module.weight.shape[-2:]
            if module.scales is not None:
                module.scale_groups = module.scales.shape[-1]
            elif module.in_features % module.scale_groups:
                module.scale_groups = 1  # a float weight has no groups; keep the attribute consistent
        if hasattr(module, "o_proj") or hasattr(module, "down_proj"):  # Attention, MoE
            module.tp = tp
        if hasattr(module, "o_proj"):
            module.config = tp.attention_config
    model.tp = tp
    return model


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """This rank's weight bytes, measured from its tensors: {"sharded": ..., "replicated": ...}."""
    lay = model.tp.layout if getattr(model, "tp", None) is not None else layout(model.config, 1, 0)
    totals = {"sharded": 0, "replicated": 0}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        kind = "replicated" if shard_index(name, tuple(tensor.shape), model.config, lay) is None else "sharded"
        totals[kind] += tensor.numel() * tensor.element_size()
    return totals


# ---- records ---------------------------------------------------------------------------------------------

_HEAD_SPLIT = ("q_proj", "attn_context")
_KV_SPLIT = ("k_proj", "v_proj")


def gather_record(record: dict[str, Tensor], tp: TensorParallel) -> dict[str, Tensor]:
    """A record of a sharded model with its head-split intermediates (q/k/v projections, attention
    context) gathered to the full width, in head order (a replicated kv head counted once)."""
    out = dict(record)
    lay = tp.layout
    replicas = max(1, lay.world // tp.config.num_kv_heads)
    for name in sorted(record):  # every rank records the same names in the same order
        suffix = name.rsplit(".", 1)[-1]
        if suffix in _HEAD_SPLIT:
            out[name] = tp.gather_last(record[name])
        elif suffix in _KV_SPLIT:
            full = tp.gather_last(record[name])
            if replicas > 1:  # each kv head came from `replicas` ranks: keep the first of each
                width = record[name].shape[-1]
                full = torch.cat([full[..., r * width:(r + 1) * width] for r in range(0, lay.world, replicas)], -1)
            out[name] = full
    return out
