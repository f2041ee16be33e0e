"""export-serving as a long job: killed and resumed, memory bounded by the largest tensor, the tokenizer shipped.

As for convert (tests/test_interrupt_resume.py), the child stops itself at an exact point through the
test-only hook GROK_TORCH_TEST_STOP_AT (convert.disk.job.test_stop) and the test kills it there. The memory
check runs the export in a child whose peak resident memory (VmHWM) is compared with the largest tensor it
writes: the model's bf16 embedding, from an fp32 one twice its size.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from convert.disk.output_dir import DestinationError
from convert.disk.resume import JOURNAL_FILE, partial_path
from convert.serving.exporter import export_serving
from grok_torch.config import GrokConfig
from support.checkpoints import random_conversion, sha256_tree
from support.paths import TOKENIZER
from support.stopping import CLI, kill, start, wait_until_stopped

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals needed")

CONFIG = GrokConfig.from_name("tiny-serving")
SHARD = 2_500_000  # 9 shards of the tiny-serving int8 export
# The real vocabulary with the narrowest width vLLM and SGLang serve at head_dim 128: a 128 MiB bf16
# embedding (from 256 MiB of fp32), far larger than everything else.
WIDE_VOCAB = GrokConfig.from_name("tiny-serving", vocab_size=131072, emb_size=512, num_q_heads=4, num_kv_heads=1,
                                  num_layers=1, widening_factor=2.0, num_experts=2)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return random_conversion(tmp_path_factory.mktemp("src"), CONFIG)[0]


@pytest.fixture(scope="module")
def reference(converted, tmp_path_factory) -> Path:
    return export_serving(converted, tmp_path_factory.mktemp("ref") / "out", engine="vllm", weights="int8",
                          max_shard_size=SHARD, progress=False).dst


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _args(converted: Path, dst: Path, *extra: str) -> list[str]:
    return ["export-serving", converted, dst, "--engine", "vllm", "--weights", "int8", "--max-shard-size", SHARD,
            *extra]


@pytest.mark.parametrize("point, reused", [("shard:3", 3), ("install", 9)])
def test_a_killed_export_resumes_to_the_same_bytes(converted, reference, tmp_path, point, reused):
    before = sha256_tree(converted)
    dst = tmp_path / "out"
    proc = start(_args(converted, dst), point)
    wait_until_stopped(proc, point)
    kill(proc)
    partial = partial_path(dst)
    assert not dst.exists() and (partial / JOURNAL_FILE).is_file()
    with pytest.raises(DestinationError, match="partial output of an interrupted export .*rerun with --resume"):
        export_serving(converted, dst, engine="vllm", weights="int8", max_shard_size=SHARD)
    with pytest.raises(DestinationError, match=r"different options \(--engine was vllm, now sglang"):
        export_serving(converted, dst, engine="sglang", max_shard_size=SHARD, resume=True)
    done = subprocess.run(CLI + [str(a) for a in _args(converted, dst, "--resume")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"resuming {partial}: reusing {reused} finished shard(s)" in done.stderr
    assert f"({reused} reused after checking)" in done.stdout
    assert _files(dst) == _files(reference) and not partial.exists()
    assert sha256_tree(converted) == before


def test_ctrl_c_keeps_the_finished_shards_and_says_how_to_resume(converted, tmp_path):
    dst = tmp_path / "out"
    proc = start(_args(converted, dst), "shard:2")
    wait_until_stopped(proc, "shard:2")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1].startswith("interrupted: kept 2 finished shard(s), ")
    assert err.splitlines()[-1].endswith(f"in {partial_path(dst)}; rerun the same command with --resume to check and "
                                         f"reuse them")
    assert "Traceback" not in err and not dst.exists()


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return random_conversion(tmp_path_factory.mktemp("wide"), WIDE_VOCAB)[0]


_MEASURE = """
import json, sys
from convert.serving.exporter import export_serving
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key + ':'))
baseline = status('VmRSS')
result = export_serving(sys.argv[1], sys.argv[2], engine=sys.argv[3], chunk_bytes=8 << 20, progress=False)
print(json.dumps({'baseline': baseline, 'peak': status('VmHWM'), 'bytes': result.total_bytes}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_stays_below_one_and_a_half_times_the_largest_tensor(wide, tmp_path):
    largest = WIDE_VOCAB.vocab_size * WIDE_VOCAB.emb_size * 2  # the bf16 embedding (and SGLang's lm_head)
    prelude = "import torch, numpy, safetensors, convert.serving.exporter, grok_torch.linear\n"  # in the baseline
    run = subprocess.run([sys.executable, "-c", prelude + _MEASURE, str(wide), str(tmp_path / "out"), "sglang"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout.splitlines()[-1])
    grown = measured["peak"] - measured["baseline"]
    print(f"export peak RSS grew by {grown / 2**20:.0f} MiB for a largest tensor of {largest / 2**20:.0f} MiB "
          f"({measured['bytes'] / 2**20:.0f} MiB written)")
    assert grown <= 1.5 * largest


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="the release's tokenizer.model is not here")
def test_the_tokenizer_is_shipped_and_encodes_as_sentencepiece_does(wide, tmp_path):
    import sentencepiece

    out = export_serving(wide, tmp_path / "out", engine="vllm", tokenizer=TOKENIZER, progress=False).dst
    assert (out / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    values = json.loads((out / "tokenizer_config.json").read_text())
    assert values["add_bos_token"] is False and values["add_eos_token"] is False
    assert (values["pad_token"], values["bos_token"], values["eos_token"], values["unk_token"]) == (
        "[PAD]", "[BOS]", "[EOS]", "[UNK]")
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == 1
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    texts = ["The answer is 42.", "  two leading spaces", "Hello\nworld\n\n  x", "日本語のテキスト 🤖",
             "tabs\tand  double  spaces", "é ✓ ", " ", "x\n", "\u0001\u00ff bytes \x7f"]
    for text in texts:
        assert tokenizer.encode(text) == sp.encode(text), text
    assert tokenizer.decode(sp.encode(texts[0])) == texts[0]


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(converted, tmp_path):
    if not TOKENIZER.is_file():
        pytest.skip("the release's tokenizer.model is not here")
    with pytest.raises(ValueError, match="has 131072 pieces but the model's vocab_size is 512"):
        export_serving(converted, tmp_path / "out", engine="vllm", tokenizer=TOKENIZER)
    assert list(tmp_path.iterdir()) == []
