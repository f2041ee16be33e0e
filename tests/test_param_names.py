"""The haiku <-> grok_torch name table: total in both directions, errors that name the parameter, the
checkpoint's file order, and state dict <-> haiku tree round trips."""

import numpy as np
import pytest
import torch

from convert.upstream.layouts import LAYOUTS, SCALES_LAYOUT
from convert.upstream.param_names import (UnknownParameterError, checkpoint_layout, haiku_to_torch_name,
                                 torch_to_haiku_name)
from convert.upstream.quantized import QuantizedWeight8bit
from convert.upstream.tree import haiku_tree_to_state_dict, state_dict_to_haiku_tree
from grok_torch.config import GrokConfig
from grok_torch.model import Grok
from parity.init import init_params

from support.paths import GOLDEN_DIR


@pytest.mark.parametrize("name", ["grok-1", "tiny-12l"])
def test_table_is_total_and_a_bijection_onto_the_model(name):
    config = GrokConfig.from_name(name)
    layout = checkpoint_layout(config)
    model = Grok(config, weights="int8", device="meta")
    model_shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    # every model tensor is a table entry (weight) or its scales, and nothing else
    covered = {e.torch_name: e.torch_shape for e in layout}
    covered.update({e.torch_scales_name: e.torch_scales_shape for e in layout if e.quantizable})
    assert covered == model_shapes
    for entry in layout:
        assert haiku_to_torch_name(entry.haiku_module, entry.haiku_param) == entry.torch_name
        assert torch_to_haiku_name(entry.torch_name) == (entry.haiku_module, entry.haiku_param)
        if entry.quantizable:
            assert torch_to_haiku_name(entry.torch_scales_name) == (entry.haiku_module, entry.haiku_param)
    assert len({e.haiku_name for e in layout}) == len(layout) == 2 + 12 * config.num_layers


def test_file_order_is_lexicographic_and_matches_the_golden_checkpoint():
    config = GrokConfig.from_json(GOLDEN_DIR / "config.json")
    layout = checkpoint_layout(config)
    assert [e.index for e in layout] == list(range(len(layout)))
    assert len(list((GOLDEN_DIR / "ckpt-0").iterdir())) == len(layout)
    layers = [e.layer for e in layout if e.layer is not None][::12]
    assert layers == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert [e.haiku_name for e in layout[:4]] == [
        "language_model/in_out_embed/embeddings", "language_model/rms_norm/scale",
        "transformer/decoder_layer_0/moe/linear/w", "transformer/decoder_layer_0/moe/linear_1/w"]


@pytest.mark.parametrize("module, param", [
    ("transformer/decoder_layer_0/moe/linear_2", "w"),
    ("transformer/decoder_layer_0/router", "b"),
    ("language_model/positional_embed", "embeddings"),
    ("decoder_layer_0/router", "w"),
])
def test_unknown_haiku_names_raise_naming_them(module, param):
    with pytest.raises(UnknownParameterError, match=f"unknown haiku parameter {module}/{param}"):
        haiku_to_torch_name(module, param)


@pytest.mark.parametrize("name", ["layers.0.attn.qkv_proj.weight", "lm_head.weight", "layers.x.norm.weight",
                                  "layers.0.pre_attn_norm.scales"])
def test_unknown_torch_names_raise_naming_them(name):
    with pytest.raises(UnknownParameterError, match=f"unknown grok_torch tensor {name}"):
        torch_to_haiku_name(name)


def test_params_prefix_of_the_training_state_is_accepted():
    assert haiku_to_torch_name("params/transformer/decoder_layer_7/router", "w") == "layers.7.moe.router.weight"


def test_layout_functions_invert_each_other():
    rng = np.random.default_rng(0)
    for to_torch, to_haiku in (*LAYOUTS.values(), SCALES_LAYOUT):
        for shape in ((3, 5), (2, 3, 5)):
            x = rng.standard_normal(shape)
            assert np.array_equal(to_haiku(to_torch(x)), x)
    w = rng.standard_normal((2, 3, 5))
    assert LAYOUTS["linear"][0](w).shape == (2, 5, 3)  # haiku [E, in, out] -> torch [E, out, in]


@pytest.mark.parametrize("quantize", [True, False])
def test_state_dict_and_haiku_tree_round_trip_exactly(quantize):
    config = GrokConfig.from_name("tiny")
    tree = init_params(config, seed=1, quantize_attention=quantize, quantize_moe=quantize)
    state = haiku_tree_to_state_dict(tree, config)
    assert any(t.dtype == torch.int8 for t in state.values()) == quantize
    back = state_dict_to_haiku_tree(state, config)
    assert back.keys() == tree.keys()
    for module, leaves in tree.items():
        for param, leaf in leaves.items():
            other = back[module][param]
            if isinstance(leaf, QuantizedWeight8bit):
                assert np.array_equal(other.weight, leaf.weight) and np.array_equal(other.scales, leaf.scales)
                assert other.scales.dtype == leaf.scales.dtype
            else:
                assert np.array_equal(other, leaf) and other.dtype == leaf.dtype, f"{module}/{param}"


def test_missing_and_unexpected_entries_are_named():
    config = GrokConfig.from_name("tiny")
    tree = init_params(config, seed=1)
    del tree["transformer/decoder_layer_1/router"]
    with pytest.raises(UnknownParameterError, match="missing haiku parameter transformer/decoder_layer_1/router/w"):
        haiku_tree_to_state_dict(tree, config)
    tree = init_params(config, seed=1)
    tree["transformer/decoder_layer_1/extra"] = {"w": np.zeros(3)}
    with pytest.raises(UnknownParameterError, match="transformer/decoder_layer_1/extra/w"):
        haiku_tree_to_state_dict(tree, config)
    state = haiku_tree_to_state_dict(init_params(config, seed=1), config)
    state["layers.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(UnknownParameterError, match="layers.0.attn.extra.weight"):
        state_dict_to_haiku_tree(state, config)
    del state["layers.0.attn.extra.weight"], state["layers.1.post_moe_norm.weight"]
    with pytest.raises(UnknownParameterError, match="missing grok_torch tensor layers.1.post_moe_norm.weight"):
        state_dict_to_haiku_tree(state, config)
