"""The toolkit end to end: reference weights -> official checkpoint -> safetensors -> grok_torch, checked
against the haiku reference; greedy generation against the reference; the demo; no JAX on the torch side."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

import grok_torch
import grok_torch.tokenizer
from convert.converter import convert_checkpoint
from convert.upstream.export import export_upstream
from convert.upstream.raw_checkpoint import read_raw_checkpoint
from convert.upstream.tree import haiku_tree_to_state_dict, state_dict_to_haiku_tree
from grok_torch.cli import main
from grok_torch.config import GrokConfig
from grok_torch.generation import generate, left_pad
from parity.harness import run_parity
from parity.init import init_params
from parity.reference import reference_forward
from support.models import PROMPTS, random_model

from support.paths import GOLDEN_DIR, TOKENIZER


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A seeded random checkpoint of the parity side, written in the official format by export-upstream."""
    config = GrokConfig.from_name("tiny")
    root = tmp_path_factory.mktemp("pipeline")
    params = init_params(config, seed=3)
    export_upstream(haiku_tree_to_state_dict(params, config), root / "upstream", config=config, progress=False)
    return config, params, root


@pytest.mark.parametrize("weight_format, dtype", [("int8", "fp32"), ("int8", "bf16"), ("fp32", "fp32")])
def test_exported_random_checkpoint_converts_loads_and_passes_parity(exported, weight_format, dtype):
    config, params, root = exported
    raw = read_raw_checkpoint(root / "upstream", config)
    for module, leaves in params.items():  # the pickles hold exactly the drawn weights
        for name, value in leaves.items():
            stored = raw[module][name]
            if hasattr(value, "scales"):
                assert np.array_equal(stored.weight, value.weight) and np.array_equal(stored.scales, value.scales)
            else:
                assert np.array_equal(stored, value), f"{module}/{name}"
    dst = root / f"converted-{weight_format}-{dtype}"
    convert_checkpoint(root / "upstream", dst, config, weights=weight_format, progress=False)
    model = grok_torch.load(dst, dtype=dtype, numerics="upstream")
    report = run_parity(config, dtype=dtype, params=raw, model=model, seq_len=256)
    assert report.passed, report.first_failure[1].describe()


def test_parity_refuses_a_model_of_another_config(exported):
    config, params, _ = exported
    other = grok_torch.Grok(GrokConfig.from_name("tiny-1l"), weights="fp32", dtype="fp32")
    with pytest.raises(ValueError, match=r"this one differs in emb_size: 64 != 48; key_size: 16 != 8;") as err:
        run_parity(config, params=params, model=other)
    assert "GrokConfig(" not in str(err.value)


def test_reference_greedy_tokens_equal_grok_torch_cached_generation():
    """16 greedy steps, fp32, a batch of prompts of different lengths: grok_torch with its KV cache and
    the haiku reference (whole sequence recomputed, one fixed-length compiled program) agree."""
    model = random_model(GrokConfig.from_name("tiny", sequence_len=64))
    config, steps = model.config, 16
    params = state_dict_to_haiku_tree({k: v for k, v in model.state_dict().items()}, config)
    ours = generate(model, PROMPTS, max_new_tokens=steps, temperature=0.0, eos_token=-1).tokens

    # The reference sees the same left-padded rows; later positions hold padding, which the causal
    # mask keeps from influencing the position whose logits are read.
    prompt = left_pad(PROMPTS, config.pad_token).numpy()
    width = prompt.shape[1]
    tokens = np.full((len(PROMPTS), width + steps), config.pad_token, np.int64)
    tokens[:, :width] = prompt
    theirs = [[] for _ in PROMPTS]
    for step in range(steps):
        logits, _ = reference_forward(params, tokens, config, fprop_dtype="fp32")
        picked = logits[:, width - 1 + step].argmax(-1)
        tokens[:, width + step] = picked
        for row, token in enumerate(picked.tolist()):
            theirs[row].append(token)
    assert theirs == ours
    assert all(len(set(row)) >= 4 for row in ours)  # the continuation depends on the context


# ---- the demo ----------------------------------------------------------------------------------------

def test_demo_runs_every_step_without_a_tokenizer(monkeypatch, tmp_path):
    monkeypatch.delenv(grok_torch.tokenizer.TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(grok_torch.tokenizer, "SHARED_TOKENIZER", tmp_path / "absent.model")
    result = CliRunner().invoke(main, ["demo", "--config", "tiny", "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    for step in ("[1/7] random checkpoint", "[2/7] convert", "[3/7] verify", "[4/7] load", "[5/7] parity",
                 "[6/7] parity", "[7/7] generate"):
        assert step in result.output
    assert result.output.count("PARITY PASSED") == 2 and "demo PASSED" in result.output
    assert "no tokenizer" in result.output and "prompt ids" in result.output
    assert (tmp_path / "work" / "converted" / "model.safetensors.index.json").exists()  # --workdir is kept


def test_demo_fails_when_parity_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(grok_torch.tokenizer, "SHARED_TOKENIZER", tmp_path / "absent.model")
    monkeypatch.setattr(grok_torch.model, "soft_cap", lambda logits, cap: logits)
    result = CliRunner().invoke(main, ["demo", "--config", "tiny"])
    assert result.exit_code == 1
    assert "PARITY FAILED" in result.output and "demo FAILED (parity)" in result.output


@pytest.mark.skipif(not TOKENIZER.exists(), reason=f"the Grok-1 tokenizer is not at {TOKENIZER}")
def test_demo_refuses_a_tokenizer_that_does_not_fit_the_model(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--config", "tiny", "--tokenizer", str(TOKENIZER)])
    assert result.exit_code == 1
    assert "131072" in result.output and "512" in result.output
    assert "Traceback" not in result.output


def test_demo_refuses_an_existing_workdir(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 1 and "already exists" in result.output


# ---- the torch side needs no JAX ---------------------------------------------------------------------

def test_convert_load_and_run_without_jax(tmp_path):
    """With jax and haiku made unimportable: the CLI starts, converts the golden checkpoint, and
    grok_torch loads and runs it; the demo says parity is skipped."""
    script = textwrap.dedent(f"""
        import sys
        class NoJax:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("jax", "jaxlib", "haiku"):
                    raise ImportError("JAX is blocked in this test: " + name)
        sys.meta_path.insert(0, NoJax())
        from click.testing import CliRunner
        from grok_torch.cli import main
        import grok_torch, torch
        r = CliRunner().invoke(main, ["convert", {str(GOLDEN_DIR)!r}, {str(tmp_path / "out")!r}, "--no-progress"])
        assert r.exit_code == 0, r.output
        model = grok_torch.load({str(tmp_path / "out")!r})
        logits = model(torch.tensor([[5, 6, 7]]))
        assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()
        r = CliRunner().invoke(main, ["demo", "--config", "tiny"])
        assert r.exit_code == 0, r.output
        assert "parity skipped" in r.output, r.output
        assert not any(m.split(".")[0] in ("jax", "haiku") for m in sys.modules), sorted(sys.modules)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
