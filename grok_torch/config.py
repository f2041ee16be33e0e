"""GrokConfig: every hyper-parameter of Grok-1, with upstream field names, and named presets.

A config is untrusted input (a config.json in someone's checkpoint folder, a converted directory from a hub):
every field is checked for its type (integers are ints, not bools, floats or strings; floats are finite
real numbers) and its range before anything is built from it, and `check_stored_bytes` bounds the model it
describes by the bytes of the checkpoint that is to fill it. Problems raise ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that cannot describe a Grok model. `field` names the field at fault (None: several, or the
    file), `problem` says what is wrong with it (the message without the file and field)."""

    def __init__(self, message: str, field: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.field, self.problem = field, problem or message


def _field_error(field: str, problem: str) -> ConfigError:
    return ConfigError(f"field {field}: {problem}", field, problem)


# Ranges of the integer fields, (smallest, largest). The upper limits are far beyond any Grok (64 layers,
# 8 experts, 131072 tokens) but keep a hostile config from describing a model that no checkpoint could fill,
# before the bound against the checkpoint's bytes applies (and where there is no checkpoint: Grok(config)).
INT_RANGES = {
    "emb_size": (1, 1 << 20), "key_size": (1, 1 << 16), "num_q_heads": (1, 1 << 16), "num_kv_heads": (1, 1 << 16),
    "num_layers": (1, 10_000), "vocab_size": (1, 1 << 24), "num_experts": (1, 10_000),
    "num_selected_experts": (1, 10_000), "pad_token": (0, 1 << 24), "eos_token": (0, 1 << 24),
    "sequence_len": (1, 1 << 24), "rope_base_exponent": (1, 1 << 40), "model_shards": (1, 1 << 16),
}
# Float fields: finite, and those named here strictly positive (a divisor, a width factor, an epsilon).
POSITIVE_FLOATS = ("widening_factor", "rms_norm_eps", "attn_logit_softcap")
MAX_WEIGHTS = 10**13  # 30 times Grok-1


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _field_error(name, f"expected an integer, got {value!r}")
    low, high = INT_RANGES[name]
    if value < low:
        raise _field_error(name, f"must be at least {low}, got {value}")
    if value > high:
        raise _field_error(name, f"must be at most {high:,}, got {value:,}")
    return int(value)


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _field_error(name, f"expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _field_error(name, f"must be finite, got {value}")
    if name in POSITIVE_FLOATS and value <= 0:
        raise _field_error(name, f"must be greater than 0, got {value}")
    return value


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
        # Each field on its own first (types, ranges), so that the relations below compute on numbers.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = _check_int(field.name, value) if field.name in INT_RANGES else _check_float(field.name, value)
            object.__setattr__(self, field.name, checked)  # numpy ints and int-valued floats become plain
        for name in ("pad_token", "eos_token"):
            if getattr(self, name) >= self.vocab_size:
                raise _field_error(name, f"must be below vocab_size={self.vocab_size}, got {getattr(self, name)}")
        problems = []
        if self.num_q_heads % self.num_kv_heads:
            problems.append(f"num_q_heads={self.num_q_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.key_size % 2:
            problems.append(f"key_size={self.key_size} must be even for RoPE")
        if not 1 <= self.num_selected_experts <= self.num_experts:
            problems.append(f"num_selected_experts={self.num_selected_experts} must be in 1..num_experts={self.num_experts}")
        if (self.num_q_heads * self.key_size) % self.model_shards:
            problems.append(f"num_q_heads*key_size={self.num_q_heads * self.key_size} is not divisible by model_shards={self.model_shards}")
        if self.widening_factor * self.emb_size > 1 << 30:
            problems.append(f"widening_factor*emb_size={self.widening_factor * self.emb_size:g} is more than 2**30")
        elif self.ffn_size <= 0:
            problems.append(f"ffn_size={self.ffn_size} (from widening_factor={self.widening_factor}) must be positive")
        elif self.ffn_size % self.model_shards:
            problems.append(f"ffn_size={self.ffn_size} is not divisible by model_shards={self.model_shards}")
        if not problems and self.num_parameters() > MAX_WEIGHTS:
            problems.append(f"it describes {self.num_parameters():,} weights, more than {MAX_WEIGHTS:,}")
        if problems:
            raise ConfigError("invalid GrokConfig: " + "; ".join(problems))

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

    def check_stored_bytes(self, nbytes: int, what: str) -> None:
        """ConfigError unless `what`, holding `nbytes` bytes, can hold this model's weights: every weight takes
        at least one byte (int8), so a config describing more weights than that is not this checkpoint's."""
        weights = self.num_parameters()
        if weights > nbytes:
            raise ConfigError(f"the config describes {weights:,} weights, which need at least 1 byte per weight, but "
                              f"there are only {nbytes:,} bytes in {what} (num_layers={self.num_layers}, emb_size="
                              f"{self.emb_size}, vocab_size={self.vocab_size}): not the config of this checkpoint")

    @classmethod
    def from_dict(cls, values: Any) -> "GrokConfig":
        """Build from upstream-named keys; unknown keys (golden metadata, comments) are ignored. Every field is
        checked (ConfigError naming it) before anything is built."""
        if not isinstance(values, dict):
            raise ConfigError(f"not a JSON object ({_type_name(values)}); expected {{\"emb_size\": ..., ...}}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in kwargs and f.default is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"missing required field(s): {', '.join(missing)}")
        config = cls(**kwargs)
        if "ffn_size" in values and (isinstance(values["ffn_size"], bool) or values["ffn_size"] != config.ffn_size):
            raise _field_error("ffn_size", f"states {values['ffn_size']!r} but widening_factor="
                                           f"{config.widening_factor} gives {config.ffn_size}")
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "GrokConfig":
        """A JSON file with upstream field names, or a converted directory's config.json (its grok_config).
        Only a regular file of at most 16 MiB is read; every problem is a ConfigError naming the file."""
        from grok_torch.untrusted_files import read_json

        path = Path(path)
        values, _ = read_json(path, "config", ConfigError)
        if isinstance(values, dict) and "grok_config" in values:  # a converted directory's config.json
            values = values["grok_config"]
        try:
            return cls.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}", err.field, err.problem) from None

    @classmethod
    def resolve(cls, name_or_path: str) -> "GrokConfig":
        """A preset name, or a path to a JSON file with upstream field names."""
        if name_or_path in PRESETS:
            return cls.from_name(name_or_path)
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if path.exists() or path.is_symlink():  # whatever it is: from_json reads only a regular file
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

def _type_name(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


assert math.isclose(_GROK1.attn_output_multiplier, 1 / math.sqrt(128))
