"""grok_torch: Grok-1 in PyTorch, numerically faithful to the upstream JAX model."""

from grok_torch.config import GrokConfig
from grok_torch.generate import GenerationError, GenerationResult, generate
from grok_torch.load import LoadError, load
from grok_torch.model import Grok, KVCache
from grok_torch.tokenizer import Tokenizer, TokenizerError

__all__ = ["GrokConfig", "Grok", "KVCache", "load", "LoadError", "generate", "GenerationResult",
           "GenerationError", "Tokenizer", "TokenizerError"]
