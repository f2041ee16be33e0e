"""Reading a converted directory (grok_torch.converted_dir): through the safetensors library, every corruption
refused with one LoadError naming the file and tensor, and one `error:` line on the command line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

import grok_torch
from convert.converter import convert_checkpoint
from grok_torch.cli import main
from grok_torch.converted_dir import INDEX_FILE, ConvertedDir, LoadError
from support.checkpoints import golden_config
from support.paths import GOLDEN_DIR
from support.safetensors_bytes import read_header, write_with_header

SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_checkpoint(GOLDEN_DIR, tmp_path_factory.mktemp("c") / "int8", golden_config(), progress=False).dst


@pytest.fixture
def copy(converted, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(converted, directory)
    return directory


def _edit_header(directory, edit):
    header, data = read_header(directory / SHARD)
    result = edit(header, data)
    header, data = result if isinstance(result, tuple) else (header, data)
    write_with_header(directory / SHARD, header, data)


def _first_tensor(header, dtype=None):
    return next(name for name, spec in header.items() if name != "__metadata__" and (dtype is None or spec["dtype"] == dtype))


def _overlap(header, data):
    a, b = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])[:2]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # b reads a's bytes
    header[b]["shape"], header[b]["dtype"] = header[a]["shape"], header[a]["dtype"]


def _relabel(old, new):
    def edit(header, data):
        header[_first_tensor(header, old)]["dtype"] = new
    return edit


def _duplicate(aliased: bool):
    """The header's JSON text with a second entry for one tensor: the same one at the end, or one reading the
    bytes of another tensor of its dtype and shape at the start (the library keeps the last entry and loads
    the right bytes; a reader keeping the first would load the other tensor's)."""
    def edit(header, data):
        names = [n for n in header if n != "__metadata__"]
        text = json.dumps(header)
        if not aliased:
            return (text[:-1] + ", " + json.dumps(names[0]) + ": " + json.dumps(header[names[0]]) + "}").encode(), data
        first, other = next((a, b) for a in names for b in names if a < b and
                            (header[a]["dtype"], header[a]["shape"]) == (header[b]["dtype"], header[b]["shape"]))
        alias = dict(header[first], data_offsets=header[other]["data_offsets"])
        return ("{" + json.dumps(first) + ": " + json.dumps(alias) + ", " + text[1:]).encode(), data
    return edit


def _negative_offset(header, data):
    name = min((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])
    header[name]["data_offsets"][0] = -8  # the 8 bytes before the data: the end of the header


def _transpose(header, data):
    name = next(n for n, spec in header.items() if n != "__metadata__" and len(spec["shape"]) == 2
                and spec["shape"][0] != spec["shape"][1])
    header[name]["shape"] = header[name]["shape"][::-1]  # the same bytes, read as another shape


def _extra_field(header, data):
    header[_first_tensor(header)]["note"] = "hello"


def _metadata(key, value):
    def edit(header, data):
        header["__metadata__"][key] = value
    return edit


def _edit_config(directory, edit, rehash=True):
    """Change config.json; with `rehash`, record the new file's sha256 in the index as the converter would
    (an edit made consistently), so that the field checks, not the checksum, must refuse it."""
    values = json.loads((directory / "config.json").read_text())
    result = edit(values)
    text = result if isinstance(result, (str, bytes)) else json.dumps(values, indent=2)
    path = directory / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    index = json.loads((directory / INDEX_FILE).read_text())
    if rehash and "sha256" in index["metadata"]:
        index["metadata"]["sha256"]["config.json"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (directory / INDEX_FILE).write_text(json.dumps(index))


def _grok(field, value):
    return lambda d: _edit_config(d, lambda c: c["grok_config"].update({field: value}))


def _renumber_shard(directory):
    """The only shard renamed model-00002-of-00002: the index names it, but shard 1 of 2 is nowhere."""
    other = "model-00002-of-00002.safetensors"
    os.rename(directory / SHARD, directory / other)
    _edit_index(directory, lambda i: i["weight_map"].update({k: other for k in i["weight_map"]}))


def _unquantize_one(values):
    name = next(n for n, q in values["quantized"].items() if q)
    values["quantized"][name] = False


CORRUPTIONS = {
    # name: (how the directory is damaged, what the one-line error must say)
    "truncated shard": (lambda d: os.truncate(d / SHARD, (d / SHARD).stat().st_size - 100), "not a valid safetensors file"),
    "header length past the end": (lambda d: (d / SHARD).write_bytes((2**40).to_bytes(8, "little") + (d / SHARD).read_bytes()[8:]),
                                   "not a valid safetensors file"),
    "header not JSON": (lambda d: _edit_header(d, lambda h, data: (b"{not json" + b" " * 7, data)), "not a valid safetensors file"),
    "overlapping tensors": (lambda d: _edit_header(d, _overlap), "not a valid safetensors file"),
    "a hole between tensors": (lambda d: _edit_header(d, lambda h, data: (h, data + b"\0" * 8)), "not a valid safetensors file"),
    "negative offset": (lambda d: _edit_header(d, _negative_offset), "not a valid safetensors file"),
    "a tensor twice in a header": (lambda d: _edit_header(d, _duplicate(aliased=False)), "duplicate key"),
    "a tensor twice, the second reading another's bytes": (lambda d: _edit_header(d, _duplicate(aliased=True)),
                                                           "duplicate key"),
    "an unknown field in a tensor's entry": (lambda d: _edit_header(d, _extra_field), "unknown field(s) note"),
    "int8 relabelled uint8": (lambda d: _edit_header(d, _relabel("I8", "U8")), "is uint8; the model expects int8"),
    "bf16 scales relabelled f16": (lambda d: _edit_header(d, _relabel("BF16", "F16")), "is float16; the model expects bfloat16"),
    "fp32 relabelled int32": (lambda d: _edit_header(d, _relabel("F32", "I32")), "is int32; the model expects float32"),
    "a dtype grok-torch never stores": (lambda d: _edit_header(d, _relabel("I8", "F8_E4M3")), "grok-torch does not store"),
    "a tensor read as another shape": (lambda d: _edit_header(d, _transpose), "; the model expects shape ["),
    "shard metadata of another weight format": (lambda d: _edit_header(d, _metadata("weight_format", "bf16")),
                                                "weight_format 'bf16', but config.json says 'int8'"),
    "index entry outside the directory": (
        lambda d: _edit_index(d, lambda i: i["weight_map"].update({"norm.weight": "../" + SHARD})), "not a shard file name"),
    "index entry an absolute path": (
        lambda d: _edit_index(d, lambda i: i["weight_map"].update({"norm.weight": "/etc/passwd"})), "not a shard file name"),
    "index maps a tensor to another shard": (
        lambda d: (shutil.copyfile(d / SHARD, d / "model-00002-of-00002.safetensors"),
                   _edit_index(d, lambda i: i["weight_map"].update({"norm.weight": "model-00002-of-00002.safetensors"}))),
        "weight_map names shards of 2 different counts"),
    "index names a shard sequence with a gap": (_renumber_shard, "model-00001-of-00002.safetensors is missing"),
    "index with a key twice": (lambda d: (d / INDEX_FILE).write_text((d / INDEX_FILE).read_text().replace(
        '"weight_map": {', '"weight_map": {"norm.weight": "' + SHARD + '", ', 1)), "duplicate key 'norm.weight'"),
    "index of another weight format": (lambda d: _edit_index(d, lambda i: i["metadata"].update({"weight_format": "fp32"})),
                                       "weight_format 'fp32', but config.json says 'int8'"),
    "missing shard": (lambda d: (d / SHARD).unlink(), f"{SHARD} is missing: the shard file is named in {INDEX_FILE}"),
    "shard is a FIFO": (lambda d: ((d / SHARD).unlink(), os.mkfifo(d / SHARD)), "not a regular file (a FIFO)"),
    "shard not in the index": (lambda d: shutil.copyfile(d / SHARD, d / "model-00001-of-00009.safetensors"), "are not in"),
    "wrong total_size": (lambda d: _edit_index(d, lambda i: i["metadata"].update({"total_size": 1})), "total_size 1"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{"), "cannot read the converted directory's config"),
    "config.json a list": (lambda d: _edit_config(d, lambda c: "[1, 2]"), "not a JSON object"),
    "config.json a FIFO": (lambda d: ((d / "config.json").unlink(), os.mkfifo(d / "config.json")),
                           "not a regular file (a FIFO)"),
    "config.json of 20 MB": (lambda d: _edit_config(d, lambda c: json.dumps(c) + " " * 20_000_000), "larger than"),
    "config.json with a key twice": (lambda d: _edit_config(d, lambda c: json.dumps(c)[:-1] + ', "format": "x"}'),
                                     "duplicate key 'format'"),
    "config emb_size a string": (_grok("emb_size", "64"), "grok_config.emb_size: expected an integer, got '64'"),
    "config num_layers a bool": (_grok("num_layers", True), "grok_config.num_layers: expected an integer, got True"),
    "config num_kv_heads 0": (_grok("num_kv_heads", 0), "grok_config.num_kv_heads: must be at least 1, got 0"),
    "config num_kv_heads not dividing num_q_heads": (_grok("num_kv_heads", 3), "not a multiple of num_kv_heads=3"),
    "config attn_logit_softcap infinite": (_grok("attn_logit_softcap", float("inf")), "grok_config.attn_logit_softcap"),
    "config num_layers 10**9": (_grok("num_layers", 10**9), "grok_config.num_layers: must be at most"),
    "config num_layers beyond the checkpoint": (_grok("num_layers", 5000), "at least 1 byte per weight"),
    "config vocab_size one more": (_grok("vocab_size", 513), "embedding.weight has shape [512, 64]; the model expects shape [513, 64]"),
    "config quantized map wrong": (lambda d: _edit_config(d, _unquantize_one), "stored as int8 + scales, but"),
    "config weight_format not known": (lambda d: _edit_config(d, lambda c: c.update({"weight_format": "int4"})),
                                       "weight_format 'int4' is not one of"),
    "config.json tampered (a soft-cap of 60)": (lambda d: _edit_config(
        d, lambda c: c["grok_config"].update({"attn_logit_softcap": 60.0}), rehash=False),
        "config.json does not match the sha256 recorded in"),
    "index not JSON": (lambda d: (d / INDEX_FILE).write_text("[]"), "not a safetensors index"),
}


def _edit_index(directory, edit):
    index = json.loads((directory / INDEX_FILE).read_text())
    edit(index)
    (directory / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_each_corruption_is_one_named_load_error(copy, corruption):
    damage, expected = CORRUPTIONS[corruption]
    damage(copy)
    with pytest.raises(LoadError) as err:
        grok_torch.load(copy)
    message = str(err.value)
    assert expected in message and str(copy) in message, message
    assert "\n" not in message
    # inspect and verify read through the same reader: the same refusal, as one line
    for command in (["verify", str(GOLDEN_DIR), str(copy)], ["inspect", str(copy)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1 and result.output.splitlines()[-1].startswith("error: "), result.output
        assert expected in result.output.splitlines()[-1] and "unexpected" not in result.output


def test_a_dtype_relabel_names_the_tensor(copy):
    header, _ = read_header(copy / SHARD)
    name = _first_tensor(header, "I8")
    CORRUPTIONS["int8 relabelled uint8"][0](copy)
    with pytest.raises(LoadError, match=f"tensor {name} is uint8"):
        grok_torch.load(copy)


def test_tensors_are_lazy_views_of_the_shard(converted):
    """No copy at load: each tensor is a view of a private memory map of its shard, and writing to it does
    not touch the file."""
    before = (converted / SHARD).read_bytes()
    directory = ConvertedDir(converted)
    tensor = directory.tensor("layers.0.moe.down_proj.weight")
    assert tensor.dtype == torch.int8 and tuple(tensor.shape) == directory.tensors["layers.0.moe.down_proj.weight"].shape
    tensor.view(-1)[:4] = 7
    del tensor, directory
    assert (converted / SHARD).read_bytes() == before


def test_block_reads_one_slice(converted):
    directory = ConvertedDir(converted)
    whole = directory.block("layers.1.attn.q_proj.weight")
    part = directory.block("layers.1.attn.q_proj.weight", (slice(3, 9),))
    assert (part == whole[3:9]).all() and part.shape == (6, whole.shape[1])
