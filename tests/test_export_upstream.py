"""grok-torch -> official ckpt-0: byte-identical round trips, the pickle writer against CPython's, errors."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import sys
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest

from convert.converter import convert_checkpoint
from convert.upstream.export import ExportError, export_upstream
from convert.disk.output_dir import DestinationError
from convert.upstream.param_names import checkpoint_layout
from convert.upstream.pickle_writer import write_array_pickle, write_quantized_pickle
from convert.upstream.quantized import QuantizedWeight8bit, quantize_int8
from convert.upstream.raw_checkpoint import read_raw_checkpoint, validate_raw_checkpoint
from convert.upstream.tensor_file import read_tensor_file
from convert.upstream.tree import haiku_tree_to_state_dict
from convert.verify import verify
from support.checkpoints import GOLDEN_DIR, golden_config

INDEX = json.loads((GOLDEN_DIR / "tensor_index.json").read_text())
BF16 = ml_dtypes.bfloat16


@dataclass
class UpstreamQuantizedWeight8bit:
    """The shape of upstream's class: a dataclass with fields weight and scales, named as under upstream."""

    __module__ = "__main__"
    __qualname__ = "QuantizedWeight8bit"
    weight: np.ndarray
    scales: np.ndarray


@pytest.fixture
def upstream_class(monkeypatch):
    """Make `__main__.QuantizedWeight8bit` resolve as it does under upstream's checkpoint.py."""
    monkeypatch.setattr(sys.modules["__main__"], "QuantizedWeight8bit", UpstreamQuantizedWeight8bit, raising=False)
    return UpstreamQuantizedWeight8bit


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    return convert_checkpoint(GOLDEN_DIR, tmp_path_factory.mktemp("c") / "int8", golden_config(),
                              max_shard_size=500_000).dst


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_int8_round_trip_is_byte_identical(tmp_path, int8_dir):
    result = export_upstream(int8_dir, tmp_path / "export")
    assert (result.files, result.quantized, result.plain_linear) == (len(INDEX), 84, 0)
    ckpt = tmp_path / "export" / "ckpt-0"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(row["file"].split("/")[1] for row in INDEX)
    assert [_sha256(tmp_path / "export" / row["file"]) for row in INDEX] == [row["sha256"] for row in INDEX]
    assert verify(GOLDEN_DIR, tmp_path / "export", golden_config()) == []


def test_state_dict_export_is_byte_identical(tmp_path):
    config = golden_config()
    state = haiku_tree_to_state_dict(read_raw_checkpoint(GOLDEN_DIR, config), config)  # torch tensors
    export_upstream(state, tmp_path / "export", config=config)
    assert [_sha256(tmp_path / "export" / row["file"]) for row in INDEX] == [row["sha256"] for row in INDEX]


def test_exported_pickles_load_under_upstreams_class(tmp_path, int8_dir, upstream_class):
    export_upstream(int8_dir, tmp_path / "export")
    for row in INDEX[:14]:
        loaded = pickle.loads((tmp_path / "export" / row["file"]).read_bytes())
        original = read_tensor_file(GOLDEN_DIR / row["file"])
        if isinstance(original, QuantizedWeight8bit):
            assert type(loaded) is upstream_class and vars(loaded).keys() == {"weight", "scales"}
            assert loaded.weight.tobytes() == original.weight.tobytes()
            assert loaded.scales.dtype == BF16 and loaded.scales.tobytes() == original.scales.tobytes()
        else:
            assert loaded.dtype == original.dtype and loaded.tobytes() == original.tobytes()


def test_float_directories_export_plain_arrays(tmp_path):
    config = golden_config()
    bf16_dir = convert_checkpoint(GOLDEN_DIR, tmp_path / "bf16", config, weights="bf16-plain").dst
    result = export_upstream(bf16_dir, tmp_path / "export")
    assert (result.quantized, result.plain_linear) == (0, 7 * config.num_layers)
    pairs = validate_raw_checkpoint(tmp_path / "export", config)  # plain bf16 linears are a valid checkpoint
    assert {info.dtype for entry, info in pairs if entry.quantizable} == {"bfloat16"}
    assert {info.dtype for entry, info in pairs if not entry.quantizable} == {"float32"}
    # Converting the export again in bf16-plain reproduces the bf16-plain directory bit for bit.
    convert_checkpoint(tmp_path / "export", tmp_path / "again", config, weights="bf16-plain")
    assert verify(bf16_dir, tmp_path / "again") == []


