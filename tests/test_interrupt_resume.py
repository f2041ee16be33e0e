"""Interrupted conversions: SIGKILL at several points, Ctrl-C and SIGTERM, then --resume.

A killed `grok-torch convert` must leave nothing that load or verify accepts at DST; rerunning with
--resume must check the finished shards (size, sha256 recorded as written), reuse the good ones, and
produce output byte-identical to an uninterrupted run. The source is never modified.

The child processes stop themselves at an exact point through the test-only hook GROK_TORCH_TEST_STOP_AT
(convert.disk.job.test_stop: SIGSTOP after announcing it on stderr); the test then kills them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

import grok_torch
import convert.disk.resume as resume_module
from convert.converter import ConversionInterrupted, convert_checkpoint
from convert.disk.output_dir import DestinationError
from convert.disk.resume import JOURNAL_FILE, partial_path
from convert.verify import verify
from support.checkpoints import golden_config, sha256_tree
from support.stopping import CLI, start, wait_until_stopped

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals needed")

SHARD = 1_000_000  # 8 shards of the golden checkpoint in int8


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> Path:
    """An uninterrupted conversion of the same source."""
    dst = tmp_path_factory.mktemp("ref") / "out"
    convert_checkpoint(src, dst, golden_config(), max_shard_size=SHARD)
    return dst


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_not_loadable(src: Path, dst: Path) -> None:
    assert not dst.exists()
    with pytest.raises(grok_torch.LoadError):
        grok_torch.load(dst)
    with pytest.raises(ValueError, match="neither a raw checkpoint"):
        verify(src, dst)


@pytest.mark.parametrize("point, reused", [("tensor:1", 0), ("tensor:150", None), ("shard:3", 3), ("install", 8)])
def test_sigkill_leaves_nothing_loadable_and_resume_is_byte_identical(src, src_sums, reference, tmp_path,
                                                                     point, reused):
    dst = tmp_path / "out"
    proc = start(["convert", src, dst, "--max-shard-size", SHARD], point)
    wait_until_stopped(proc, point)
    proc.kill()  # SIGKILL: no clean-up runs
    proc.wait(30)
    proc.stdout.close()
    proc.stderr.close()

    _assert_not_loadable(src, dst)
    partial = partial_path(dst)
    assert (partial / JOURNAL_FILE).is_file()
    if point != "install":
        with pytest.raises(grok_torch.LoadError, match="config.json is missing"):
            grok_torch.load(partial)
        with pytest.raises(ValueError, match="neither a raw checkpoint"):
            verify(src, partial)
    with pytest.raises(DestinationError, match="interrupted conversion .*rerun with --resume"):
        convert_checkpoint(src, dst, golden_config(), max_shard_size=SHARD)  # without --resume: refused
    assert (partial / JOURNAL_FILE).is_file()

    notes = []
    result = convert_checkpoint(src, dst, golden_config(), max_shard_size=SHARD, resume=True, log=notes.append)
    assert _resume_notes(notes)[0].startswith(f"resuming {partial}: reusing ")
    if reused is not None:
        assert result.reused_shards == reused
    else:
        assert 0 < result.reused_shards < 8
    assert _files(dst) == _files(reference)
    assert not partial.exists() and verify(src, dst) == []
    assert sha256_tree(src) == src_sums


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_keeps_the_finished_shards_and_says_so(src, src_sums, reference, tmp_path, signum):
    dst = tmp_path / "out"
    proc = start(["convert", src, dst, "--max-shard-size", SHARD], "shard:2")
    wait_until_stopped(proc, "shard:2")
    proc.send_signal(signum)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    partial = partial_path(dst)
    kept = sum((reference / f"model-0000{i}-of-00008.safetensors").stat().st_size for i in (1, 2))
    assert err.splitlines()[-1] == (f"interrupted: kept 2 finished shard(s), {kept:,} bytes ({kept / 1e6:.1f} MB), "
                                    f"in {partial}; rerun the same command with --resume to check and reuse them")
    assert "Traceback" not in err and out == ""
    assert sorted(p.name for p in partial.iterdir()) == [JOURNAL_FILE, "model-00001-of-00008.safetensors",
                                                         "model-00002-of-00008.safetensors"]
    _assert_not_loadable(src, dst)
    if signum == signal.SIGINT:  # the documented way on: the same command with --resume
        done = subprocess.run(CLI + ["convert", str(src), str(dst), "--max-shard-size", str(SHARD), "--resume"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"resuming {partial}: reusing 2 finished shard(s)" in done.stderr
        assert "(2 reused after checking)" in done.stdout
        assert _files(dst) == _files(reference)
    assert sha256_tree(src) == src_sums


def _interrupt_after(monkeypatch, reads: int) -> None:
    """Make the converter see Ctrl-C when it reads raw file number `reads`."""
    import convert.converter as converter

    calls = {"n": 0}
    original = converter.read_tensor_file

    def read(path, info=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == reads:
            raise KeyboardInterrupt
        return original(path, info, **kwargs)

    monkeypatch.setattr(converter, "read_tensor_file", read)


def test_ctrl_c_before_any_shard_is_finished_removes_everything(src, tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(ConversionInterrupted, match="interrupted before any shard was finished: removed"):
        convert_checkpoint(src, tmp_path / "out", golden_config(), max_shard_size=SHARD)
    assert sorted(os.listdir(tmp_path)) == []


def _interrupted_partial(src: Path, dst: Path, monkeypatch) -> Path:
    _interrupt_after(monkeypatch, 100)  # file 100 of 146: in shard 6
    with pytest.raises(ConversionInterrupted, match="kept 5 finished shard"):
        convert_checkpoint(src, dst, golden_config(), max_shard_size=SHARD)
    monkeypatch.undo()
    return partial_path(dst)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "replace"])
def test_resume_rewrites_a_shard_that_fails_its_check(src, src_sums, reference, tmp_path, monkeypatch, damage):
    dst = tmp_path / "out"
    partial = _interrupted_partial(src, dst, monkeypatch)
    shard = partial / "model-00002-of-00008.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-1000]))
    elif damage == "delete":
        shard.unlink()
    else:  # same size, another shard's bytes
        shard.write_bytes((partial / "model-00003-of-00008.safetensors").read_bytes()[:len(data)].ljust(len(data), b"\0"))
    notes = []
    result = convert_checkpoint(src, dst, golden_config(), max_shard_size=SHARD, resume=True, log=notes.append)
    assert _resume_notes(notes) == [f"resuming {partial}: reusing 4 finished shard(s) ("
                     f"{sum(len(_files(reference)[f'model-0000{i}-of-00008.safetensors']) for i in (1, 3, 4, 5)):,} bytes) after "
                     f"checking their size and sha256; 1 failed the check and will be written again "
                     f"(model-00002-of-00008.safetensors)"]
    assert result.reused_shards == 4
    assert _files(dst) == _files(reference)
    assert sha256_tree(src) == src_sums


def test_resume_with_other_options_or_a_changed_source_is_refused(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    partial = _interrupted_partial(src, dst, monkeypatch)
    before = _files(partial)
    config = golden_config()
    with pytest.raises(DestinationError, match=r"different options \(--weights was int8, now bf16\); rerun with "
                                               r"the same options, or delete it"):
        convert_checkpoint(src, dst, config, weights="bf16", max_shard_size=SHARD, resume=True)
    with pytest.raises(DestinationError, match=r"--max-shard-size was 1000000, now 2000000"):
        convert_checkpoint(src, dst, config, max_shard_size=2 * SHARD, resume=True)
    stat = os.stat(src / "ckpt-0" / "tensor00007_000")
    try:
        os.utime(src / "ckpt-0" / "tensor00007_000", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        with pytest.raises(DestinationError, match=r"different options \(the source files"):
            convert_checkpoint(src, dst, config, max_shard_size=SHARD, resume=True)
    finally:
        os.utime(src / "ckpt-0" / "tensor00007_000", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _files(partial) == before  # a refusal touches nothing


def _resume_notes(notes: list[str]) -> list[str]:
    """The converter's notes about resuming (the golden checkpoint has no tokenizer, which it notes too)."""
    assert any("no tokenizer.model beside the checkpoint" in n for n in notes), notes
    return [n for n in notes if "tokenizer" not in n]


