"""Raw checkpoint -> sharded safetensors: exactness per format, sharding, atomic output, verify, inspect."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from convert.converter import convert_checkpoint
from convert.disk.output_dir import DestinationError
from convert.disk.safetensors_writer import TensorToWrite, parse_size, plan_shards
from convert.inspect import inspect
from convert.plan import convert_param, plan_param
from convert.upstream.param_names import checkpoint_layout
from convert.upstream.quantized import QuantizedWeight8bit
from convert.upstream.raw_checkpoint import read_raw_checkpoint, validate_raw_checkpoint
from convert.upstream.tensor_file import CheckpointError
from convert.verify import verify
from grok_torch.converted_dir import INDEX_FILE, ConvertedDir, LoadError
from support.safetensors_bytes import tensor_byte_range
from support.checkpoints import GOLDEN_DIR, SystemCall, copy_golden, entry_index, golden_config, replace_tensor

BF16 = ml_dtypes.bfloat16


@pytest.fixture(scope="module")
def config():
    return golden_config()


@pytest.fixture(scope="module")
def raw(config):
    return read_raw_checkpoint(GOLDEN_DIR, config)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, config):
    """The golden checkpoint converted to each format (int8 sharded small, to exercise sharding)."""
    root = tmp_path_factory.mktemp("converted")
    return {fmt: convert_checkpoint(GOLDEN_DIR, root / fmt, config, weights=fmt,
                                    max_shard_size=parse_size("1MB") if fmt == "int8" else parse_size("5GB")).dst
            for fmt in ("int8", "bf16", "bf16-plain", "fp32")}


def _read_all(directory) -> dict[str, torch.Tensor]:
    """Every tensor, through the reference safetensors library."""
    tensors = {}
    for name in sorted(set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values())):
        with safe_open(directory / name, framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BF16)
    return tensor.numpy()


def _upstream_dequantize(q: QuantizedWeight8bit) -> np.ndarray:
    """Upstream's rule in the haiku layout, in bf16 arithmetic: weight.astype(bf16) * scales, grouped along
    the input axis: [..., K, N] viewed as [..., G, K/G, N] times scales [..., G, 1, N]."""
    *lead, k, n = q.weight.shape
    groups = q.scales.shape[-2]
    w = q.weight.astype(BF16).reshape(*lead, groups, k // groups, n)
    return (w * q.scales[..., :, None, :]).reshape(*lead, k, n)


# ---- exactness per format ----------------------------------------------------------------------------------

def test_every_tensor_is_written_and_readable_by_safetensors(converted, config):
    layout = checkpoint_layout(config)
    for fmt, directory in converted.items():
        tensors = _read_all(directory)
        expected = {e.torch_name for e in layout}
        if fmt == "int8":
            expected |= {e.torch_scales_name for e in layout if e.quantizable}
        if fmt == "bf16":  # the MoE down projections keep int8 + scales
            expected |= {e.torch_scales_name for e in layout if e.quantizable and not e.rule.dequant_rounds_to_bf16}
        assert set(tensors) == expected
        for entry in layout:
            assert tuple(tensors[entry.torch_name].shape) == entry.torch_shape


def test_int8_keeps_weights_and_scales_bit_exact(converted, raw, config):
    tensors = _read_all(converted["int8"])
    for entry in checkpoint_layout(config):
        value = raw[entry.haiku_module][entry.haiku_param]
        if entry.quantizable:
            weight, scales = _as_numpy(tensors[entry.torch_name]), _as_numpy(tensors[entry.torch_scales_name])
            assert weight.dtype == np.int8 and scales.dtype == BF16
            assert np.array_equal(weight, value.weight.swapaxes(-1, -2))
            assert scales.tobytes() == np.ascontiguousarray(value.scales.swapaxes(-1, -2)).tobytes()
            assert scales.shape == entry.torch_scales_shape
        else:
            stored = _as_numpy(tensors[entry.torch_name])
            assert stored.dtype == np.float32
            assert stored.tobytes() == np.ascontiguousarray(entry.to_torch(value)).tobytes()


def test_bf16_plain_equals_upstream_dequantization(converted, raw, config):
    tensors = _read_all(converted["bf16-plain"])
    grouped = 0
    for entry in checkpoint_layout(config):
        value = raw[entry.haiku_module][entry.haiku_param]
        stored = _as_numpy(tensors[entry.torch_name])
        if entry.quantizable:
            grouped += value.scales.shape[-2] > 1
            expected = np.ascontiguousarray(_upstream_dequantize(value).swapaxes(-1, -2))
            assert stored.dtype == BF16 and stored.tobytes() == expected.tobytes(), entry.torch_name
        else:
            assert stored.dtype == np.float32  # embeddings, norms, router keep fp32 in every format
    assert grouped == 2 * config.num_layers  # attention `linear` and moe `linear_1` have G = 8


def test_bf16_is_bf16_plain_except_the_down_projections_kept_int8(converted, config):
    """bf16 = bf16-plain's bytes for every tensor but the MoE down projections, which hold the int8 weight and
    bf16 scales of the int8 conversion bit for bit (upstream uses their exact product; bf16 would round it);
    config.json's quantized map says so."""
    bf16, plain, int8 = (_read_all(converted[f]) for f in ("bf16", "bf16-plain", "int8"))
    quantized = json.loads((converted["bf16"] / "config.json").read_text())["quantized"]
    kept = 0
    for entry in checkpoint_layout(config):
        if entry.quantizable and not entry.rule.dequant_rounds_to_bf16:
            kept += 1
            for name in (entry.torch_name, entry.torch_scales_name):
                assert _as_numpy(bf16[name]).tobytes() == _as_numpy(int8[name]).tobytes(), name
            assert bf16[entry.torch_name].dtype == torch.int8 and quantized[entry.torch_name] is True
        else:
            assert _as_numpy(bf16[entry.torch_name]).tobytes() == _as_numpy(plain[entry.torch_name]).tobytes()
            assert quantized.get(entry.torch_name, False) is False
    assert kept == config.num_layers


