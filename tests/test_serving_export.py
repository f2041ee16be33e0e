"""export-serving: the engines' names, shapes, dtypes and config keys, and the weights read back exactly.

The source is parity.init's seeded random weights for the `tiny-serving` config, written in the official
format by export-upstream and converted to int8. The engines' side is written here as data, from their
loader code (vllm-project/vllm grok1.py @048a32c7, sgl-project/sglang grok.py @031ad4ce): the parameters
their Grok-1 model registers, and the renaming their load_weights applies to a checkpoint name. Every
exported tensor must land in exactly one registered parameter slot with the shape that slot takes, and
every slot must be filled (nothing missing, nothing the loader would skip). The int8 export is decoded
with the compressed-tensors library's own decompressor and compared bit for bit with upstream's
dequantization of the original int8 weights.
"""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import grok_torch
from convert.converter import convert_checkpoint
from convert.serving import names as serving_names
from convert.serving.config_files import NotServableError
from convert.serving.exporter import export_serving
from convert.serving.readback import read_engine_tensors, read_export
from grok_torch.cli import main
from grok_torch.config import GrokConfig
from support.checkpoints import golden_config, random_conversion, sha256_tree

CONFIG = GrokConfig.from_name("tiny-serving")
SHARD = 20_000_000


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    converted, params = random_conversion(tmp_path_factory.mktemp("serving-src"), CONFIG)
    return converted, params


@pytest.fixture(scope="module")
def exports(source, tmp_path_factory):
    converted, _ = source
    before = sha256_tree(converted)
    root = tmp_path_factory.mktemp("serving-out")
    out = {}
    for engine, weights in (("vllm", "bf16"), ("vllm", "int8"), ("sglang", "bf16")):
        out[engine, weights] = export_serving(converted, root / f"{engine}-{weights}", engine=engine, weights=weights,
                                              max_shard_size=SHARD, progress=False).dst
    assert sha256_tree(converted) == before  # the source is only read
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


# ---- the engines' loaders, as data ------------------------------------------------------------------------------

def vllm_load(name: str, c: GrokConfig):
    """vllm Grok1Model.load_weights: checkpoint name -> (parameter, shard id, expert id); None if skipped."""
    if name.startswith("lm_head"):
        return None  # tie_word_embeddings: skipped
    for shard in ("q_proj", "k_proj", "v_proj"):
        if shard in name:
            return name.replace(shard, "qkv_proj"), shard[0], None
    for e in range(c.num_experts):  # FusedMoE.make_expert_params_mapping(linear, linear_1, linear_v)
        for ckpt, param, shard in (("linear", "experts.w13_", "w1"), ("linear_1", "experts.w2_", "w2"),
                                   ("linear_v", "experts.w13_", "w3")):
            if f"experts.{e}.{ckpt}." in name:
                return name.replace(f"experts.{e}.{ckpt}.", param), shard, e
    if "norm.scale" in name:
        name = name.replace("scale", "weight")
    return name, None, None


def sglang_load(name: str, c: GrokConfig):
    """sglang Grok1ForCausalLM.load_weights: checkpoint name -> (parameter, shard id, expert id)."""
    for shard in ("q_proj", "k_proj", "v_proj"):
        if shard in name:
            return name.replace(shard, "qkv_proj"), shard[0], None
    for e in range(c.num_experts):  # make_expert_params_mapping(w1, w2, w3)
        for ckpt, param in (("w1", "experts.w13_"), ("w2", "experts.w2_"), ("w3", "experts.w13_")):
            if f"experts.{e}.{ckpt}." in name:
                return name.replace(f"experts.{e}.{ckpt}.", param), ckpt, e
    return name, None, None


