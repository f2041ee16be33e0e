"""Reading a converted directory (grok_torch.converted_dir): through the safetensors library, every corruption
refused with one LoadError naming the file and tensor, and one `error:` line on the command line."""

from __future__ import annotations

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


CORRUPTIONS = {
    # name: (how the directory is damaged, what the one-line error must say)
    "truncated shard": (lambda d: os.truncate(d / SHARD, (d / SHARD).stat().st_size - 100), "not a valid safetensors file"),
    "header length past the end": (lambda d: (d / SHARD).write_bytes((2**40).to_bytes(8, "little") + (d / SHARD).read_bytes()[8:]),
                                   "not a valid safetensors file"),
    "header not JSON": (lambda d: _edit_header(d, lambda h, data: (b"{not json" + b" " * 7, data)), "not a valid safetensors file"),
    "overlapping tensors": (lambda d: _edit_header(d, _overlap), "not a valid safetensors file"),
    "a hole between tensors": (lambda d: _edit_header(d, lambda h, data: (h, data + b"\0" * 8)), "not a valid safetensors file"),
    "int8 relabelled uint8": (lambda d: _edit_header(d, _relabel("I8", "U8")), "is uint8; the model uses int8 there"),
    "bf16 scales relabelled f16": (lambda d: _edit_header(d, _relabel("BF16", "F16")), "is float16; the model uses bfloat16"),
    "a dtype grok-torch never stores": (lambda d: _edit_header(d, _relabel("I8", "F8_E4M3")), "grok-torch does not store"),
    "index entry outside the directory": (
        lambda d: _edit_index(d, lambda i: i["weight_map"].update({"norm.weight": "../" + SHARD})), "not a shard file name"),
    "index maps a tensor to another shard": (
        lambda d: (shutil.copyfile(d / SHARD, d / "model-00002-of-00002.safetensors"),
                   _edit_index(d, lambda i: i["weight_map"].update({"norm.weight": "model-00002-of-00002.safetensors"}))),
        "which the index maps to"),
    "missing shard": (lambda d: (d / SHARD).unlink(), f"{SHARD} is missing: the shard file is named in {INDEX_FILE}"),
    "shard is a FIFO": (lambda d: ((d / SHARD).unlink(), os.mkfifo(d / SHARD)), "is not a regular file"),
    "shard not in the index": (lambda d: shutil.copyfile(d / SHARD, d / "model-00001-of-00009.safetensors"), "are not in"),
    "wrong total_size": (lambda d: _edit_index(d, lambda i: i["metadata"].update({"total_size": 1})), "total_size 1"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{"), "cannot read the converted directory's config"),
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
    # inspect lists what a valid file stores (a relabelled dtype is valid safetensors); the rest it refuses
    commands = [["verify", str(GOLDEN_DIR), str(copy)]] + ([] if "relabel" in corruption else [["inspect", str(copy)]])
    for command in commands:
        result = CliRunner().invoke(main, command)
        assert result.exit_code in (1, 3) and result.output.splitlines()[-1].startswith("error: "), result.output
        assert "unexpected" not in result.output


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
