"""grok_torch: Grok-1 in PyTorch, numerically faithful to the upstream JAX model."""

from grok_torch.config import GrokConfig
from grok_torch.load import load
from grok_torch.model import Grok, KVCache

__all__ = ["GrokConfig", "Grok", "KVCache", "load"]
