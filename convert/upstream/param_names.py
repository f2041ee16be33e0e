"""The haiku <-> grok_torch parameter name table, and the checkpoint's file order.

The table is data: one row per parameter kind, total in both directions. `checkpoint_layout(config)`
expands it for a config into the list of parameters in the order of the raw checkpoint's files
(JAX flattens dicts sorted by key, so layers come 0, 1, 10, 11, ..., 2, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from convert.upstream.layouts import LAYOUTS, SCALES_LAYOUT

if TYPE_CHECKING:
    from grok_torch.config import GrokConfig


class UnknownParameterError(KeyError):
    """A parameter name that the table does not know, in either direction."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


@dataclass(frozen=True)
class NameRule:
    haiku_module: str  # relative to `transformer/decoder_layer_{L}/` for layer rows
    haiku_param: str
    torch_name: str  # relative to `layers.{L}.` for layer rows
    layout: str  # a key of convert.upstream.layouts.LAYOUTS
    kind: str  # embedding | norm | linear | expert_linear | router
    grouped_scales: bool = False  # scales grouped along the input axis (G = model_shards)
    # Upstream's effective float weight is bf16(int8 * scale) everywhere except the MoE down
    # projection, whose product XLA keeps exact in fp32 (measured against the golden reference:
    # 99.8 % bit-exact MoE outputs with the exact product, 62 % with the bf16-rounded one).
    dequant_rounds_to_bf16: bool = True


HAIKU_PREFIX_TOP = "language_model/"
HAIKU_LAYER_PREFIX = "transformer/decoder_layer_{layer}/"
TORCH_LAYER_PREFIX = "layers.{layer}."

TOP_LEVEL_RULES: tuple[NameRule, ...] = (
    NameRule("in_out_embed", "embeddings", "embedding.weight", "identity", "embedding"),
    NameRule("rms_norm", "scale", "norm.weight", "identity", "norm"),
)

LAYER_RULES: tuple[NameRule, ...] = (
    NameRule("moe/linear", "w", "moe.gate_proj.weight", "linear", "expert_linear"),
    NameRule("moe/linear_1", "w", "moe.down_proj.weight", "linear", "expert_linear", grouped_scales=True,
             dequant_rounds_to_bf16=False),
    NameRule("moe/linear_v", "w", "moe.up_proj.weight", "linear", "expert_linear"),
    NameRule("multi_head_attention/key", "w", "attn.k_proj.weight", "linear", "linear"),
    NameRule("multi_head_attention/linear", "w", "attn.o_proj.weight", "linear", "linear", grouped_scales=True),
    NameRule("multi_head_attention/query", "w", "attn.q_proj.weight", "linear", "linear"),
    NameRule("multi_head_attention/value", "w", "attn.v_proj.weight", "linear", "linear"),
    NameRule("rms_norm", "scale", "pre_attn_norm.weight", "identity", "norm"),
    NameRule("rms_norm_1", "scale", "post_attn_norm.weight", "identity", "norm"),
    NameRule("rms_norm_2", "scale", "pre_moe_norm.weight", "identity", "norm"),
    NameRule("rms_norm_3", "scale", "post_moe_norm.weight", "identity", "norm"),
    NameRule("router", "w", "moe.router.weight", "router", "router"),
)

QUANTIZABLE_KINDS = frozenset({"linear", "expert_linear"})


def scales_name(torch_weight_name: str) -> str:
    """`...q_proj.weight` -> `...q_proj.scales`: where a quantized weight keeps its scales."""
    return torch_weight_name[: -len("weight")] + "scales"


@dataclass(frozen=True)
class ParamEntry:
    """One parameter of a config, with names and shapes on both sides."""

    index: int  # file index in the raw checkpoint: tensor{index:05d}_000
    haiku_module: str  # e.g. transformer/decoder_layer_3/multi_head_attention/query
    haiku_param: str  # e.g. w
    torch_name: str  # e.g. layers.3.attn.q_proj.weight
    rule: NameRule
    layer: int | None
    haiku_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    scale_groups: int  # G when stored quantized; 0 for parameters that are never quantized

    @property
    def haiku_name(self) -> str:
        return f"{self.haiku_module}/{self.haiku_param}"

    @property
    def kind(self) -> str:
        return self.rule.kind

    @property
    def quantizable(self) -> bool:
        return self.rule.kind in QUANTIZABLE_KINDS

    @property
    def torch_scales_name(self) -> str | None:
        return scales_name(self.torch_name) if self.quantizable else None

    @property
    def haiku_scales_shape(self) -> tuple[int, ...] | None:
        if not self.quantizable:
            return None
        *lead, _, out = self.haiku_shape
        return (*lead, self.scale_groups, out)

    @property
    def torch_scales_shape(self) -> tuple[int, ...] | None:
        if not self.quantizable:
            return None
        *lead, out, _ = self.torch_shape
        return (*lead, out, self.scale_groups)

    def to_torch(self, array):
        return LAYOUTS[self.rule.layout][0](array)

    def to_haiku(self, array):
        return LAYOUTS[self.rule.layout][1](array)

    @staticmethod
    def scales_to_torch(scales):
        return SCALES_LAYOUT[0](scales)

    @staticmethod
    def scales_to_haiku(scales):
        return SCALES_LAYOUT[1](scales)