def engine_slots(engine: str, c: GrokConfig, int8: bool) -> dict[tuple, tuple[str, tuple[int, ...]]]:
    """(parameter, shard, expert) -> (dtype written, [out, in] of what the slot loads), every slot of the model."""
    d, f, v, e = c.emb_size, c.ffn_size, c.vocab_size, c.num_experts
    q, kv = c.num_q_heads * c.key_size, c.num_kv_heads * c.key_size
    attn, moe = ("attn", "moe_block") if engine == "vllm" else ("self_attn", "block_sparse_moe")
    gate, up = ("w1", "w3")
    slots: dict[tuple, tuple[str, tuple[int, ...]]] = {}

    def linear(param: str, shard, expert, out_features: int, in_features: int) -> None:
        if int8:  # compressed-tensors WNA16: weight_packed int32, weight_scale bf16 (group 128), weight_shape int64
            slots[param + "_packed", shard, expert] = ("int32", (out_features, in_features // 4))
            slots[param + "_scale", shard, expert] = ("bfloat16", (out_features, in_features // 128))
            slots[param + "_shape", shard, expert] = ("int64", (2,))
        else:
            slots[param, shard, expert] = ("bfloat16", (out_features, in_features))

    slots["model.embed_tokens.weight", None, None] = ("bfloat16", (v, d))
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        for shard, rows in (("q", q), ("k", kv), ("v", kv)):
            linear(p + f"{attn}.qkv_proj.weight", shard, None, rows, d)
        linear(p + f"{attn}.o_proj.weight", None, None, d, q)
        slots[p + f"{moe}.gate.weight", None, None] = ("float32", (e, d))
        for x in range(e):
            linear(p + f"{moe}.experts.w13_weight", gate, x, f, d)
            linear(p + f"{moe}.experts.w13_weight", up, x, f, d)
            linear(p + f"{moe}.experts.w2_weight", "w2", x, d, f)
        for norm in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
            slots[p + f"{norm}.weight", None, None] = ("float32", (d,))
    slots["model.norm.weight", None, None] = ("float32", (d,))
    if engine == "sglang":
        slots["lm_head.weight", None, None] = ("bfloat16", (v, d))  # never tied; required
    return slots


# which upstream parameter each slot of the engine computes with (upstream's own names, per the engines' code)
UPSTREAM = {("qkv_proj.weight", "q"): "multi_head_attention/query", ("qkv_proj.weight", "k"): "multi_head_attention/key",
            ("qkv_proj.weight", "v"): "multi_head_attention/value", ("o_proj.weight", None): "multi_head_attention/linear",
            ("gate.weight", None): "router", ("w13_weight", "w1"): "moe/linear", ("w13_weight", "w3"): "moe/linear_v",
            ("w2_weight", "w2"): "moe/linear_1", ("pre_attn_norm.weight", None): "rms_norm",
            ("post_attn_norm.weight", None): "rms_norm_1", ("pre_moe_norm.weight", None): "rms_norm_2",
            ("post_moe_norm.weight", None): "rms_norm_3"}


def upstream_effective(slot: tuple, params: dict) -> np.ndarray:
    """What upstream computes with for an engine slot, [out, in] in the engine's layout: bf16(int8 x scale) for
    a linear (upstream's `weight.astype(bf16) * scales`), the fp32 router and norms, the embedding in bf16."""
    param, shard, expert = slot
    param = param.removesuffix("_packed")
    if param in ("model.embed_tokens.weight", "lm_head.weight"):
        return params["language_model/in_out_embed"]["embeddings"].astype(ml_dtypes.bfloat16)
    if param == "model.norm.weight":
        return params["language_model/rms_norm"]["scale"]
    layer = int(param.split(".")[2])
    key = next(k for k in UPSTREAM if param.endswith("." + k[0]) and k[1] == shard)
    leaves = params[f"transformer/decoder_layer_{layer}/{UPSTREAM[key]}"]
    if "scale" in leaves:
        return leaves["scale"]
    leaf = leaves["w"]
    if not hasattr(leaf, "scales"):  # the router: fp32 [D, E]
        return np.ascontiguousarray(leaf.T)
    q, scales = (leaf.weight[expert], leaf.scales[expert]) if expert is not None else (leaf.weight, leaf.scales)
    value = q.astype(ml_dtypes.bfloat16) * np.repeat(scales, q.shape[0] // scales.shape[0], axis=0)  # [in, out]
    return np.ascontiguousarray(value.T)


@pytest.mark.parametrize("engine, weights", [("vllm", "bf16"), ("vllm", "int8"), ("sglang", "bf16")])
def test_every_tensor_fills_exactly_one_engine_slot_with_its_shape_and_dtype(exports, engine, weights):
    tensors = read_engine_tensors(exports[engine, weights])
    load = vllm_load if engine == "vllm" else sglang_load
    filled: dict[tuple, tuple[str, tuple[int, ...]]] = {}
    for name, tensor in tensors.items():
        slot = load(name, CONFIG)
        assert slot is not None, f"{name}: the loader would skip it"
        assert slot not in filled, f"{name}: a second tensor for {slot}"
        filled[slot] = (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
    expected = engine_slots(engine, CONFIG, weights == "int8")
    assert set(filled) - set(expected) == set(), "tensors the engine has no parameter for"
    assert set(expected) - set(filled) == set(), "engine parameters nothing fills"
    assert filled == expected


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_every_bf16_slot_holds_what_upstream_computes_with(source, exports, engine):
    _, params = source
    load = vllm_load if engine == "vllm" else sglang_load
    for name, tensor in read_engine_tensors(exports[engine, "bf16"]).items():
        want = upstream_effective(load(name, CONFIG), params)
        got = tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert got.dtype.itemsize == want.dtype.itemsize and np.array_equal(got, want.view(got.dtype)), name


def test_the_name_tables_are_total_both_ways():
    for engine in serving_names.ENGINES:
        table = serving_names.table_for(engine)
        tensors = serving_names.expand(CONFIG, table)
        assert len({t.name for t in tensors}) == len(tensors)
        for t in tensors:
            assert serving_names.to_ours(t.name, table) == (t.source.torch_name, t.expert)
        ours = {k for k in grok_torch.Grok(CONFIG, device="meta").state_dict() if not k.endswith(".scales")}
        assert {t.source.torch_name for t in tensors} == ours
        with pytest.raises(serving_names.UnknownTensorError, match=f"unknown {engine} tensor model.layers.0.mlp.x"):
            serving_names.to_ours("model.layers.0.mlp.x", table)
        partial = serving_names.EngineTable(engine, tuple(r for r in table.rows if r.ours != "norm.weight"),
                                            table.checked_against)
        with pytest.raises(serving_names.UnknownTensorError, match="has no row for grok_torch tensor.* norm.weight"):
            serving_names.expand(CONFIG, partial)
        extra = serving_names.EngineTable(engine, (*table.rows, serving_names.Row("layers.{layer}.mlp.weight", "x")),
                                          table.checked_against)
        with pytest.raises(serving_names.UnknownTensorError, match="names grok_torch tensor.* that do not exist"):
            serving_names.expand(CONFIG, extra)


# ---- config keys ---------------------------------------------------------------------------------------------

def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_vllm_config_keys_give_upstreams_numerics(exports, weights):
    values = _config(exports["vllm", weights])
    c = CONFIG
    assert values["architectures"] == ["Grok1ModelForCausalLM"]
    read = {"vocab_size": c.vocab_size, "hidden_size": c.emb_size, "intermediate_size": c.ffn_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_q_heads,
            "num_key_value_heads": c.num_kv_heads, "max_position_embeddings": c.sequence_len,
            "rms_norm_eps": c.rms_norm_eps, "pad_token_id": 0, "num_experts": c.num_experts,
            "num_experts_per_tok": c.num_selected_experts, "embedding_multiplier_scale": c.embedding_multiplier_scale,
            "output_multiplier_scale": c.output_multiplier_scale, "attn_logit_softcapping": 30.0,
            "tie_word_embeddings": True, "router_logit_softcapping": 0.0, "moe_router_renormalize": False,
            "rope_theta": 10000.0}
    assert {k: values.get(k) for k in read} == read
    # what grok1.py @048a32c7 derives from them
    for key in ("residual_moe", "moe_intermediate_size", "attn_output_multiplier", "final_logit_softcapping",
                "rope_type", "rope_parameters", "moe_renormalize", "attn_logit_softcapping_method"):
        assert key not in values  # Grok-1 class, renormalize from moe_router_renormalize, no output factor
    head_dim = values["hidden_size"] // values["num_attention_heads"]
    assert head_dim == c.key_size and math.isclose(head_dim ** -0.5, c.attn_output_multiplier)
    assert max(values["router_logit_softcapping"], 0.0) == 0  # cap off
    if weights == "int8":
        q = values["quantization_config"]
        assert q["format"] == q["config_groups"]["group_0"]["format"] == "pack-quantized"
        assert q["config_groups"]["group_0"]["targets"] == ["Linear"]
        assert q["config_groups"]["group_0"]["weights"] == {"num_bits": 8, "type": "int", "symmetric": True,
                                                            "strategy": "group", "group_size": 128,
                                                            "dynamic": False, "actorder": None}
        assert q["config_groups"]["group_0"]["input_activations"] is None
    else:
        assert "quantization_config" not in values
    assert json.loads((exports["vllm", weights] / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def test_sglang_config_keys(exports):
    values = _config(exports["sglang", "bf16"])
    c = CONFIG
    no_default = {"num_local_experts": c.num_experts, "num_experts_per_tok": c.num_selected_experts,
                  "embedding_multiplier_scale": c.embedding_multiplier_scale,
                  "output_multiplier_scale": c.output_multiplier_scale, "rms_norm_eps": c.rms_norm_eps,
                  "hidden_size": c.emb_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_q_heads,
                  "num_key_value_heads": c.num_kv_heads, "vocab_size": c.vocab_size,
                  "max_position_embeddings": c.sequence_len}
    assert {k: values.get(k) for k in no_default} == no_default
    assert values["head_dim"] == c.key_size and values["rope_theta"] == 10000.0
    assert values["attn_logit_softcapping"] == 30.0 and values["attn_logit_softcapping_method"] == "tanh"
    assert values["load_presharded_moe"] is False and values["tie_word_embeddings"] is False
    for key in ("residual_moe", "moe_intermediate_size", "rope_type", "attn_output_multiplier", "context_len",
                "attn_temperature_len", "replicate_lm_head", "replicate_embedding", "load_presharded_attn"):
        assert key not in values


def test_transformers_parses_the_configs_without_remote_code(exports):
    transformers = pytest.importorskip("transformers")
    for (engine, weights), path in exports.items():
        config = transformers.AutoConfig.from_pretrained(path)
        assert config.architectures == ["Grok1ModelForCausalLM"]
        assert config.hidden_size == CONFIG.emb_size and config.num_local_experts == CONFIG.num_experts
        assert config.tie_word_embeddings is (engine == "vllm")
        theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
        assert theta == 10000.0
        if engine == "vllm":
            assert config.router_logit_softcapping == 0.0 and config.moe_router_renormalize is False
        else:
            assert config.load_presharded_moe is False


# ---- the weights read back --------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_bf16_export_holds_the_models_effective_bf16_weights(source, exports, engine):
    converted, _ = source
    model = grok_torch.load(converted, weights="int8", dtype="bf16")
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, grok_torch.linear.Linear) and not name.endswith("router"):
            expected[name + ".weight"] = module.materialize(torch.bfloat16)  # bf16(int8 x scale)
    expected["embedding.weight"] = model.embedding.weight  # bf16(fp32 table): what upstream multiplies with
    back = read_export(exports[engine, "bf16"])
    assert (back.engine, back.weights, back.config) == (engine, "bf16", CONFIG)
    state = model.state_dict()
    for name, tensor in back.state.items():
        want = expected.get(name, state[name])  # norms and router: their fp32 values
        assert tensor.dtype == want.dtype and torch.equal(_bits(tensor), _bits(want)), name
    assert set(back.state) == {k for k in state if not k.endswith(".scales")}
    # an independent rendering of one of them: bf16(int8 * scale) in numpy
    raw = back.tensors["model.layers.1." + ("attn.o_proj" if engine == "vllm" else "self_attn.o_proj") + ".weight"]
    q, s = state["layers.1.attn.o_proj.weight"].numpy(), state["layers.1.attn.o_proj.scales"]
    s = s.float().numpy().repeat(q.shape[1] // s.shape[1], axis=1)
    assert np.array_equal(raw.view(torch.int16).numpy(), (q * s).astype(ml_dtypes.bfloat16).view(np.int16))


def test_bf16_export_rounds_the_moe_down_projection_that_upstream_keeps_exact(source, exports):
    """The documented numerics difference: upstream (and grok_torch) use the exact fp32 int8 x scale product of
    linear_1; a bf16 export can only hold it rounded once."""
    converted, _ = source
    model = grok_torch.load(converted, weights="int8", dtype="fp32")
    exact = model.layers[0].moe.down_proj.materialize(torch.float32)  # [E, D, F], the exact product
    back = read_export(exports["vllm", "bf16"]).state["layers.0.moe.down_proj.weight"]
    assert torch.equal(_bits(back), _bits(exact.to(torch.bfloat16)))
    assert not torch.equal(back.float(), exact)  # some products need more than bf16's 8 bits


def test_int8_export_decodes_bit_exactly_through_compressed_tensors(source, exports):
    """compressed-tensors' own decompressor gives upstream's bf16(int8 x scale) in every quantized slot."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    _, params = source
    path = exports["vllm", "int8"]
    scheme = QuantizationConfig.model_validate(_config(path)["quantization_config"]).config_groups["group_0"]
    tensors = read_engine_tensors(path)
    checked = 0
    for name in tensors:
        if not name.endswith(".weight_packed"):
            continue
        prefix = name[: -len("weight_packed")]
        parts = {k: tensors[prefix + k] for k in ("weight_packed", "weight_scale", "weight_shape")}
        decoded = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
        want = upstream_effective(vllm_load(name, CONFIG), params)
        assert decoded.dtype == torch.bfloat16 and tuple(decoded.shape) == want.shape
        assert np.array_equal(decoded.view(torch.int16).numpy(), want.view(np.int16)), name
        checked += 1
    assert checked == CONFIG.num_layers * (4 + 3 * CONFIG.num_experts)


def test_int8_export_reads_back_as_the_int8_conversion_it_came_from(source, exports):
    converted, _ = source
    back = read_export(exports["vllm", "int8"])
    with grok_torch.converted_dir.ConvertedDir(converted) as directory:
        assert set(back.state) == set(directory.tensors)
        for name in directory.tensors:
            want = directory.tensor(name)
            if name == "embedding.weight":
                want = want.to(torch.bfloat16)  # shipped bf16
            got = back.state[name]
            assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)), name
    model = grok_torch.from_state_dict(back.state, back.config, dtype="bf16")  # the follow-up's one call
    assert model.weights == "int8"


def test_scale_bytes_of_the_int8_export(exports):
    """Upstream's scales (1 or 8 groups) against the group-128 ones written: each of upstream's repeated."""
    tensors = read_engine_tensors(exports["vllm", "int8"])
    written = sum(t.numel() * 2 for n, t in tensors.items() if n.endswith(".weight_scale"))
    c = CONFIG
    per_layer_in = {"q": c.emb_size, "k": c.emb_size, "v": c.emb_size, "o": c.num_q_heads * c.key_size}
    attn = c.num_q_heads * c.key_size * c.emb_size + 2 * c.num_kv_heads * c.key_size * c.emb_size \
        + c.emb_size * per_layer_in["o"]
    experts = 3 * c.num_experts * c.ffn_size * c.emb_size
    assert written == c.num_layers * (attn + experts) // 128 * 2


# ---- refusals ------------------------------------------------------------------------------------------------------

def test_sglang_int8_is_refused_with_the_reason(source, tmp_path):
    converted, _ = source
    with pytest.raises(NotServableError, match="sglang has no int8 format for Grok-1's GELU experts"):
        export_serving(converted, tmp_path / "out", engine="sglang", weights="int8")
    result = CliRunner().invoke(main, ["export-serving", str(converted), str(tmp_path / "out"), "--engine", "sglang",
                                       "--weights", "int8"])
    assert result.exit_code == 1 and result.stderr.startswith("error: sglang has no int8 format")
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_config_the_engines_would_compute_differently_is_refused(src, tmp_path):
    """golden-12l: key_size 16 but attn_output_multiplier 128 ** -0.5; the engines use head_dim ** -0.5."""
    converted = convert_checkpoint(src, tmp_path / "golden", golden_config(), progress=False).dst
    for engine in ("vllm", "sglang"):
        with pytest.raises(NotServableError, match=r"head_dim \*\* -0.5 = 0.25 .*attn_output_multiplier is 0.0883883"):
            export_serving(converted, tmp_path / engine, engine=engine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["golden"]


def test_int8_needs_an_int8_conversion(source, exports, tmp_path):
    _, params = source
    raw = source[0].parent / "upstream"
    converted = convert_checkpoint(raw, tmp_path / "bf16", CONFIG, weights="bf16", progress=False).dst
    with pytest.raises(NotServableError, match="stored as float in the source: an int8 export needs an int8 conversion"):
        export_serving(converted, tmp_path / "out", engine="vllm", weights="int8")
    # a bf16 conversion exports to bf16 with the same weights as the int8 one
    a = read_export(export_serving(converted, tmp_path / "a", engine="vllm", progress=False).dst)
    b = read_export(exports["vllm", "bf16"])
    assert all(torch.equal(_bits(a.state[k]), _bits(b.state[k])) for k in a.state)


def test_cli_writes_and_reports(source, tmp_path):
    converted, _ = source
    result = CliRunner().invoke(main, ["export-serving", str(converted), str(tmp_path / "out"), "--engine", "vllm",
                                       "--weights", "int8", "--max-shard-size", "20MB", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {tmp_path / 'out'} for vllm (int8): ")
    assert "compressed-tensors scales (groups of 128)" in result.stdout
    assert "no tokenizer shipped" in result.stderr
    again = CliRunner().invoke(main, ["export-serving", str(converted), str(tmp_path / "out"), "--engine", "vllm"])
    assert again.exit_code == 1 and "already exists; use --overwrite" in again.stderr


def test_the_gpu_smoke_step_is_skipped_without_the_engines():
    import importlib.util
    import subprocess
    import sys

    from support.paths import ASSETS

    if any(importlib.util.find_spec(engine) for engine in ("vllm", "sglang")):
        pytest.skip("an engine is importable here: scripts/serving-smoke would serve for real")
    script = ASSETS.parents[1] / "scripts" / "serving-smoke"
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["serving-smoke: sglang is not importable here: skipped",
                                       "serving-smoke: vllm is not importable here: skipped"]
