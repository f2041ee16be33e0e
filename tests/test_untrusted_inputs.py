"""Inputs from somewhere else: config files, a converted directory's integrity, destinations that are not ours
or are being written by another run, file systems out of bytes or inodes, generation parameters.

Every refusal is one `error:` line naming the file and the field (or the PID, or the file system) at fault;
nothing hangs on a FIFO, nothing reads a device, nothing is allocated for a model the input cannot hold.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import grok_torch
from convert.converter import convert_checkpoint
from convert.disk.output_dir import DestinationError
from convert.upstream.export import export_upstream
from grok_torch.cli import main
from grok_torch.config import GrokConfig
from grok_torch.converted_dir import INDEX_FILE, LoadError
from grok_torch.errors import EXIT_NO_SPACE
from grok_torch.generation import generate
from grok_torch.sampling import sample_next
from support.checkpoints import copy_golden, golden_config
from support.deadline import unblock_fifo, within
from support.models import random_model
from support.paths import GOLDEN_DIR
from support.stopping import start, wait_until_stopped

SHARD = 1_000_000  # 8 shards of the golden checkpoint in int8


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error(result, *fragments, exit_code=1):
    assert result.exit_code == exit_code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output and "unexpected" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert_checkpoint(GOLDEN_DIR, tmp_path_factory.mktemp("c") / "int8", golden_config(),
                              max_shard_size=SHARD).dst


def _golden_values() -> dict:
    return json.loads((GOLDEN_DIR / "config.json").read_text())


# ---- configs are untrusted ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("emb_size", "64", "field emb_size: expected an integer, got '64'"),
    ("emb_size", 64.0, "field emb_size: expected an integer, got 64.0"),
    ("num_layers", True, "field num_layers: expected an integer, got True"),
    ("num_kv_heads", 0, "field num_kv_heads: must be at least 1, got 0"),
    ("num_kv_heads", -8, "field num_kv_heads: must be at least 1, got -8"),
    ("num_kv_heads", 3, "num_q_heads=16 is not a multiple of num_kv_heads=3"),
    ("num_layers", 10**9, "field num_layers: must be at most"),
    ("vocab_size", None, "field vocab_size: expected an integer, got None"),
    ("widening_factor", "8", "field widening_factor: expected a number, got '8'"),
    ("widening_factor", float("nan"), "field widening_factor: must be finite, got nan"),
    ("rms_norm_eps", -1.0, "field rms_norm_eps: must be greater than 0, got -1.0"),
    ("attn_logit_softcap", float("inf"), "field attn_logit_softcap: must be finite, got inf"),
    ("eos_token", 512, "field eos_token: must be below vocab_size=512, got 512"),
    ("num_selected_experts", 9, "num_selected_experts=9 must be in 1..num_experts=8"),
])
def test_config_fields_are_checked_by_type_and_range(tmp_path, field, value, expected):
    values = _golden_values() | {field: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError) as err:
        GrokConfig.from_json(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="field " + field if "field" in expected else "invalid GrokConfig"):
        GrokConfig.from_dict(values)


def test_config_numbers_of_either_kind_for_floats_and_numpy_ints():
    import numpy as np

    config = GrokConfig.from_dict(_golden_values() | {"widening_factor": 8, "num_layers": np.int64(12)})
    assert config.widening_factor == 8.0 and type(config.num_layers) is int and config == golden_config()


def test_a_config_that_is_not_an_object_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    for text, expected in (("[1, 2]", "not a JSON object (a list)"), ('"grok"', "not a JSON object (a str)"),
                           ('{"emb_size": 64, "emb_size": 65}', "duplicate key 'emb_size'"), ("{", "not valid JSON")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"{path}: .*{expected}".replace("(", r"\(").replace(")", r"\)")):
            GrokConfig.from_json(path)


def test_special_files_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=f"{fifo}: not a regular file"):
        within(10, lambda: GrokConfig.from_json(fifo), unblock=lambda: unblock_fifo(fifo))
    if Path("/dev/zero").exists():
        with pytest.raises(ValueError, match="/dev/zero: not a regular file"):
            within(10, lambda: GrokConfig.from_json("/dev/zero"))
    big = tmp_path / "big.json"
    big.write_text(json.dumps(_golden_values()) + " " * (17 << 20))
    with pytest.raises(ValueError, match=f"{big}: larger than 16 MiB"):
        GrokConfig.from_json(big)


def test_convert_with_a_hostile_config_option(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = within(30, lambda: invoke("convert", GOLDEN_DIR, tmp_path / "a", "--config", fifo),
                    unblock=lambda: unblock_fifo(fifo))
    assert_one_error(result, f"{fifo}: not a regular file")
    result = within(30, lambda: invoke("convert", GOLDEN_DIR, tmp_path / "b", "--config", "/dev/zero"))
    assert_one_error(result, "/dev/zero: not a regular file")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("edit, expected", [
    ({"num_layers": 10**9}, "field num_layers: must be at most"),
    ({"num_layers": 4000}, "and 47846 more; expected exactly 48002 files tensor00000_000 .. tensor48001_000"),
    ({"emb_size": "64"}, "field emb_size: expected an integer, got '64'"),
    ({"num_kv_heads": 0}, "field num_kv_heads: must be at least 1, got 0"),
    # 10**7 x 64 embedding + 64 + 12 layers x 578,304 (attention 49,152, norms 256, router 512, experts 528,384)
    ({"vocab_size": 10_000_000}, "describes 646,939,712 weights, which need at least 1 byte per weight, but there "
                                 "are only 7,388,532 bytes in its 146 files"),
])
def test_convert_refuses_an_untrusted_src_config_at_once(tmp_path, edit, expected):
    """SRC/config.json, picked up by default, is untrusted: checked before anything is built for it, against
    the checkpoint's files and bytes."""
    root = copy_golden(tmp_path / "src")
    (root / "config.json").write_text(json.dumps(_golden_values() | edit))
    result = within(30, lambda: invoke("convert", root, tmp_path / "out"))
    assert_one_error(result, str(root / "config.json") if "field" in expected else "", expected)
    assert not (tmp_path / "out").exists()


