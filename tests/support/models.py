"""Models for tests that need one whose output depends on its context."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from grok_torch.config import GrokConfig
from grok_torch.model import Grok

# Prompts of different lengths (a left-padded batch).
PROMPTS = [[5, 17, 300, 42, 7, 99, 12], [8, 400], [31, 32, 33, 34]]


def random_model(config: GrokConfig, seed: int = 0) -> Grok:
    """A tiny fp32 model with seeded random weights whose next token depends on its context.

    Not parity.init's upstream-style init on purpose: with tied embeddings, naive random weights make
    the embedding of the last token dominate the residual stream, and the model only ever repeats
    it, which would make every check here vacuous (a cache bug could not change the output). Small
    embeddings and large post-norm scales let attention and the experts decide.
    """
    generator = torch.Generator().manual_seed(seed)
    model = Grok(config, weights="fp32", dtype="fp32")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("post_attn_norm.weight", "post_moe_norm.weight")):
                param.uniform_(5.0, 10.0, generator=generator)
            elif name == "norm.weight":
                param.uniform_(10.0, 20.0, generator=generator)
            elif name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5, generator=generator)
            elif name == "embedding.weight":
                param.normal_(0.0, 0.01, generator=generator)
            else:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]), generator=generator)
    return model.eval()


def write_converted(directory: Path, model: Grok) -> None:
    """`model`'s tensors as a one-shard converted directory (grok_torch.converted_dir's format)."""
    from safetensors.torch import save_file

    from grok_torch.converted_dir import (CONFIG_FILE, INDEX_FILE, config_text, config_values, index_text,
                                          shard_file_name, shard_metadata)

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    weight_format = "fp32" if model.embedding.weight.dtype == torch.float32 else "bf16"
    shard = shard_file_name(1, 1)
    directory.mkdir()
    save_file(state, str(directory / shard), metadata=shard_metadata(weight_format, "test"))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / INDEX_FILE).write_text(index_text({name: shard for name in state}, total, {"weight_format": weight_format}))
    quantized = {name: False for name in state if name.endswith("_proj.weight")}
    (directory / CONFIG_FILE).write_text(config_text(config_values(model.config, weight_format, "test", quantized)))