def _haiku_shape(rule: NameRule, config: "GrokConfig") -> tuple[int, ...]:
    d, f, e = config.emb_size, config.ffn_size, config.num_experts
    q, kv = config.num_q_heads * config.key_size, config.num_kv_heads * config.key_size
    shapes = {
        "in_out_embed": (config.vocab_size, d),
        "moe/linear": (e, d, f),
        "moe/linear_1": (e, f, d),
        "moe/linear_v": (e, d, f),
        "multi_head_attention/key": (d, kv),
        "multi_head_attention/linear": (q, d),
        "multi_head_attention/query": (d, q),
        "multi_head_attention/value": (d, kv),
        "router": (d, e),
    }
    return shapes.get(rule.haiku_module, (d,))  # every other row is an RMSNorm scale


def parameter_count(config: "GrokConfig") -> int:
    """How many parameters (raw checkpoint files) `config` has, without building the layout."""
    return len(TOP_LEVEL_RULES) + config.num_layers * len(LAYER_RULES)


def checkpoint_layout(config: "GrokConfig") -> list[ParamEntry]:
    """Every parameter of `config`, in raw-checkpoint file order (the sorted haiku tree)."""
    rows: list[tuple[str, str, str, NameRule, int | None]] = []
    for rule in TOP_LEVEL_RULES:
        rows.append((HAIKU_PREFIX_TOP + rule.haiku_module, rule.haiku_param, rule.torch_name, rule, None))
    for layer in range(config.num_layers):
        for rule in LAYER_RULES:
            rows.append((HAIKU_LAYER_PREFIX.format(layer=layer) + rule.haiku_module, rule.haiku_param,
                         TORCH_LAYER_PREFIX.format(layer=layer) + rule.torch_name, rule, layer))
    # JAX sorts dict keys: module paths first, then parameter names inside a module.
    rows.sort(key=lambda row: (row[0], row[1]))
    entries = []
    for index, (module, param, torch_name, rule, layer) in enumerate(rows):
        haiku_shape = _haiku_shape(rule, config)
        groups = (config.model_shards if rule.grouped_scales else 1) if rule.kind in QUANTIZABLE_KINDS else 0
        entries.append(ParamEntry(index, module, param, torch_name, rule, layer, haiku_shape,
                                  tuple(LAYOUTS[rule.layout][0](_ShapeOnly(haiku_shape)).shape), groups))
    return entries


class _ShapeOnly:
    """Stand-in array that lets a layout function compute a shape without data."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)

    def swapaxes(self, a: int, b: int) -> "_ShapeOnly":
        shape = list(self.shape)
        shape[a], shape[b] = shape[b], shape[a]
        return _ShapeOnly(tuple(shape))


_LAYER_HAIKU = re.compile(r"^transformer/decoder_layer_(\d+)/(.+)$")
_LAYER_TORCH = re.compile(r"^layers\.(\d+)\.(.+)$")
_HAIKU_TO_TORCH = {(r.haiku_module, r.haiku_param): r for r in LAYER_RULES}
_TORCH_TO_HAIKU = {r.torch_name: r for r in LAYER_RULES}
_TOP_HAIKU = {(HAIKU_PREFIX_TOP + r.haiku_module, r.haiku_param): r for r in TOP_LEVEL_RULES}
_TOP_TORCH = {r.torch_name: r for r in TOP_LEVEL_RULES}


def haiku_to_torch_name(module: str, param: str) -> str:
    """`transformer/decoder_layer_3/router`, `w` -> `layers.3.moe.router.weight`.

    A leading `params/` (how the checkpoint's TrainingState names the tree) is accepted.
    """
    module = module.removeprefix("params/")
    if (module, param) in _TOP_HAIKU:
        return _TOP_HAIKU[(module, param)].torch_name
    match = _LAYER_HAIKU.match(module)
    if match and (match.group(2), param) in _HAIKU_TO_TORCH:
        return TORCH_LAYER_PREFIX.format(layer=int(match.group(1))) + _HAIKU_TO_TORCH[(match.group(2), param)].torch_name
    raise UnknownParameterError(f"unknown haiku parameter {module}/{param}: not in the grok-torch name table")


def torch_to_haiku_name(name: str) -> tuple[str, str]:
    """`layers.3.moe.router.weight` -> (`transformer/decoder_layer_3/router`, `w`). Scales map to their weight."""
    weight_name = name[: -len("scales")] + "weight" if name.endswith(".scales") else name
    if weight_name in _TOP_TORCH:
        rule = _TOP_TORCH[weight_name]
        return HAIKU_PREFIX_TOP + rule.haiku_module, rule.haiku_param
    match = _LAYER_TORCH.match(weight_name)
    if match and match.group(2) in _TORCH_TO_HAIKU:
        rule = _TORCH_TO_HAIKU[match.group(2)]
        if name.endswith(".scales") and rule.kind not in QUANTIZABLE_KINDS:
            raise UnknownParameterError(f"unknown grok_torch tensor {name}: {weight_name} is never quantized")
        return HAIKU_LAYER_PREFIX.format(layer=int(match.group(1))) + rule.haiku_module, rule.haiku_param
    raise UnknownParameterError(f"unknown grok_torch tensor {name}: not in the grok-torch name table")