def test_a_src_config_json_that_is_a_fifo_is_refused_not_skipped(tmp_path):
    root = copy_golden(tmp_path / "src")
    os.mkfifo(root / "config.json")
    result = within(30, lambda: invoke("convert", root, tmp_path / "out"),
                    unblock=lambda: unblock_fifo(root / "config.json"))
    assert_one_error(result, f"{root / 'config.json'}: not a regular file (a FIFO)")
    assert not (tmp_path / "out").exists()


# ---- integrity: sha256 of every shard and of config.json, recorded in the index --------------------------------

def test_the_index_records_the_sha256_of_every_file(converted):
    import hashlib

    recorded = json.loads((converted / INDEX_FILE).read_text())["metadata"]["sha256"]
    files = sorted(p.name for p in converted.iterdir() if p.name.endswith(".safetensors")) + ["config.json"]
    assert sorted(recorded) == sorted(files) and len(files) == 9
    for name in files:
        assert recorded[name] == hashlib.sha256((converted / name).read_bytes()).hexdigest()


def test_verify_dir_alone_checks_the_recorded_sums(converted, tmp_path):
    result = invoke("verify", converted)
    assert result.exit_code == 0 and result.output.startswith(f"ok: {converted}: 8 shard(s) and config.json match"), \
        result.output
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    shard = copy / "model-00003-of-00008.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10  # a data byte: the header stays valid, so only the checksum can tell
    shard.write_bytes(bytes(data))
    result = invoke("verify", copy)
    assert_one_error(result, "1 mismatch(es)", exit_code=3)
    assert f"{shard}: sha256 " in result.output and "does not match the one recorded in" in result.output
    grok_torch.load(copy)  # a plain load reads headers only
    with pytest.raises(LoadError, match=f"{shard}: sha256 .* does not match the one recorded in"):
        grok_torch.load(copy, verify=True)
    shard.write_bytes(bytes(data[:-5]) + bytes([data[-5] ^ 0x10]) + bytes(data[-4:]))
    assert grok_torch.load(copy, verify=True).num_weights() > 0


