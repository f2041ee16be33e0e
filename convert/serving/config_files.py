"""The small files of a serving export: config.json per engine, generation_config.json, the tokenizer's.

Every key an engine's Grok-1 code reads is written from the GrokConfig; where the engine has a switch that
moves its numerics away from upstream, the switch is set to upstream's (vLLM: router_logit_softcapping 0,
moe_router_renormalize false, no attn_output_multiplier; SGLang: load_presharded_moe false, lm_head
shipped). Never written, because their mere presence changes the model an engine builds: residual_moe and
moe_intermediate_size (vLLM switches to its Grok-2 class), rope_type (SGLang's YaRN-style RoPE),
attn_output_multiplier (an extra factor on the attention output in vLLM), final_logit_softcapping.
Keys read: vllm-project/vllm grok1.py @02082de9 / @048a32c7, sgl-project/sglang grok.py @031ad4ce.

`check_servable` refuses a config the engines would compute differently with no switch to fix it: both
scale attention logits by head_dim ** -0.5, vLLM derives head_dim as hidden_size / num_attention_heads.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from convert.serving.compressed import quantization_config

if TYPE_CHECKING:
    from grok_torch.config import GrokConfig

ARCHITECTURE = "Grok1ModelForCausalLM"  # the one name every vLLM registry and SGLang's entry classes map
# Lets transformers parse the file without remote code (the extra keys ride along as attributes); the
# engines pick their model class by "architectures". "llama" rather than "mixtral": transformers 5's
# AutoTokenizer honours tokenizer_config.json's tokenizer_class for llama, but for mixtral always builds a
# converted TokenizersBackend (models/auto/tokenization_auto.py of transformers 5.24), whose ids differ.
MODEL_TYPE = "llama"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# transformers >= 5 wraps the SentencePiece model itself with this class (ids identical to sentencepiece's);
# its converted "fast" LlamaTokenizer gives other ids for Grok's model (digits, runs of spaces).
TOKENIZER_CLASS = "SentencePieceBackend"
BOS_TOKEN_ID = 1  # the release tokenizer's [BOS]; upstream never adds it to a prompt


class NotServableError(ValueError):
    """A config or option combination that an engine cannot serve as upstream computes it."""


def check_servable(config: "GrokConfig", engine: str) -> None:
    head_scale = config.key_size ** -0.5
    if not math.isclose(config.attn_output_multiplier, head_scale, rel_tol=1e-9):
        raise NotServableError(
            f"{engine} scales attention logits by head_dim ** -0.5 = {head_scale:.6g} (head_dim = key_size "
            f"{config.key_size}), but this model's attn_output_multiplier is {config.attn_output_multiplier:.6g}: "
            f"the engine would compute another model (Grok-1 has key_size 128 and 128 ** -0.5)")
    if engine == "vllm" and config.emb_size != config.num_q_heads * config.key_size:
        raise NotServableError(
            f"vllm derives head_dim as hidden_size / num_attention_heads = {config.emb_size} / {config.num_q_heads}, "
            f"but this model's key_size is {config.key_size}: vllm cannot build it (Grok-1: 6144 = 48 x 128)")


def _common(config: "GrokConfig", bos_token_id: int) -> dict[str, Any]:
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size, "hidden_size": config.emb_size, "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_q_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.key_size,
        "num_local_experts": config.num_experts, "num_experts_per_tok": config.num_selected_experts,
        "max_position_embeddings": config.sequence_len, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": float(config.rope_base_exponent),
        "embedding_multiplier_scale": config.embedding_multiplier_scale,
        "output_multiplier_scale": config.output_multiplier_scale,
        "attn_logit_softcapping": config.attn_logit_softcap,
        "pad_token_id": config.pad_token, "bos_token_id": bos_token_id, "eos_token_id": config.eos_token,
        "torch_dtype": "bfloat16",
    }


def engine_config(config: "GrokConfig", engine: str, weights: str, provenance: dict[str, Any],
                  bos_token_id: int = BOS_TOKEN_ID) -> dict[str, Any]:
    """config.json for `engine` ("vllm" | "sglang") and `weights` ("bf16" | "int8"). `provenance` is kept under
    "grok_torch" (no engine reads it; convert.serving.readback does)."""
    values = _common(config, bos_token_id)
    if engine == "vllm":
        values.update({"num_experts": config.num_experts,  # vLLM's own key (V2 falls back to num_local_experts)
                       "router_logit_softcapping": 0.0,  # V2's default 30 caps the router; upstream does not
                       "moe_router_renormalize": False,  # V2's default renormalises the top-2 gates
                       "tie_word_embeddings": True})  # lm_head is the embedding, as upstream's
        if weights == "int8":
            values["quantization_config"] = quantization_config()
    elif engine == "sglang":
        values.update({"attn_logit_softcapping_method": "tanh",
                       "load_presharded_moe": False,  # else TP > 1 globs *-TP-{rank}.safetensors and finds none
                       "tie_word_embeddings": False})  # SGLang always reads lm_head.weight
    else:
        raise ValueError(f"unknown engine {engine!r}")
    values["grok_torch"] = dict(provenance)
    return values


def generation_config(config: "GrokConfig", bos_token_id: int = BOS_TOKEN_ID) -> dict[str, Any]:
    return {"bos_token_id": bos_token_id, "eos_token_id": config.eos_token, "pad_token_id": config.pad_token}


def tokenizer_config(config: "GrokConfig", special: dict[str, str]) -> dict[str, Any]:
    """tokenizer_config.json: the SentencePiece model as it is (dummy prefix kept: legacy), no BOS or EOS added
    to a prompt (upstream encodes prompts as they are). `special` = {"pad_token": "[PAD]", ...}."""
    return {"tokenizer_class": TOKENIZER_CLASS, "legacy": True, "add_bos_token": False, "add_eos_token": False,
            **special, "model_max_length": config.sequence_len, "clean_up_tokenization_spaces": False}


def json_text(values: dict[str, Any]) -> str:
    return json.dumps(values, indent=2) + "\n"
