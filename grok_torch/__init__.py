"""grok_torch: Grok-1 in PyTorch, numerically faithful to the upstream JAX model.

The names below are imported on first use (PEP 562), so that `grok-torch convert`, `inspect` and `--help`
start without loading torch (about 2 s); `from grok_torch import Grok` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from grok_torch.config import ConfigError, GrokConfig

_LAZY = {
    "Grok": "grok_torch.model", "KVCache": "grok_torch.model",
    "load": "grok_torch.loading", "from_state_dict": "grok_torch.loading", "LoadError": "grok_torch.converted_dir",
    "generate": "grok_torch.generation", "GenerationResult": "grok_torch.generation",
    "GenerationError": "grok_torch.generation",
    "Tokenizer": "grok_torch.tokenizer", "TokenizerError": "grok_torch.tokenizer",
}

__all__ = ["GrokConfig", "ConfigError", *_LAZY]

if TYPE_CHECKING:
    from grok_torch.generation import GenerationError, GenerationResult, generate
    from grok_torch.converted_dir import LoadError
    from grok_torch.loading import from_state_dict, load
    from grok_torch.model import Grok, KVCache
    from grok_torch.tokenizer import Tokenizer, TokenizerError


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'grok_torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