def test_verify_dir_checks_the_copied_tokenizer_against_config_json(converted, tmp_path):
    import hashlib

    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    (copy / "tokenizer.model").write_bytes(b"a tokenizer")
    values = json.loads((copy / "config.json").read_text())
    values["tokenizer"] = {"file": "tokenizer.model", "sha256": hashlib.sha256(b"a tokenizer").hexdigest(),
                           "source": "x"}
    (copy / "config.json").write_text(json.dumps(values))
    index = json.loads((copy / INDEX_FILE).read_text())  # as the converter records it
    index["metadata"]["sha256"]["config.json"] = hashlib.sha256((copy / "config.json").read_bytes()).hexdigest()
    (copy / INDEX_FILE).write_text(json.dumps(index))
    result = invoke("verify", copy)
    assert result.exit_code == 0 and "8 shard(s), tokenizer.model and config.json match" in result.output, result.output
    (copy / "tokenizer.model").write_bytes(b"another tokenizer")
    result = invoke("verify", copy)
    assert_one_error(result, "1 mismatch(es)", exit_code=3)
    assert f"{copy / 'tokenizer.model'}: sha256 " in result.output and "recorded in config.json" in result.output
    (copy / "tokenizer.model").unlink()
    assert "tokenizer.model is missing: config.json records its sha256" in invoke("verify", copy).output
    values["tokenizer"]["file"] = "../../etc/passwd"
    (copy / "config.json").write_text(json.dumps(values))
    with pytest.raises(LoadError, match="config.json: tokenizer: expected null or"):
        grok_torch.load(copy)