def test_fp32_holds_the_weights_upstream_computes_with(converted, raw, config):
    """fp32 = bf16(int8 x scales) widened, except the MoE down projection: the exact product."""
    fp32, bf16 = _read_all(converted["fp32"]), _read_all(converted["bf16-plain"])
    exact_kept = 0
    for entry in checkpoint_layout(config):
        a, b = _as_numpy(fp32[entry.torch_name]), _as_numpy(bf16[entry.torch_name])
        assert a.dtype == np.float32
        if not entry.quantizable:
            assert a.tobytes() == b.tobytes()
            continue
        value = raw[entry.haiku_module][entry.haiku_param]
        *lead, k, n = value.weight.shape
        groups = value.scales.shape[-2]
        product = (value.weight.astype(np.float32).reshape(*lead, groups, k // groups, n)
                   * value.scales.astype(np.float32)[..., :, None, :]).reshape(value.weight.shape)
        product = np.ascontiguousarray(product.swapaxes(-1, -2))
        if entry.haiku_module.endswith("moe/linear_1"):
            assert a.tobytes() == product.tobytes(), entry.torch_name
            exact_kept += int(not np.array_equal(product, product.astype(BF16).astype(np.float32)))
        else:
            assert a.tobytes() == product.astype(BF16).astype(np.float32).tobytes(), entry.torch_name
        assert a.astype(BF16).tobytes() == b.tobytes(), entry.torch_name
    assert exact_kept == config.num_layers  # the exact products really differ from their bf16 rounding


def test_fp32_directory_equals_int8_directory_dequantized_by_the_loader(converted):
    from grok_torch.loading import load

    from_fp32 = load(converted["fp32"], weights="fp32", dtype="fp32").state_dict()
    from_int8 = load(converted["int8"], weights="fp32", dtype="fp32").state_dict()
    assert from_fp32.keys() == from_int8.keys()
    for name, tensor in from_fp32.items():
        assert torch.equal(tensor, from_int8[name]), name


def test_convert_param_names_dtypes_shapes(raw, config):
    layout = {e.haiku_name: e for e in checkpoint_layout(config)}
    entry = layout["transformer/decoder_layer_0/moe/linear_1/w"]
    value = raw[entry.haiku_module]["w"]
    int8 = convert_param(entry, value, "int8")
    assert {k: (v.dtype, v.shape) for k, v in int8.items()} == {
        "layers.0.moe.down_proj.weight": (np.dtype(np.int8), (8, 64, 344)),
        "layers.0.moe.down_proj.scales": (np.dtype(BF16), (8, 64, 8))}
    assert all(v.flags.c_contiguous for v in int8.values())
    bf16 = convert_param(entry, value, "bf16-plain")
    assert list(bf16) == ["layers.0.moe.down_proj.weight"] and bf16["layers.0.moe.down_proj.weight"].dtype == BF16
    kept = convert_param(entry, value, "bf16")  # the exact product is kept as int8 + scales
    assert {k: v.tobytes() for k, v in kept.items()} == {k: v.tobytes() for k, v in int8.items()}
    up = layout["transformer/decoder_layer_0/moe/linear_v/w"]
    assert [v.dtype for v in convert_param(up, raw[up.haiku_module]["w"], "bf16").values()] == [BF16]
    norm = layout["language_model/rms_norm/scale"]
    assert convert_param(norm, raw["language_model/rms_norm"]["scale"], "bf16")["norm.weight"].dtype == np.float32
    with pytest.raises(ValueError, match="unknown weight format"):
        convert_param(norm, raw["language_model/rms_norm"]["scale"], "int4")


def test_blockwise_rendering_matches_whole_tensors(raw, config):
    for entry in checkpoint_layout(config)[:14]:
        value = raw[entry.haiku_module][entry.haiku_param]
        quantized = isinstance(value, QuantizedWeight8bit)
        dtype = (value.weight if quantized else value).dtype.name
        for fmt in ("int8", "bf16", "bf16-plain"):
            for out in plan_param(entry, quantized, dtype, fmt):
                whole = out.render(value)
                pieces = b"".join(chunk.tobytes() for chunk in out.chunks(value, chunk_bytes=1000))
                assert whole.tobytes() == pieces and whole.shape == out.shape


def test_plain_float_linear_weights(tmp_path, config):
    """A linear weight stored unquantized stays as it is in int8 mode (no scales), and is cast otherwise."""
    root = copy_golden(tmp_path / "src")
    index = entry_index(config, "transformer/decoder_layer_4/multi_head_attention/value/w")
    plain = np.random.default_rng(0).standard_normal((config.emb_size, 128)).astype(np.float32)
    replace_tensor(root, index, plain)
    out = convert_checkpoint(root, tmp_path / "int8", config, weights="int8").dst
    tensors = _read_all(out)
    assert "layers.4.attn.v_proj.scales" not in tensors
    assert _as_numpy(tensors["layers.4.attn.v_proj.weight"]).tobytes() == np.ascontiguousarray(plain.T).tobytes()
    quantized = json.loads((out / "config.json").read_text())["quantized"]
    assert quantized["layers.4.attn.v_proj.weight"] is False and quantized["layers.4.attn.k_proj.weight"] is True
    bf16 = _read_all(convert_checkpoint(root, tmp_path / "bf16", config, weights="bf16").dst)
    assert _as_numpy(bf16["layers.4.attn.v_proj.weight"]).tobytes() == plain.T.astype(BF16).tobytes()
    assert verify(root, out) == [] and verify(root, tmp_path / "bf16") == []


# ---- sharding and the index --------------------------------------------------------------------------------

def test_small_shards_and_a_consistent_index(converted, config):
    directory = converted["int8"]
    index = json.loads((directory / INDEX_FILE).read_text())
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    assert len(shards) > 3 and shards == sorted(set(index["weight_map"].values()))
    assert all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    opened = ConvertedDir(directory)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in opened.tensors.values())
    for name in shards:
        metadata = opened.shard_metadata[name]
        tensors = {t.name: t for t in opened.tensors.values() if t.file.name == name}
        assert metadata["weight_format"] == "int8" and metadata["format"] == "pt"
        assert metadata["source"].endswith("ckpt-0") and metadata["grok_torch_version"]
        data = sum(t.nbytes for t in tensors.values())
        assert data <= 1_000_000 or len(tensors) == 1
        assert all(index["weight_map"][t] == name for t in tensors)
    config_json = json.loads((directory / "config.json").read_text())
    assert config_json["format"] == "grok-torch-converted" and config_json["weight_format"] == "int8"
    assert type(config).from_json(directory / "config.json") == config
    assert all(config_json["quantized"].values()) and len(config_json["quantized"]) == 7 * config.num_layers


