"""GrokConfig: every hyper-parameter of Grok-1, with upstream field names, and named presets."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GrokConfig:
    emb_size: int
    key_size: int
    num_q_heads: int
    num_kv_heads: int
    num_layers: int
    vocab_size: int = 131072
    widening_factor: float = 8.0
    num_experts: int = 8
    num_selected_experts: int = 2
    attn_output_multiplier: float = 0.08838834764831845
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    pad_token: int = 0
    eos_token: int = 2
    sequence_len: int = 8192
    rms_norm_eps: float = 1e-5
    rope_base_exponent: int = 10000
    attn_logit_softcap: float = 30.0
    # Rows of grouped scales on the contracting axis of attention `linear` and moe `linear_1`:
    # one per shard of the original 8-way tensor-parallel mesh.
    model_shards: int = 8

    def __post_init__(self) -> None:
        problems = []
        if self.num_q_heads % self.num_kv_heads:
            problems.append(f"num_q_heads={self.num_q_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.key_size % 2:
            problems.append(f"key_size={self.key_size} must be even for RoPE")
        if not 1 <= self.num_selected_experts <= self.num_experts:
            problems.append(f"num_selected_experts={self.num_selected_experts} must be in 1..num_experts={self.num_experts}")
        if (self.num_q_heads * self.key_size) % self.model_shards:
            problems.append(f"num_q_heads*key_size={self.num_q_heads * self.key_size} is not divisible by model_shards={self.model_shards}")
        if self.ffn_size % self.model_shards:
            problems.append(f"ffn_size={self.ffn_size} is not divisible by model_shards={self.model_shards}")
        for name in ("emb_size", "key_size", "num_q_heads", "num_kv_heads", "num_layers", "vocab_size", "sequence_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid GrokConfig: " + "; ".join(problems))

    @property
    def ffn_size(self) -> int:
        """Upstream's rule: int(widening_factor * D) * 2 // 3, rounded up to a multiple of 8."""
        size = int(self.widening_factor * self.emb_size) * 2 // 3
        return size + (8 - size) % 8

    @property
    def q_heads_per_kv_head(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def num_parameters(self) -> int:
        """Weight elements of the model (quantization scales not counted)."""
        d, f, e = self.emb_size, self.ffn_size, self.num_experts
        attn = d * self.num_q_heads * self.key_size * 2 + d * self.num_kv_heads * self.key_size * 2
        per_layer = attn + 4 * d + d * e + 3 * e * d * f
        return self.vocab_size * d + d + self.num_layers * per_layer

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "GrokConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown GrokConfig preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GrokConfig":
        """Build from upstream-named keys; unknown keys (golden metadata, comments) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in kwargs and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"config is missing required field(s): {', '.join(missing)}")
        if "ffn_size" in values and values["ffn_size"] != cls(**kwargs).ffn_size:
            raise ValueError(f"config states ffn_size={values['ffn_size']} but widening_factor="
                             f"{kwargs.get('widening_factor')} gives {cls(**kwargs).ffn_size}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "GrokConfig":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read config {path}: {err}") from err
        if "grok_config" in values:  # a converted directory's config.json
            values = values["grok_config"]
        try:
            return cls.from_dict(values)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def resolve(cls, name_or_path: str) -> "GrokConfig":
        """A preset name, or a path to a JSON file with upstream field names."""
        if name_or_path in PRESETS:
            return cls.from_name(name_or_path)
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if path.exists():
            return cls.from_json(path)
        raise ValueError(f"--config {name_or_path!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                         f"nor an existing JSON file")

    def differences(self, other: "GrokConfig") -> list[str]:
        """The fields in which `other` differs, as "name: self's value != other's value" (for messages that
        name what differs instead of printing both configs whole)."""
        return [f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["ffn_size"] = self.ffn_size  # derived; written for readers, checked on load
        return values

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


_GROK1 = GrokConfig(emb_size=6144, key_size=128, num_q_heads=48, num_kv_heads=8, num_layers=64)

PRESETS: dict[str, GrokConfig] = {
    # The released 314B model.
    "grok-1": _GROK1,
    # The configuration of ../shared/golden/upstream-12l.
    "golden-12l": dataclasses.replace(_GROK1, emb_size=64, key_size=16, num_q_heads=16, num_kv_heads=8,
                                      num_layers=12, vocab_size=512, sequence_len=16),
    # Small test presets: real multipliers, tiny widths.
    "tiny": dataclasses.replace(_GROK1, emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2,
                                num_layers=2, vocab_size=512, sequence_len=512),
    "small": dataclasses.replace(_GROK1, emb_size=128, key_size=32, num_q_heads=8, num_kv_heads=2,
                                 num_layers=4, vocab_size=1024, sequence_len=1024),
    "tiny-1l": dataclasses.replace(_GROK1, emb_size=48, key_size=8, num_q_heads=6, num_kv_heads=3,
                                   num_layers=1, vocab_size=256, sequence_len=512),
    "tiny-12l": dataclasses.replace(_GROK1, emb_size=32, key_size=8, num_q_heads=4, num_kv_heads=1,
                                    num_layers=12, vocab_size=256, sequence_len=512),
    # The demo's model: tiny widths with the real vocabulary, so the release's tokenizer fits it.
    "demo": dataclasses.replace(_GROK1, emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2,
                                num_layers=2, sequence_len=256),
    # The smallest shape vLLM and SGLang serve as upstream computes (head_dim 128 = hidden / heads) with
    # compressed-tensors int8 (every scale group a multiple of 128 wide): export-serving's tests.
    "tiny-serving": dataclasses.replace(_GROK1, emb_size=1024, key_size=128, num_q_heads=8, num_kv_heads=2,
                                        num_layers=2, vocab_size=512, widening_factor=1.5, num_experts=2,
                                        sequence_len=256),
    # Synthetic checkpoint preset matching the real width, used by the benchmarks.
    "grok-1-width-1l": dataclasses.replace(_GROK1, num_layers=1),
}

assert math.isclose(_GROK1.attn_output_multiplier, 1 / math.sqrt(128))