def test_a_bf16_directory_exports_its_down_projections_quantized(tmp_path):
    """bf16 keeps the MoE down projections int8 + scales: they export as QuantizedWeight8bit, the other
    linears as bf16 arrays, and converting that export to bf16 again gives the same directory."""
    config = golden_config()
    bf16_dir = convert_checkpoint(GOLDEN_DIR, tmp_path / "bf16", config, weights="bf16").dst
    result = export_upstream(bf16_dir, tmp_path / "export")
    assert (result.quantized, result.plain_linear) == (config.num_layers, 6 * config.num_layers)
    pairs = validate_raw_checkpoint(tmp_path / "export", config)
    assert {entry.haiku_module.rsplit("/", 2)[-2:] == ["moe", "linear_1"] for entry, info in pairs
            if info.quantized} == {True}
    convert_checkpoint(tmp_path / "export", tmp_path / "again", config, weights="bf16")
    assert verify(bf16_dir, tmp_path / "again") == []


# ---- the pickle writer against CPython's pickler ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.int8, BF16, np.float16, np.int64])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (5, 7), (300, 300), (2, 3, 4, 5), (70_000,), (2, 40_000)])
def test_array_pickles_match_cpython(dtype, shape):
    array = np.asarray(np.random.default_rng(0).standard_normal(shape)).astype(dtype)
    ours = io.BytesIO()
    write_array_pickle(ours, array, reconstruct_module="numpy._core.multiarray", chunk_bytes=4096)
    assert ours.getvalue() == pickle.dumps(array, protocol=4)  # numpy 2 names _reconstruct numpy._core...


def test_transposed_views_are_written_in_c_order():
    array = np.arange(6 * 70_000, dtype=np.int8).reshape(6, 70_000)
    ours = io.BytesIO()
    write_array_pickle(ours, array.T, reconstruct_module="numpy._core.multiarray", chunk_bytes=1000)
    assert ours.getvalue() == pickle.dumps(np.ascontiguousarray(array.T), protocol=4)


@pytest.mark.parametrize("shape, groups", [((64, 40), 1), ((60_000, 1), 1), ((300, 300), 30), ((4, 70_000), 1),
                                           ((8, 64, 344), 8), ((2, 65_536), 2)])
def test_quantized_pickles_match_cpython(shape, groups, upstream_class):
    q = quantize_int8(np.random.default_rng(1).standard_normal(shape).astype(np.float32), groups)
    ours = io.BytesIO()
    write_quantized_pickle(ours, q.weight, q.scales, reconstruct_module="numpy._core.multiarray")
    assert ours.getvalue() == pickle.dumps(upstream_class(q.weight, q.scales), protocol=4)


# ---- errors ----------------------------------------------------------------------------------------------

def _golden_state():
    config = golden_config()
    return config, haiku_tree_to_state_dict(read_raw_checkpoint(GOLDEN_DIR, config), config)


def test_missing_wrong_and_extra_tensors_are_all_named(tmp_path):
    config, state = _golden_state()
    del state["layers.3.attn.q_proj.weight"]
    state["layers.4.attn.k_proj.scales"] = state["layers.4.attn.k_proj.scales"][:, :0]
    state["layers.5.pre_moe_norm.weight"] = state["layers.5.pre_moe_norm.weight"].to(dtype=__import__("torch").int32)
    state["rope.inv_freq"] = state["norm.weight"]
    with pytest.raises(ExportError) as err:
        export_upstream(state, tmp_path / "export", config=config)
    message = str(err.value)
    assert "tensor layers.3.attn.q_proj.weight (transformer/decoder_layer_3/multi_head_attention/query/w) is missing" \
        in message
    assert "tensor layers.4.attn.k_proj.scales: bfloat16[128, 0], expected bfloat16[128, 1]" in message
    assert "tensor layers.5.pre_moe_norm.weight: dtype int32" in message
    assert "rope.inv_freq" in message
    assert not (tmp_path / "export").exists()


def test_int8_without_scales_is_refused(tmp_path):
    config, state = _golden_state()
    del state["layers.0.moe.up_proj.scales"]
    with pytest.raises(ExportError, match="layers.0.moe.up_proj.weight: int8 without layers.0.moe.up_proj.scales"):
        export_upstream(state, tmp_path / "export", config=config)


def test_state_dict_needs_a_config_and_dst_is_protected(tmp_path, int8_dir):
    config, state = _golden_state()
    with pytest.raises(ExportError, match="needs its GrokConfig"):
        export_upstream(state, tmp_path / "export")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "other").write_text("x")
    with pytest.raises(DestinationError, match="already exists"):
        export_upstream(int8_dir, tmp_path / "export")
    with pytest.raises(DestinationError, match="was not written by grok-torch"):
        export_upstream(int8_dir, tmp_path / "export", overwrite=True)
    with pytest.raises(ExportError, match="differs from the directory's config.json"):
        export_upstream(int8_dir, tmp_path / "export2", config=config.__class__.from_name("tiny"))


def test_export_of_a_layout_with_numeric_names_matches_the_layout():
    """Files are written in checkpoint_layout order: layer 10 comes right after layer 1."""
    names = [e.haiku_module for e in checkpoint_layout(golden_config())]
    assert names.index("transformer/decoder_layer_10/moe/linear") == 2 + 2 * 12
