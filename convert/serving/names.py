"""The grok_torch <-> serving-engine tensor name tables: one per target layout (vLLM's, SGLang's), as data.

A row maps one grok_torch tensor (convert.upstream.param_names' `torch_name`, `{layer}` for layer rows) to
the name under which the engine's Grok-1 loader reads it (`{expert}` for per-expert tensors: the engines
read each expert as its own tensor, never an `[E, ...]` stack). A grok_torch tensor may feed several engine
tensors (SGLang's untied `lm_head.weight` is the embedding again); every engine name comes from exactly one
row. `expand(config, table)` lists every engine tensor of a config in write order; `to_ours(name, table)` is
the inverse; both raise UnknownTensorError naming what they do not know, so the mapping is total both ways.

Linear rows name the engine's `.weight`; how a quantized linear is stored under that prefix
(`weight_packed`, `weight_scale`, `weight_shape`) is convert.serving.compressed's.

Checked against (read at these commits; shared/grok1/ENGINES.md has the details):
- vLLM: vllm-project/vllm vllm/model_executor/models/grok1.py @02082de9 (Grok-1 only) and @048a32c7 (the
  Grok-1/Grok-2 dispatcher): `Grok1Model.load_weights` renames q/k/v_proj to qkv_proj, maps
  `experts.{e}.linear.` / `linear_v.` / `linear_1.` (FusedMoE.make_expert_params_mapping with
  ckpt names linear, linear_1, linear_v) to `experts.w13_` / `w13_` / `w2_`, and reads
  `moe_block.gate`, the four `*_norm` and `model.norm` as they are; `lm_head` is skipped when
  tie_word_embeddings is true.
- SGLang: sgl-project/sglang python/sglang/srt/models/grok.py @031ad4ce: the attention module is
  `self_attn`, the MoE `block_sparse_moe` with experts `w1` (gate, the GELU input), `w3` (up), `w2` (down),
  the gate an fp32 parameter; `lm_head.weight` is always read (never tied) and every parameter without
  "scale" in its name must be loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from convert.upstream.param_names import ParamEntry, UnknownParameterError, checkpoint_layout

if TYPE_CHECKING:
    from grok_torch.config import GrokConfig

ENGINES = ("vllm", "sglang")


class UnknownTensorError(UnknownParameterError):
    """A tensor name that a serving table does not know, in either direction."""


@dataclass(frozen=True)
class Row:
    ours: str  # grok_torch tensor name
    engine: str  # the engine's checkpoint name


@dataclass(frozen=True)
class EngineTable:
    engine: str
    rows: tuple[Row, ...]
    checked_against: str  # engine loader source and commit(s) read


def _layer_rows(attn: str, moe: str, gate: str, up: str, down: str) -> tuple[Row, ...]:
    """The rows of one decoder layer, for an engine whose attention module is `attn`, MoE module `moe` and
    expert linears `gate` (upstream `linear`, the GELU input), `up` (`linear_v`) and `down` (`linear_1`)."""
    layer, model = "layers.{layer}.", "model.layers.{layer}."
    return (
        Row(layer + "pre_attn_norm.weight", model + "pre_attn_norm.weight"),
        Row(layer + "attn.q_proj.weight", model + f"{attn}.q_proj.weight"),
        Row(layer + "attn.k_proj.weight", model + f"{attn}.k_proj.weight"),
        Row(layer + "attn.v_proj.weight", model + f"{attn}.v_proj.weight"),
        Row(layer + "attn.o_proj.weight", model + f"{attn}.o_proj.weight"),
        Row(layer + "post_attn_norm.weight", model + "post_attn_norm.weight"),
        Row(layer + "pre_moe_norm.weight", model + "pre_moe_norm.weight"),
        Row(layer + "moe.router.weight", model + f"{moe}.gate.weight"),
        Row(layer + "moe.gate_proj.weight", model + f"{moe}.experts.{{expert}}.{gate}.weight"),
        Row(layer + "moe.up_proj.weight", model + f"{moe}.experts.{{expert}}.{up}.weight"),
        Row(layer + "moe.down_proj.weight", model + f"{moe}.experts.{{expert}}.{down}.weight"),
        Row(layer + "post_moe_norm.weight", model + "post_moe_norm.weight"),
    )


VLLM = EngineTable(
    "vllm",
    (Row("embedding.weight", "model.embed_tokens.weight"),
     *_layer_rows("attn", "moe_block", gate="linear", up="linear_v", down="linear_1"),
     Row("norm.weight", "model.norm.weight")),  # lm_head: tied to the embedding (tie_word_embeddings true)
    "vllm-project/vllm vllm/model_executor/models/grok1.py @02082de9 and @048a32c7",
)

SGLANG = EngineTable(
    "sglang",
    (Row("embedding.weight", "model.embed_tokens.weight"),
     *_layer_rows("self_attn", "block_sparse_moe", gate="w1", up="w3", down="w2"),
     Row("norm.weight", "model.norm.weight"),
     Row("embedding.weight", "lm_head.weight")),  # SGLang never ties: the embedding again
    "sgl-project/sglang python/sglang/srt/models/grok.py @031ad4ce",
)

TABLES = {table.engine: table for table in (VLLM, SGLANG)}


def table_for(engine: str) -> EngineTable:
    if engine not in TABLES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    return TABLES[engine]


@dataclass(frozen=True)
class EngineTensor:
    """One engine tensor of a config: its name, the grok_torch parameter it comes from, and which expert of
    a stacked `[E, out, in]` parameter (None for the others)."""

    name: str
    source: ParamEntry
    expert: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (float) shape: `[out, in]` of one expert for a stacked parameter."""
        return self.source.torch_shape[1:] if self.expert is not None else self.source.torch_shape


