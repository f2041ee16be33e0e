"""The restricted pickle reader: golden checkpoint metadata and data, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import sys
import time
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest

from convert.upstream.quantized import QuantizedWeight8bit
from convert.upstream.raw_checkpoint import read_raw_checkpoint, validate_raw_checkpoint
from convert.upstream.tensor_file import CheckpointError, read_tensor_file, scan_tensor_file
from support.checkpoints import (EvalCall, PopenCall, SystemCall, copy_golden, entry_index, golden_config,
                                 permute_layers_numeric, replace_tensor, tensor_path)
from support.paths import GOLDEN_DIR

INDEX = json.loads((GOLDEN_DIR / "tensor_index.json").read_text())


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the golden checkpoint ---------------------------------------------------------------------------------

def test_scan_matches_tensor_index():
    for row in INDEX:
        info = scan_tensor_file(GOLDEN_DIR / row["file"])
        if row["pickled_class"] == "__main__.QuantizedWeight8bit":
            assert info.kind == "quantized" and info.class_name == "__main__.QuantizedWeight8bit"
            assert (info.array.dtype, list(info.array.shape)) == (row["weight_dtype"], row["weight_shape"])
            assert (info.scales.dtype, list(info.scales.shape)) == (row["scales_dtype"], row["scales_shape"])
        else:
            assert info.kind == "array" and info.scales is None
            assert (info.dtype, list(info.shape)) == (row["dtype"], row["shape"])
        assert info.file_size == row["file_bytes"] and info.protocol == 4


def test_validate_names_every_file_in_layout_order():
    pairs = validate_raw_checkpoint(GOLDEN_DIR, golden_config())
    assert [f"params/{entry.haiku_name}" for entry, _ in pairs] == [row["name"] for row in INDEX]
    assert [info.path.name for _, info in pairs] == [row["file"].split("/")[1] for row in INDEX]


def test_reading_leaves_the_files_unchanged():
    read_raw_checkpoint(GOLDEN_DIR, golden_config())
    assert [_sha256(GOLDEN_DIR / row["file"]) for row in INDEX] == [row["sha256"] for row in INDEX]


def test_read_agrees_with_pickle_load_on_the_trusted_golden_files(monkeypatch):
    @dataclass
    class Upstream:  # stands in for upstream's __main__.QuantizedWeight8bit
        weight: np.ndarray
        scales: np.ndarray

    monkeypatch.setattr(sys.modules["__main__"], "QuantizedWeight8bit", Upstream, raising=False)
    for row in INDEX:
        path = GOLDEN_DIR / row["file"]
        ours, reference = read_tensor_file(path), pickle.loads(path.read_bytes())
        pairs = [(ours.weight, reference.weight), (ours.scales, reference.scales)] \
            if isinstance(ours, QuantizedWeight8bit) else [(ours, reference)]
        for mine, theirs in pairs:
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and mine.flags.c_contiguous
            assert mine.tobytes() == theirs.tobytes()


def test_read_raw_checkpoint_tree():
    config = golden_config()
    tree = read_raw_checkpoint(GOLDEN_DIR, config)
    assert sum(len(params) for params in tree.values()) == len(INDEX) == 2 + 12 * config.num_layers
    embed = tree["language_model/in_out_embed"]["embeddings"]
    assert embed.dtype == np.float32 and embed.shape == (config.vocab_size, config.emb_size)
    moe = tree["transformer/decoder_layer_11/moe/linear_1"]["w"]
    assert isinstance(moe, QuantizedWeight8bit)
    assert moe.weight.dtype == np.int8 and moe.weight.shape == (8, config.ffn_size, config.emb_size)
    assert moe.scales.dtype == np.dtype(ml_dtypes.bfloat16) and moe.scales.shape == (8, 8, config.emb_size)
    assert tree["transformer/decoder_layer_3/router"]["w"].shape == (config.emb_size, config.num_experts)


def test_scan_reads_only_the_pickle_structure():
    for row in INDEX:
        info = scan_tensor_file(GOLDEN_DIR / row["file"])
        assert info.scanned_bytes <= 2048 < info.file_size or info.file_size < 2048


def test_scan_of_a_sparse_one_gib_file_skips_the_payload(tmp_path):
    """A pickle claiming 1 GiB of int8 data, stored sparse: the scan reads a few hundred bytes, instantly."""
    small = pickle.dumps(np.zeros(1_000_000, np.int8), protocol=4)
    size = 1 << 30
    head = small[: small.index(b"B" + struct.pack("<I", 1_000_000)) + 5]
    head = head.replace(b"J" + struct.pack("<i", 1_000_000), b"J" + struct.pack("<i", size))
    head = head.replace(b"B" + struct.pack("<I", 1_000_000), b"B" + struct.pack("<I", size))
    tail = small[len(head) + 1_000_000:]
    path = tmp_path / "tensor00000_000"
    with open(path, "wb") as f:
        f.write(head)
        f.seek(len(head) + size)
        f.write(tail)
    start = time.perf_counter()
    info = scan_tensor_file(path)
    assert time.perf_counter() - start < 0.5
    assert info.shape == (size,) and info.array.nbytes == size and info.array.offset == len(head)
    assert info.scanned_bytes < 2048


# ---- other valid encodings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_other_protocols_and_fortran_order(tmp_path, protocol):
    rng = np.random.default_rng(protocol)
    for name, array in {"c": rng.standard_normal((5, 7)).astype(np.float32),
                        "f": np.asfortranarray(rng.standard_normal((5, 7)).astype(np.float32)),
                        "bf16": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16)}.items():
        path = tmp_path / f"{name}-{protocol}"
        path.write_bytes(pickle.dumps(array, protocol=protocol))
        info = scan_tensor_file(path)
        assert info.array.fortran_order == (name == "f")
        for value in (read_tensor_file(path), read_tensor_file(path, mapped=True)):
            assert value.dtype == array.dtype and value.shape == array.shape and value.tobytes() == array.tobytes()
            assert value.flags.f_contiguous if name == "f" else value.flags.c_contiguous


def test_mapped_reads_equal_reads_and_are_read_only():
    """What the converter uses: the payloads mapped from the files, not copied."""
    for row in INDEX:
        path = GOLDEN_DIR / row["file"]
        read, mapped = read_tensor_file(path), read_tensor_file(path, mapped=True)
        pairs = [(read.weight, mapped.weight), (read.scales, mapped.scales)] \
            if isinstance(read, QuantizedWeight8bit) else [(read, mapped)]
        for copy, view in pairs:
            assert view.dtype == copy.dtype and view.shape == copy.shape and view.tobytes() == copy.tobytes()
            assert not view.flags.writeable and view.flags.c_contiguous


def test_a_file_truncated_after_the_scan_is_an_error_not_a_crash(tmp_path):
    """Mapping past the end of a file would kill the process (SIGBUS) when touched: checked first."""
    path = tmp_path / "t"
    path.write_bytes(pickle.dumps(np.arange(4096, dtype=np.float32), protocol=4))
    info = scan_tensor_file(path)
    with open(path, "r+b") as f:
        f.truncate(info.file_size - 100)
    for mapped in (False, True):
        with pytest.raises(CheckpointError, match=f"{path}: truncated: .* bytes of array data missing"):
            read_tensor_file(path, info, mapped=mapped)


# ---- malicious pickles ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, global_name", [
    (lambda marker: SystemCall(f"touch {marker}"), "system"),
    (lambda marker: EvalCall(f"open({str(marker)!r}, 'w')"), "builtins.eval"),
    (lambda marker: PopenCall(["touch", str(marker)]), "subprocess.Popen"),
])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, make, global_name):
    marker = tmp_path / "MARKER"
    path = tmp_path / "tensor00000_000"
    path.write_bytes(pickle.dumps(make(marker), protocol=4))
    with pytest.raises(CheckpointError) as err:
        scan_tensor_file(path)
    message = str(err.value)
    assert str(path) in message and global_name in message and "not allowed" in message
    assert "QuantizedWeight8bit" in message  # says what is allowed
    with pytest.raises(CheckpointError):
        read_tensor_file(path)
    assert not marker.exists()


def test_malicious_file_inside_a_checkpoint_names_file_and_parameter(tmp_path):
    root = copy_golden(tmp_path / "src")
    marker = tmp_path / "MARKER"
    config = golden_config()
    index = entry_index(config, "transformer/decoder_layer_5/moe/linear_v/w")
    path = replace_tensor(root, index, SystemCall(f"touch {marker}"))
    with pytest.raises(CheckpointError) as err:
        validate_raw_checkpoint(root, config)
    assert str(path) in str(err.value) and "decoder_layer_5/moe/linear_v/w" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("obj, expected", [
    (np.array([1, "a"], dtype=object), "object dtype"),
    (np.float32(1.5), "multiarray.scalar"),
    ({"weight": np.zeros(3, np.int8)}, "expected a numpy array"),
    (np.zeros(3, dtype=">f4"), "byte order"),
    (np.zeros(2, dtype=[("a", "<f4")]), "not allowed"),
])
def test_other_unsafe_or_foreign_objects_are_refused(tmp_path, obj, expected):
    path = tmp_path / "tensor00000_000"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(CheckpointError, match=expected) as err:
        scan_tensor_file(path)
    assert str(path) in str(err.value)


def test_protocol_0_and_2_are_refused_with_a_reason(tmp_path):
    path = tmp_path / "p0"
    path.write_bytes(pickle.dumps(np.zeros(3, np.float32), protocol=0))
    with pytest.raises(CheckpointError, match="PROTO"):
        scan_tensor_file(path)
    path.write_bytes(pickle.dumps(np.zeros(3, np.float32), protocol=2))  # bytes go through _codecs.encode
    with pytest.raises(CheckpointError, match="_codecs.encode"):
        scan_tensor_file(path)


def test_unknown_opcode_is_named(tmp_path):
    path = tmp_path / "tensor00000_000"
    path.write_bytes(b"\x80\x04" + b"I1\n" + b".")  # INT, a text-protocol opcode
    with pytest.raises(CheckpointError, match=r"opcode 0x49 \(INT\)"):
        scan_tensor_file(path)


# ---- truncated and malformed files ------------------------------------------------------------------------------

def test_empty_file(tmp_path):
    path = tmp_path / "tensor00000_000"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file") as err:
        scan_tensor_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("keep", [1, 20, 200, 5000, -3, -1])
def test_truncated_pickle(tmp_path, keep):
    data = (GOLDEN_DIR / INDEX[2]["file"]).read_bytes()  # a quantized MoE weight
    path = tmp_path / "tensor00002_000"
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="truncated|bytes are left|only") as err:
        scan_tensor_file(path)
    assert str(path) in str(err.value)


def test_oversized_length_prefix(tmp_path):
    data = bytearray((GOLDEN_DIR / INDEX[0]["file"]).read_bytes())  # fp32 [512, 64]: BINBYTES of 131072
    at = data.index(b"B" + struct.pack("<I", 131072))
    data[at + 1: at + 5] = struct.pack("<I", 0xFFFFFFF0)
    path = tmp_path / "tensor00000_000"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="claims 4294967280 bytes but only") as err:
        scan_tensor_file(path)
    assert str(path) in str(err.value)


def test_payload_size_must_match_shape(tmp_path):
    data = bytearray((GOLDEN_DIR / INDEX[1]["file"]).read_bytes())  # fp32 [64]
    at = data.index(b"K\x40\x85")  # BININT1 64, TUPLE1: the shape
    data[at + 1] = 63
    path = tmp_path / "tensor00001_000"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="256 bytes of data for float32\\[63\\]; expected 252"):
        scan_tensor_file(path)


def test_trailing_bytes_after_stop(tmp_path):
    path = tmp_path / "tensor00001_000"
    path.write_bytes((GOLDEN_DIR / INDEX[1]["file"]).read_bytes() + b"\x00")
    with pytest.raises(CheckpointError, match="after the STOP opcode"):
        scan_tensor_file(path)


# ---- whole-checkpoint validation ------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    root = copy_golden(tmp_path)
    tensor_path(root, 17).unlink()
    with pytest.raises(CheckpointError, match="missing file\\(s\\) tensor00017_000"):
        validate_raw_checkpoint(root, golden_config())


def test_extra_file(tmp_path):
    root = copy_golden(tmp_path)
    (root / "ckpt-0" / "tensor00146_000").write_bytes(b"")
    (root / "ckpt-0" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="extra file\\(s\\) notes.txt, tensor00146_000"):
        validate_raw_checkpoint(root, golden_config())


def test_wrong_shape_names_file_and_parameter(tmp_path):
    root = copy_golden(tmp_path)
    config = golden_config()
    index = entry_index(config, "transformer/decoder_layer_2/rms_norm_1/scale")
    path = replace_tensor(root, index, np.ones(config.emb_size + 1, np.float32))
    with pytest.raises(CheckpointError) as err:
        validate_raw_checkpoint(root, config)
    message = str(err.value)
    assert str(path) in message and "decoder_layer_2/rms_norm_1/scale" in message
    assert "found float32[65]; expected a float32 array [64]" in message


def test_wrong_dtype_names_file_and_parameter(tmp_path):
    root = copy_golden(tmp_path)
    config = golden_config()
    router = entry_index(config, "transformer/decoder_layer_0/router/w")
    query = entry_index(config, "transformer/decoder_layer_0/multi_head_attention/query/w")
    replace_tensor(root, router, np.zeros((config.emb_size, 8), np.float16))
    replace_tensor(root, query, np.zeros((config.emb_size, 256), np.int16))
    with pytest.raises(CheckpointError) as err:
        validate_raw_checkpoint(root, config)
    message = str(err.value)
    assert "2 tensor file(s) do not match" in message
    assert "decoder_layer_0/router/w: found float16[64, 8]" in message
    assert "multi_head_attention/query/w: found int16[64, 256]" in message


def test_quantized_scales_must_be_bf16_with_the_grouped_shape(tmp_path):
    root = copy_golden(tmp_path)
    config = golden_config()
    index = entry_index(config, "transformer/decoder_layer_1/multi_head_attention/linear/w")
    original = read_tensor_file(tensor_path(root, index))
    ungrouped = original.scales[:1]  # [1, D] where [8, D] is expected
    from convert.upstream.pickle_writer import write_quantized_pickle

    with open(tensor_path(root, index), "wb") as f:
        write_quantized_pickle(f, original.weight, ungrouped)
    with pytest.raises(CheckpointError, match="scales bfloat16\\[1, 64\\]\\); expected QuantizedWeight8bit"):
        validate_raw_checkpoint(root, config)


def test_plain_float_linear_weights_are_accepted(tmp_path):
    root = copy_golden(tmp_path)
    config = golden_config()
    index = entry_index(config, "transformer/decoder_layer_0/multi_head_attention/key/w")
    replace_tensor(root, index, np.zeros((config.emb_size, 128), ml_dtypes.bfloat16))
    pairs = validate_raw_checkpoint(root, config)
    assert pairs[index][1].kind == "array" and pairs[index][1].dtype == "bfloat16"


def test_accepts_ckpt0_itself_and_rejects_other_dirs(tmp_path):
    assert len(validate_raw_checkpoint(GOLDEN_DIR / "ckpt-0", golden_config())) == len(INDEX)
    with pytest.raises(CheckpointError, match="not a raw checkpoint"):
        validate_raw_checkpoint(tmp_path, golden_config())
    with pytest.raises(CheckpointError, match="no such directory"):
        validate_raw_checkpoint(tmp_path / "nope", golden_config())


def test_wrong_config_is_a_file_count_error():
    with pytest.raises(CheckpointError, match="extra file"):
        validate_raw_checkpoint(GOLDEN_DIR, golden_config().__class__.from_name("golden-12l", num_layers=11))


# ---- layer order ------------------------------------------------------------------------------------------

def test_numeric_layer_order_still_validates_but_moves_layers(tmp_path):
    config = golden_config()
    permuted = permute_layers_numeric(GOLDEN_DIR, tmp_path / "permuted", config)
    validate_raw_checkpoint(permuted, config)
    original, moved = read_raw_checkpoint(GOLDEN_DIR, config), read_raw_checkpoint(permuted, config)
    for as_read, truly in [(10, 2), (2, 4), (9, 11), (0, 0), (1, 1)]:
        a = moved[f"transformer/decoder_layer_{as_read}/router"]["w"]
        b = original[f"transformer/decoder_layer_{truly}/router"]["w"]
        assert np.array_equal(a, b)
    assert not np.array_equal(moved["transformer/decoder_layer_2/router"]["w"],
                              original["transformer/decoder_layer_2/router"]["w"])


def test_hostile_opcode_floods_are_bounded(tmp_path):
    path = tmp_path / "tensor00000_000"
    path.write_bytes(b"\x80\x04" + b"(" * 100_000 + b".")
    with pytest.raises(CheckpointError, match="nested MARKs"):
        scan_tensor_file(path)
    path.write_bytes(b"\x80\x04" + b"N0" * 100_000 + b".")  # NONE, POP: POP is not allowed either
    with pytest.raises(CheckpointError, match="POP"):
        scan_tensor_file(path)
    path.write_bytes(b"\x80\x04]" + b"Na" * 100_000 + b".")  # EMPTY_LIST, then NONE/APPEND forever
    with pytest.raises(CheckpointError, match="more than 65536 opcodes"):
        scan_tensor_file(path)
