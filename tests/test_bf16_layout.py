"""The bf16 layout keeps the MoE down projections int8 + scales (their exact product, which bf16 rounds);
bf16-plain rounds them. What converted directories of each may hold, what load makes of them, and that the
serving export of a bf16 directory is the int8 one's (its fidelity: tests/test_golden_conversion.py)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import grok_torch
from convert.converter import convert_checkpoint
from convert.serving.exporter import export_serving
from convert.verify import verify
from grok_torch.config import GrokConfig
from grok_torch.converted_dir import ConvertedDir, LoadError, read_config

from support.checkpoints import golden_config, random_conversion, sha256_tree
from support.paths import GOLDEN_DIR


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16-layout")
    return {fmt: convert_checkpoint(GOLDEN_DIR, root / fmt, golden_config(), weights=fmt, progress=False).dst
            for fmt in ("int8", "bf16", "bf16-plain", "fp32")}


def _edited_copy(src, dst, edit):
    """A copy of `src` whose config.json `edit` changed, its new sha256 recorded in the index (as the converter
    would: only the layout rules can refuse it)."""
    shutil.copytree(src, dst)
    config = dst / "config.json"
    values = json.loads(config.read_text())
    edit(values)
    config.write_text(json.dumps(values, indent=2) + "\n")
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["sha256"]["config.json"] = hashlib.sha256(config.read_bytes()).hexdigest()
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return dst


def test_bf16_directory_records_only_the_down_projections_as_quantized(converted):
    quantized = read_config(converted["bf16"]).quantized
    assert {name for name, value in quantized.items() if value} == {
        f"layers.{i}.moe.down_proj.weight" for i in range(golden_config().num_layers)}
    assert not any(read_config(converted["bf16-plain"]).quantized.values())
    assert verify(GOLDEN_DIR, converted["bf16"]) == [] and verify(GOLDEN_DIR, converted["bf16-plain"]) == []
    assert verify(converted["int8"], converted["bf16"]) == []  # by value


def test_int8_and_scales_are_refused_elsewhere_in_bf16_and_anywhere_in_bf16_plain(converted, tmp_path):
    def quantize_q_proj(values):
        values["quantized"]["layers.0.attn.q_proj.weight"] = True

    bf16 = _edited_copy(converted["bf16"], tmp_path / "bf16", quantize_q_proj)
    with pytest.raises(LoadError, match=r"quantized is true for layers\.0\.attn\.q_proj\.weight in a bf16 directory, "
                                        r"which keeps int8 \+ scales only for the MoE down projections$"):
        ConvertedDir(bf16)

    def quantize_down(values):
        values["quantized"]["layers.0.moe.down_proj.weight"] = True

    plain = _edited_copy(converted["bf16-plain"], tmp_path / "plain", quantize_down)
    with pytest.raises(LoadError, match=r"quantized\['layers\.0\.moe\.down_proj\.weight'\] is true in a bf16-plain "
                                        r"directory \(only int8 and bf16 directories store int8 \+ scales\)$"):
        ConvertedDir(plain)


def test_load_converts_between_layouts_and_refuses_what_is_lost(converted):
    from_int8 = grok_torch.load(converted["int8"], weights="bf16", numerics="upstream")
    assert from_int8.weights == "bf16" and from_int8.layers[0].moe.down_proj.weight.dtype == torch.int8
    assert from_int8.layers[0].moe.up_proj.weight.dtype == torch.bfloat16
    stored = grok_torch.load(converted["bf16"], numerics="upstream")
    assert stored.weights == "bf16"
    for name, tensor in stored.state_dict().items():  # the load makes exactly what the converter wrote
        assert torch.equal(tensor, from_int8.state_dict()[name]), name
    assert grok_torch.load(converted["bf16"], weights="bf16-plain", numerics="upstream").weights == "bf16-plain"
    assert grok_torch.load(converted["bf16"], weights="fp32", numerics="upstream").weights == "fp32"
    assert grok_torch.load(converted["fp32"], weights="bf16-plain", numerics="upstream").weights == "bf16-plain"
    with pytest.raises(LoadError, match=r"stores bf16-plain weights, whose MoE down projections were rounded"):
        grok_torch.load(converted["bf16-plain"], weights="bf16", numerics="upstream")
    with pytest.raises(LoadError, match=r"layers\.0\.moe\.down_proj\.weight is stored as fp32; \"bf16\" weights keep"):
        grok_torch.load(converted["fp32"], weights="bf16", numerics="upstream")
    with pytest.raises(LoadError, match=r"stores bf16 weights, which cannot be loaded as int8"):
        grok_torch.load(converted["bf16"], weights="int8", numerics="upstream")


def test_serving_export_of_a_bf16_directory_is_the_int8_ones(converted, tmp_path):
    """export-serving writes bf16(int8 x scale) for the down projections either way: from a bf16 directory (which
    holds them int8) the export is byte for byte the one from the int8 directory."""
    config = GrokConfig.from_name("tiny-serving")  # one the engines compute (the golden's key size is not)
    (tmp_path / "src").mkdir()
    int8, _ = random_conversion(tmp_path / "src", config)
    bf16 = convert_checkpoint(tmp_path / "src" / "upstream", tmp_path / "bf16", config, weights="bf16",
                              progress=False).dst
    exports = {fmt: export_serving(source, tmp_path / f"export-{fmt}", engine="vllm", weights="bf16",
                                   progress=False).dst for fmt, source in (("int8", int8), ("bf16", bf16))}
    a, b = (sha256_tree(exports[fmt]) for fmt in ("int8", "bf16"))
    shards = [name for name in a if name.endswith(".safetensors")]
    assert shards and {n: a[n] for n in shards} == {n: b[n] for n in shards}