def test_plan_shards_is_greedy_and_keeps_order():
    def tensor(name, n):
        return TensorToWrite(name, "int8", (n,), lambda: iter(()))

    shards = plan_shards([tensor("a", 4), tensor("b", 4), tensor("c", 3), tensor("d", 20), tensor("e", 1)], 10)
    assert [[t.name for t in shard] for shard in shards] == [["a", "b"], ["c"], ["d"], ["e"]]


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("500MB") == 500_000_000
    assert parse_size("1GiB") == 2**30 and parse_size("1.5kb") == 1500 and parse_size("123") == 123
    for bad in ("", "5 parsecs", "-1GB", "0"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


def test_converted_dir_blocks_read_what_safetensors_reads(converted):
    opened = ConvertedDir(converted["bf16"])
    reference = _read_all(converted["bf16"])
    for name in ("embedding.weight", "layers.7.moe.up_proj.weight", "layers.0.attn.o_proj.weight"):
        assert opened.block(name).tobytes() == _as_numpy(reference[name]).tobytes()
        assert opened.block(name, (1, slice(2, 5))).tobytes() == _as_numpy(reference[name][1, 2:5]).tobytes()
        assert opened.block(name).dtype == (BF16 if reference[name].dtype == torch.bfloat16 else np.float32)


# ---- atomic output ----------------------------------------------------------------------------------------

def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".partial" in p.name or ".old-" in p.name)


