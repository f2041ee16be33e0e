"""grok_torch: Grok-1 in PyTorch, numerically faithful to the upstream JAX model."""

from grok_torch.config import GrokConfig

__all__ = ["GrokConfig"]