def test_resume_without_a_partial_output_converts_from_the_start(src, reference, tmp_path):
    notes = []
    result = convert_checkpoint(src, tmp_path / "out", golden_config(), max_shard_size=SHARD, resume=True,
                                log=notes.append)
    assert _resume_notes(notes) == [f"nothing to resume ({partial_path(tmp_path / 'out')} does not exist): converting "
                                    f"from the start"]
    assert result.reused_shards == 0 and _files(tmp_path / "out") == _files(reference)


def test_a_partial_output_in_use_or_with_foreign_files_is_refused(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    partial = _interrupted_partial(src, dst, monkeypatch)
    fd = resume_module._lock(partial)  # as a running convert holds it
    try:
        with pytest.raises(DestinationError, match="being written by another grok-torch convert"):
            convert_checkpoint(src, dst, golden_config(), max_shard_size=SHARD, resume=True)
    finally:
        os.close(fd)
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match=r"holds files that convert does not write \(notes.txt\)"):
        convert_checkpoint(src, dst, golden_config(), max_shard_size=SHARD, resume=True)
    assert (partial / "notes.txt").read_text() == "mine"


def test_resume_of_a_finished_conversion_checks_it_and_does_nothing(src, reference, tmp_path):
    from click.testing import CliRunner

    from grok_torch.cli import main

    dst = tmp_path / "out"
    shutil.copytree(reference, dst)
    before = _files(dst)
    result = CliRunner().invoke(main, ["convert", str(src), str(dst), "--max-shard-size", str(SHARD), "--resume"])
    assert result.exit_code == 0, result.output
    assert f"nothing to do: {dst} is already this conversion of {src / 'ckpt-0'}, complete, and its 8 shard(s) and " \
           f"config.json match their recorded sha256" in result.stderr
    assert "overwrite=True" not in result.output and _files(dst) == before
    # other options: refused, saying which
    result = CliRunner().invoke(main, ["convert", str(src), str(dst), "--max-shard-size", str(SHARD), "--resume",
                                       "--weights", "bf16"])
    assert result.exit_code == 1 and "is a finished conversion, but not this one (it differs in weight_format)" in result.output
    result = CliRunner().invoke(main, ["convert", str(src), str(dst), "--resume"])
    assert result.exit_code == 1 and "the shard plan (--max-shard-size)" in result.output
    # damaged: refused, naming the file
    shard = dst / "model-00002-of-00008.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["convert", str(src), str(dst), "--max-shard-size", str(SHARD), "--resume"])
    assert result.exit_code == 1 and "fail their recorded sha256" in result.output and shard.name in result.output