def _ours_template(name: str, layer: int | None) -> str:
    return name if layer is None else name.replace(f"layers.{layer}.", "layers.{layer}.", 1)


def _check_total(table: EngineTable, layout: list[ParamEntry]) -> None:
    """Every grok_torch parameter has a row, every row a grok_torch parameter."""
    ours = {_ours_template(e.torch_name, e.layer) for e in layout}
    rows = {row.ours for row in table.rows}
    if ours - rows:
        raise UnknownTensorError(f"the {table.engine} table has no row for grok_torch tensor(s) "
                                 f"{', '.join(sorted(ours - rows))}")
    if rows - ours:
        raise UnknownTensorError(f"the {table.engine} table names grok_torch tensor(s) that do not exist: "
                                 f"{', '.join(sorted(rows - ours))}")


def expand(config: "GrokConfig", table: EngineTable) -> list[EngineTensor]:
    """Every engine tensor of `config`, in write order: the table's rows, layers in numeric order, experts
    0..E-1 (as the engines' own checkpoints are laid out, so that a shard holds whole layers)."""
    layout = checkpoint_layout(config)
    _check_total(table, layout)
    by_name = {e.torch_name: e for e in layout}
    tensors = []
    in_layer = [i for i, row in enumerate(table.rows) if "{layer}" in row.ours]
    first, layer_rows, last = (table.rows[:in_layer[0]], table.rows[in_layer[0]:in_layer[-1] + 1],
                               table.rows[in_layer[-1] + 1:])
    for row in first:
        tensors.append(EngineTensor(row.engine, by_name[row.ours], None))
    for layer in range(config.num_layers):
        for row in layer_rows:
            entry = by_name[row.ours.format(layer=layer)]
            engine = row.engine.replace("{layer}", str(layer))
            if "{expert}" in engine:
                tensors += [EngineTensor(engine.format(expert=e), entry, e) for e in range(config.num_experts)]
            else:
                tensors.append(EngineTensor(engine, entry, None))
    for row in last:
        tensors.append(EngineTensor(row.engine, by_name[row.ours], None))
    return tensors


def _pattern(engine_name: str) -> re.Pattern:
    text = re.escape(engine_name).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(f"^{text}$")


def to_ours(name: str, table: EngineTable) -> tuple[str, int | None]:
    """An engine tensor name -> (grok_torch tensor name, expert or None); UnknownTensorError if no row has it.
    `model.layers.3.moe_block.experts.5.linear_1.weight` -> (`layers.3.moe.down_proj.weight`, 5)."""
    for row in table.rows:
        match = _pattern(row.engine).match(name)
        if match:
            groups = match.groupdict()
            ours = row.ours.format(layer=int(groups["layer"])) if "layer" in groups else row.ours
            return ours, (int(groups["expert"]) if "expert" in groups else None)
    raise UnknownTensorError(f"unknown {table.engine} tensor {name}: not in grok-torch's {table.engine} name table")
