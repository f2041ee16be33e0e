"""How much memory one rank of a tensor-parallel Grok needs: weights, KV cache, activations.

Computed from the config and the stored formats alone, never from tensor data: the model is built on
the meta device exactly as `grok_torch.load` builds it (each linear int8 + scales or float as stored,
the embedding in the compute dtype), sharded with grok_torch.tp on the meta device, and its tensors'
bytes are summed; so the weight figure is the rank's resident weight bytes by construction.

The activation figure is an estimate of the transient peak of one forward pass over a prefill chunk,
the largest of three phases (attention, one expert, the head) on top of the residual stream:

- attention: fp32 logits and probabilities [B, heads/W, chunk, T] plus the dequantized q/k/v/o weights
  of a layer (bf16, with their fp32 dequantization temporary);
- one expert: its gate/up/down weights dequantized (bf16, bf16, fp32, plus an fp32 temporary) and the
  fp32 hidden activations of every routed token [B * chunk * k, F/W] (gate, up, product);
- the head: the local logits [B, chunk, V/W] and the gathered fp32 [B, chunk, V] plus its bf16 copy.

A CUDA device also loses RUNTIME_RESERVE to the CUDA context and the allocator's fragmentation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from grok_torch.config import GrokConfig

__all__ = ["MemoryPlan", "plan", "parse_bytes", "format_bytes", "RUNTIME_RESERVE"]

RUNTIME_RESERVE = 2 << 30  # CUDA context (~0.5 GiB) and allocator slack, per GPU
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_bytes(text: str) -> int:
    """"80GiB", "141GB", "1.5 TiB", "512" -> bytes; ValueError naming the text otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 80GiB, 141GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_bytes(n: float) -> str:
    """GiB with one decimal; MiB below 1 GiB (a tiny model's figures would all read 0.0 GiB)."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """One rank's bytes for degree `tp`; `fits(memory)` compares them with a device's memory."""

    tp: int
    weights: str  # the stored format(s) of the linear layers
    dtype: str
    batch: int
    max_len: int
    prefill_chunk: int
    weight_bytes: int  # this rank's resident weights (sharded + replicated)
    sharded_bytes: int
    replicated_bytes: int
    cache_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes + self.activation_bytes

    def fits(self, memory: int, device: str = "cuda") -> bool:
        reserve = RUNTIME_RESERVE if device == "cuda" else 0
        return self.total_bytes + reserve <= memory


def _rank_weights(config: GrokConfig, tp: int, weights: str, dtype: str,
                  stored_float: dict[str, torch.dtype] | None) -> tuple[int, int]:
    """(sharded, replicated) weight bytes of rank 0 (every rank holds the same amount: W divides evenly)."""
    from grok_torch.model import Grok
    from grok_torch.tp import resident_bytes, shard

    model = Grok(config, weights=weights, dtype=dtype, device="meta")
    for name, dtype_of in (stored_float or {}).items():  # a converted directory's float linears
        module = model.get_submodule(name)
        if module.quantized:
            module._set_format(dtype_of)
    if tp > 1:
        shard(model, 0, tp)
    counted = resident_bytes(model)
    return counted["sharded"], counted["replicated"]


def _cache_bytes(config: GrokConfig, tp: int, batch: int, max_len: int, itemsize: int) -> int:
    from grok_torch.tp import layout

    kv_heads = layout(config, tp, 0).kv_heads
    return 2 * config.num_layers * batch * max_len * kv_heads * config.key_size * itemsize + batch * max_len


def _activation_bytes(config: GrokConfig, tp: int, batch: int, max_len: int, chunk: int, itemsize: int,
                      weight_itemsize: int) -> int:
    d, k = config.emb_size, config.key_size
    tokens = batch * chunk
    residual = 6 * tokens * d * max(itemsize, 4)  # h, norms, attention and MoE outputs, fp32 sums
    q_local = config.num_q_heads // tp
    attention = (2 * batch * q_local * chunk * max_len * 4 + batch * q_local * chunk * max_len * itemsize
                 + 4 * tokens * q_local * k * itemsize)
    q_width = q_local * k
    dequant = 2 + 4 if weight_itemsize == 1 else 0  # bf16 result + fp32 temporary of an int8 matrix
    attention += 4 * q_width * d * (dequant or weight_itemsize)
    f_local = config.ffn_size // tp
    routed = tokens * config.num_selected_experts
    expert = f_local * d * ((2 + 4) * 2 + 4 + 4 if weight_itemsize == 1 else 3 * weight_itemsize)
    expert += 3 * routed * f_local * 4 + routed * d * 4
    head = tokens * config.vocab_size // tp * (itemsize + 4) + tokens * config.vocab_size * (4 + itemsize)
    return residual + max(attention, expert, head)


def plan(config: GrokConfig, *, tp: int = 1, weights: str = "int8", dtype: str = "bf16", batch: int = 1,
         max_len: int | None = None, prefill_chunk: int = 512,
         stored_float: dict[str, torch.dtype] | None = None) -> MemoryPlan:
    """The memory plan of one rank of degree `tp` (TPError if `tp` cannot split the config).

    weights: how the linear layers are stored ("int8", "bf16", "fp32"; `stored_float` names linears a
    converted directory stores as float inside an int8 conversion). max_len: cache positions
    (default: the config's sequence_len); prefill_chunk: positions per forward pass of the prefill.
    """
    from grok_torch.tp import check_degree

    check_degree(config, tp)
    max_len = max_len or config.sequence_len
    chunk = min(prefill_chunk, max_len)
    itemsize = 2 if dtype == "bf16" else 4
    sharded, replicated = _rank_weights(config, tp, weights, dtype, stored_float)
    weight_itemsize = {"int8": 1, "bf16": 2, "fp32": 4}[weights]
    return MemoryPlan(tp, weights, dtype, batch, max_len, chunk, sharded + replicated, sharded, replicated,
                      _cache_bytes(config, tp, batch, max_len, itemsize),
                      _activation_bytes(config, tp, batch, max_len, chunk, itemsize, weight_itemsize))