def test_existing_destination_is_refused_unless_overwrite(tmp_path, config):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(DestinationError, match="already exists; use --overwrite"):
        convert_checkpoint(GOLDEN_DIR, dst, config)
    with pytest.raises(DestinationError, match="was not written by grok-torch \\(no .grok-torch-output marker"):
        convert_checkpoint(GOLDEN_DIR, dst, config, overwrite=True)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    (dst / "keep.txt").unlink()
    convert_checkpoint(GOLDEN_DIR, dst, config, weights="bf16")
    convert_checkpoint(GOLDEN_DIR, dst, config, weights="int8", overwrite=True)  # replaces a previous output
    assert json.loads((dst / "config.json").read_text())["weight_format"] == "int8"
    assert oct(dst.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    assert _leftovers(tmp_path) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("damage, expected", [
    ("missing", "missing file(s) tensor00100_000"),
    ("extra", "extra file(s) tensor00146_000"),
    ("empty", "tensor00100_000: empty file"),
    ("truncated", "tensor00100_000: truncated"),
    ("wrong_shape", "tensor00100_000: parameter transformer/decoder_layer_6/rms_norm_1/scale: found float32[3]"),
    ("wrong_dtype", "tensor00100_000: parameter transformer/decoder_layer_6/rms_norm_1/scale: found float64[64]"),
    ("malicious", "tensor00100_000: global 'posix.system' is not allowed"),
])
def test_bad_source_leaves_no_destination(tmp_path, config, damage, expected):
    root = copy_golden(tmp_path / "src")
    marker = tmp_path / "MARKER"
    index = entry_index(config, "transformer/decoder_layer_6/rms_norm_1/scale")
    path = root / "ckpt-0" / f"tensor{index:05d}_000"
    expected = expected.replace("tensor00100_000", path.name)
    if damage == "missing":
        path.unlink()
    elif damage == "extra":
        (root / "ckpt-0" / "tensor00146_000").write_bytes(path.read_bytes())
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "wrong_shape":
        replace_tensor(root, index, np.zeros(3, np.float32))
    elif damage == "wrong_dtype":
        replace_tensor(root, index, np.zeros(config.emb_size, np.float64))
    else:
        replace_tensor(root, index, SystemCall(f"touch {marker}"))
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(root, tmp_path / "dst", config)
    assert expected in str(err.value)
    assert not (tmp_path / "dst").exists() and _leftovers(tmp_path) == [] and not marker.exists()


def test_failure_while_writing_removes_the_partial_output(tmp_path, config, monkeypatch):
    import convert.converter as converter

    calls = {"n": 0}
    original = converter.read_tensor_file

    def failing_read(path, info=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 50:
            raise OSError(5, "Input/output error")
        return original(path, info, **kwargs)

    monkeypatch.setattr(converter, "read_tensor_file", failing_read)
    with pytest.raises(OSError, match="Input/output error"):
        convert_checkpoint(GOLDEN_DIR, tmp_path / "dst", config)
    assert not (tmp_path / "dst").exists() and _leftovers(tmp_path) == []


def test_destination_overlapping_the_source_is_refused(tmp_path, config):
    root = copy_golden(tmp_path / "src")
    for dst in (root / "ckpt-0" / "converted", root, root / "ckpt-0"):
        with pytest.raises(DestinationError, match="overlaps the source"):
            convert_checkpoint(root, dst, config, overwrite=True)
    convert_checkpoint(root, root / "converted", config)  # beside ckpt-0 is fine
    assert validate_raw_checkpoint(root, config) and verify(root, root / "converted") == []


# ---- verify and inspect ----------------------------------------------------------------------------------

def test_verify_accepts_every_format(converted):
    for directory in converted.values():
        assert verify(GOLDEN_DIR, directory, chunk_bytes=4096) == []


def test_verify_names_a_corrupted_tensor(tmp_path, converted):
    import shutil

    directory = tmp_path / "copy"
    shutil.copytree(converted["bf16"], directory)
    target = ConvertedDir(directory).tensors["layers.3.moe.gate_proj.weight"]
    offset, _ = tensor_byte_range(target.file, target.name)
    with open(target.file, "r+b") as f:
        f.seek(offset + 1001)
        byte = f.read(1)
        f.seek(offset + 1001)
        f.write(bytes([byte[0] ^ 0x01]))
    mismatches = verify(GOLDEN_DIR, directory)
    assert len(mismatches) == 1 and mismatches[0].startswith("tensor layers.3.moe.gate_proj.weight: 1 of")
    assert "int8 weight x bf16 scales" in mismatches[0]


def test_verify_catches_a_bug_in_the_converters_own_rendering(tmp_path, config, monkeypatch):
    """verify computes what each tensor must hold with code of its own, so a bug in the converter's
    dequantization (here: scale groups applied to interleaved columns) shows, even while it is in effect."""
    import convert.plan

    def interleaved(weight, scales):
        *lead, out_features, in_features = weight.shape
        groups = scales.shape[-1]
        w = weight.astype(np.float32).reshape(*lead, out_features, in_features // groups, groups)
        return (w * scales.astype(np.float32)[..., None, :]).reshape(*lead, out_features, in_features)

    monkeypatch.setattr(convert.plan, "dequantize_torch_layout", interleaved)
    directory = convert_checkpoint(GOLDEN_DIR, tmp_path / "bad", config, weights="bf16-plain").dst
    mismatches = verify(GOLDEN_DIR, directory)
    wrong = sorted({m.split(":")[0].split(".", 2)[-1] for m in mismatches})
    assert wrong == ["attn.o_proj.weight", "moe.down_proj.weight"], mismatches[:3]  # the grouped-scale ones
    assert all("int8 weight x bf16 scales (upstream's dequantization)" in m for m in mismatches)


def test_verify_refuses_missing_and_unexpected_tensors(tmp_path, config):
    """The directory is read by the one strict reader: a tensor missing and one the model does not have are
    refused when it is opened, both named."""
    from convert.disk.safetensors_writer import write_sharded_safetensors

    directory = tmp_path / "odd"
    convert_checkpoint(GOLDEN_DIR, directory, config, weights="bf16")
    opened = ConvertedDir(directory)
    arrays = {name: opened.block(name) for name in opened.tensors if name != "norm.weight"}
    opened.close()
    for path in directory.glob("*.safetensors"):
        path.unlink()
    (directory / INDEX_FILE).unlink()
    kept = [TensorToWrite(name, a.dtype.name, a.shape, (lambda a=a: [a])) for name, a in arrays.items()]
    extra = TensorToWrite("layers.0.extra", "float32", (2,), lambda: [np.zeros(2, np.float32)])
    write_sharded_safetensors(directory, kept + [extra], metadata={"weight_format": "bf16"},
                              index_metadata={"weight_format": "bf16"})
    with pytest.raises(LoadError, match=r"tensor\(s\) the model needs are missing: norm.weight; tensor\(s\) the "
                                        r"model does not have: layers.0.extra"):
        verify(GOLDEN_DIR, directory)


def test_inspect_both_formats_without_reading_data(converted, config):
    raw_report, int8_report = inspect(GOLDEN_DIR), inspect(converted["int8"])
    assert raw_report.format == "raw checkpoint" and len(raw_report.rows) == 2 + 12 * config.num_layers
    assert raw_report.rows[2].name == "transformer/decoder_layer_0/moe/linear/w"
    assert raw_report.rows[2].kind == "QuantizedWeight8bit" and raw_report.rows[2].detail == "scales bfloat16[8, 1, 344]"
    assert int8_report.format == "converted (int8)"
    assert raw_report.total_bytes == int8_report.total_bytes == 7_353_600
    assert raw_report.weight_elements == int8_report.weight_elements == config.num_parameters()
    assert raw_report.bytes_by_dtype() == int8_report.bytes_by_dtype()
    assert inspect(converted["bf16-plain"]).bytes_by_dtype()["bfloat16"] == 2 * config.num_parameters() - 2 * (
        config.vocab_size * config.emb_size + config.emb_size * (1 + 4 * config.num_layers)
        + config.num_layers * config.emb_size * config.num_experts)
    bf16 = inspect(converted["bf16"])
    down = config.num_layers * config.num_experts * config.emb_size * config.ffn_size
    assert bf16.bytes_by_dtype()["int8"] == down  # the down projections, as in int8
    assert bf16.format == f"converted (bf16; {config.num_layers} exact-product linear(s) kept int8 + scales)"
    text = int8_report.to_text()
    assert "layers.0.moe.down_proj.scales" in text and "total: 230 tensors" in text