def test_a_tampered_config_is_refused(converted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    values = json.loads((copy / "config.json").read_text())
    values["grok_config"]["attn_logit_softcap"] = 60.0
    (copy / "config.json").write_text(json.dumps(values, indent=2))
    with pytest.raises(LoadError, match="config.json does not match the sha256 recorded in .*tampered"):
        grok_torch.load(copy)
    assert_one_error(invoke("verify", copy), "config.json does not match the sha256 recorded in")


def test_a_directory_without_recorded_sums_loads_but_cannot_be_verified(converted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    index = json.loads((copy / INDEX_FILE).read_text())
    del index["metadata"]["sha256"]  # as grok-torch before 0.2 wrote it
    (copy / INDEX_FILE).write_text(json.dumps(index))
    assert grok_torch.load(copy).num_weights() > 0
    with pytest.raises(LoadError, match="records no sha256"):
        grok_torch.load(copy, verify=True)
    assert_one_error(invoke("verify", copy), "records no sha256")


# ---- destinations -------------------------------------------------------------------------------------------------

def _fake_conversion(directory: Path) -> None:
    """A directory that grok-torch did not write, with the file names of a conversion."""
    directory.mkdir()
    for name in ("config.json", INDEX_FILE, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (directory / name).write_text(f"the user's own {name}")


def test_overwrite_refuses_a_directory_grok_torch_did_not_write(tmp_path):
    dst = tmp_path / "out"
    _fake_conversion(dst)
    before = {p.name: p.read_text() for p in dst.iterdir()}
    result = invoke("convert", GOLDEN_DIR, dst, "--overwrite")
    assert_one_error(result, f"{dst} was not written by grok-torch", "no .grok-torch-output", "4 files")
    assert {p.name: p.read_text() for p in dst.iterdir()} == before
    with pytest.raises(DestinationError, match="was not written by grok-torch"):
        export_upstream(GOLDEN_DIR, dst, overwrite=True)


def test_overwrite_replaces_grok_torch_output_and_says_what_it_removes(tmp_path, converted):
    dst = tmp_path / "out"
    result = invoke("convert", GOLDEN_DIR, dst, "--weights", "bf16")
    assert result.exit_code == 0, result.output
    result = invoke("convert", GOLDEN_DIR, dst, "--overwrite")
    assert result.exit_code == 0, result.output
    assert f"replacing {dst}: the output of grok-torch convert (3 files," in result.output
    assert json.loads((dst / "config.json").read_text())["weight_format"] == "int8"
    (dst / "notes.txt").write_text("mine")  # something of the user's inside it now
    result = invoke("convert", GOLDEN_DIR, dst, "--overwrite")
    assert_one_error(result, f"{dst} holds files that grok-torch did not write (notes.txt)")
    assert (dst / "notes.txt").read_text() == "mine"
    marker = json.loads((dst / ".grok-torch-output").read_text())
    (dst / "notes.txt").unlink()
    marker["written_by"] = "someone"
    (dst / ".grok-torch-output").write_text(json.dumps(marker))
    assert_one_error(invoke("convert", GOLDEN_DIR, dst, "--overwrite"), "not written by grok-torch")
    (dst / ".grok-torch-output").unlink()
    (dst / ".grok-torch-output").mkdir()
    assert_one_error(invoke("convert", GOLDEN_DIR, dst, "--overwrite"), "not written by grok-torch")


def test_export_upstream_overwrites_only_its_own_output(tmp_path, converted):
    dst = tmp_path / "export"
    export_upstream(converted, dst)
    assert (dst / ".grok-torch-output").is_file()
    export_upstream(converted, dst, overwrite=True)
    (dst / "ckpt-0" / "extra").write_text("x")
    with pytest.raises(DestinationError, match="holds files that grok-torch did not write \\(ckpt-0/extra\\)"):
        export_upstream(converted, dst, overwrite=True)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP") or not Path("/proc/self/stat").exists(), reason="POSIX, /proc")
def test_concurrent_runs_on_one_destination(tmp_path):
    """A second convert to the DST of a running one refuses at once, naming its PID; and the first one's final
    rename does not replace a DST that appeared while it worked."""
    dst = tmp_path / "out"
    first = start(["convert", GOLDEN_DIR, dst, "--max-shard-size", "1MB"], "install")
    try:
        wait_until_stopped(first, "install")
        result = within(20, lambda: invoke("convert", GOLDEN_DIR, dst, "--weights", "bf16"))
        assert_one_error(result, f"{dst} is being written by another grok-torch run (PID {first.pid})")
        result = within(20, lambda: invoke("convert", GOLDEN_DIR, dst, "--weights", "bf16", "--overwrite"))
        assert_one_error(result, f"(PID {first.pid})")
        dst.mkdir()  # someone else's directory, made while the first run was working
        (dst / "theirs.txt").write_text("theirs")
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 1, err
    assert f"error: {dst} appeared while grok-torch was writing it; left it untouched" in err
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial output, no lock file left


def test_a_held_lock_refuses_export_too(tmp_path, converted):
    from convert.disk.output_dir import DestinationLock

    dst = tmp_path / "export"
    with DestinationLock(dst, "test"):
        with pytest.raises(DestinationError, match=f"being written by another grok-torch run \\(PID {os.getpid()}"):
            export_upstream(converted, dst)
    export_upstream(converted, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_serving_claims_its_destination_the_same_way(tmp_path):
    """export-serving (sharing convert's job) is locked, and overwrites only grok-torch's own output."""
    from convert.disk.output_dir import DestinationLock
    from convert.serving.exporter import export_serving
    from support.checkpoints import random_conversion

    (tmp_path / "src").mkdir()
    converted, _ = random_conversion(tmp_path / "src", GrokConfig.from_name("tiny-serving"))
    dst = tmp_path / "serving"
    with DestinationLock(dst):
        with pytest.raises(DestinationError, match=f"being written by another grok-torch run \\(PID {os.getpid()}"):
            export_serving(converted, dst, engine="vllm")
    _fake_conversion(dst)
    with pytest.raises(DestinationError, match="was not written by grok-torch"):
        export_serving(converted, dst, engine="vllm", overwrite=True)
    shutil.rmtree(dst)
    export_serving(converted, dst, engine="vllm")
    assert json.loads((dst / ".grok-torch-output").read_text())["written_by"] == "export-serving"
    export_serving(converted, dst, engine="sglang", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serving", "src"]


class NoInodes:
    """The file system runs out of inodes (or quota) at the `at`-th file or directory created: ENOSPC (EDQUOT)
    from os.open/open/os.mkdir with O_CREAT, as the kernel reports it."""

    def __init__(self, monkeypatch, at: int, code: int = errno.ENOSPC):
        self.at, self.code, self.created = at, code, 0
        real_os_open, real_open, real_mkdir = os.open, builtins.open, os.mkdir

        def create(path):
            if not Path(os.fspath(path)).exists():
                self.created += 1
                if self.created == self.at:
                    raise OSError(self.code, os.strerror(self.code), os.fspath(path))

        def os_open(path, flags, *args, **kwargs):
            if flags & os.O_CREAT:
                create(path)
            return real_os_open(path, flags, *args, **kwargs)

        def open_(file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and any(c in mode for c in "wxa"):
                create(file)
            return real_open(file, mode, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            create(path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(os, "mkdir", mkdir)


def _count_creations(monkeypatch, run) -> int:
    counter = NoInodes(monkeypatch, at=0)
    run()
    monkeypatch.undo()
    return counter.created


@pytest.mark.parametrize("command", ["convert", "export-upstream"])
def test_no_inodes_or_quota_left_at_any_file_exits_4_and_leaves_nothing(tmp_path, monkeypatch, converted, command):
    parent = tmp_path / "parent"
    parent.mkdir()
    args = (["convert", GOLDEN_DIR, parent / "out", "--max-shard-size", "1MB"] if command == "convert"
            else ["export-upstream", converted, parent / "out"])
    creations = _count_creations(monkeypatch, lambda: invoke(*args))
    assert creations >= (12 if command == "convert" else 148)
    shutil.rmtree(parent / "out")
    points = sorted({1, 2, 3, 4, 5, creations // 2, creations - 2, creations - 1, creations})
    for at in points:
        for code in (errno.ENOSPC, errno.EDQUOT):
            NoInodes(monkeypatch, at, code)
            result = invoke(*args)
            monkeypatch.undo()
            assert_one_error(result, exit_code=EXIT_NO_SPACE)
            assert sorted(p.name for p in parent.iterdir()) == [], (at, code, result.output)


# ---- generation parameters ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--temperature", "inf"), ("--temperature", "nan"), ("--top-p", "nan"),
                                           ("--temperature", "-inf")])
def test_generate_refuses_non_finite_options(tmp_path, option, value):
    result = invoke("generate", tmp_path / "nothing", "--prompt", "hi", option, value)
    assert result.exit_code == 2 and "finite" in result.output, result.output


def test_sampling_refuses_non_finite_parameters():
    model = random_model(GrokConfig.from_name("tiny", sequence_len=32))
    logits = torch.zeros(1, 8)
    for temperature in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
            sample_next(logits, temperature=temperature)
        with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
            generate(model, [[1, 2]], max_new_tokens=1, temperature=temperature)
    for top_p in (math.nan, math.inf, 0.0):
        with pytest.raises(ValueError, match="top_p must be in"):
            sample_next(logits, temperature=1.0, top_p=top_p)
        with pytest.raises(ValueError, match="top_p must be in"):
            generate(model, [[1, 2]], max_new_tokens=1, temperature=1.0, top_p=top_p)
