"""Every command finds the tokenizer the same way, and convert copies the release's tokenizer.model."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

import grok_torch.tokenizer
from convert.upstream.export import export_upstream
from convert.upstream.tree import haiku_tree_to_state_dict
from grok_torch.cli import main
from grok_torch.config import GrokConfig
from grok_torch.tokenizer import TokenizerError, find_tokenizer
from parity.init import init_params
from support.checkpoints import sha256_tree
from support.paths import TOKENIZER

needs_tokenizer = pytest.mark.skipif(not TOKENIZER.exists(), reason=f"the Grok-1 tokenizer is not at {TOKENIZER}")


@pytest.fixture
def no_shared(tmp_path, monkeypatch):
    monkeypatch.delenv("GROK_TOKENIZER", raising=False)
    monkeypatch.setattr(grok_torch.tokenizer, "SHARED_TOKENIZER", tmp_path / "no-shared.model")


def test_lookup_order_and_where_it_looked(tmp_path, monkeypatch, no_shared):
    given, env, model_dir = tmp_path / "given.model", tmp_path / "env.model", tmp_path / "model"
    model_dir.mkdir()
    for path in (given, env, model_dir / "tokenizer.model"):
        path.write_bytes(b"x")
    assert find_tokenizer(None, model_dir) == (model_dir / "tokenizer.model", f"the copy in {model_dir}")
    monkeypatch.setenv("GROK_TOKENIZER", str(env))
    assert find_tokenizer(None, model_dir) == (env, "$GROK_TOKENIZER")
    assert find_tokenizer(given, model_dir) == (given, "--tokenizer")
    monkeypatch.setenv("GROK_TOKENIZER", str(tmp_path / "gone.model"))  # asked for: not silently passed over
    assert find_tokenizer(None, model_dir)[0] == tmp_path / "gone.model"
    monkeypatch.delenv("GROK_TOKENIZER")
    (model_dir / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError) as err:
        find_tokenizer(None, model_dir)
    assert str(model_dir / "tokenizer.model") in str(err.value) and str(tmp_path / "no-shared.model") in str(err.value)


@pytest.fixture(scope="module")
def raw_with_tokenizer(tmp_path_factory):
    """A tiny official checkpoint with the real vocabulary, the release's tokenizer.model beside ckpt-0."""
    config = GrokConfig.from_name("demo")
    root = tmp_path_factory.mktemp("raw") / "release"
    export_upstream(haiku_tree_to_state_dict(init_params(config, seed=1), config), root, config=config, progress=False)
    config.save_json(root / "config.json")
    if TOKENIZER.exists():
        shutil.copyfile(TOKENIZER, root / "tokenizer.model")
    return config, root


@needs_tokenizer
def test_convert_copies_the_tokenizer_and_generate_finds_it(raw_with_tokenizer, tmp_path, no_shared):
    config, root = raw_with_tokenizer
    before = sha256_tree(root)
    result = CliRunner().invoke(main, ["convert", str(root), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"copying the tokenizer {root / 'tokenizer.model'} into the output" in result.stderr
    copied = tmp_path / "out" / "tokenizer.model"
    assert copied.read_bytes() == TOKENIZER.read_bytes()
    info = json.loads((tmp_path / "out" / "config.json").read_text())["tokenizer"]
    assert info == {"file": "tokenizer.model", "sha256": before["tokenizer.model"], "source": str(root / "tokenizer.model")}
    assert sha256_tree(root) == before
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "out"), "--prompt", "Hello", "--max-new-tokens", "2",
                                       "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Hello")


def test_convert_without_a_tokenizer_says_so_and_a_misfit_is_refused(tmp_path):
    from support.checkpoints import copy_golden_with_config

    src = copy_golden_with_config(tmp_path / "golden")
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out")])
    assert result.exit_code == 0 and "note: no tokenizer.model beside the checkpoint" in result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tokenizer"] is None
    if TOKENIZER.exists():  # the real tokenizer has 131072 pieces, the golden config 512
        shutil.copyfile(TOKENIZER, src / "tokenizer.model")
        result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out2")])
        assert result.exit_code == 0 and "note: not copying" in result.stderr and "do not belong together" in result.stderr
        assert not (tmp_path / "out2" / "tokenizer.model").exists()
        result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out3"), "--tokenizer", str(TOKENIZER)])
        assert result.exit_code == 1 and "131072 pieces but the model's vocab_size is 512" in result.output
        assert not (tmp_path / "out3").exists()
