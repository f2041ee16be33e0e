"""The input checkpoint is only ever read: every open of a source file is read-only, and every source file's
sha256 is the same before and after each way a conversion can end (success, hostile pickle, bad shape,
Ctrl-C, full disk; SIGKILL is covered in test_interrupt_resume.py, which checks the same sums)."""

from __future__ import annotations

import builtins
import io
import os

import numpy as np
import pytest

import convert.converter as converter
import convert.disk.shard_file as shard_file
from convert.converter import ConversionInterrupted, convert_checkpoint
from grok_torch.errors import OutOfSpaceError
from convert.inspect import inspect
from convert.upstream.tensor_file import CheckpointError
from convert.verify import verify
from support.checkpoints import (SystemCall, copy_golden_with_config, entry_index, golden_config, replace_tensor,
                          sha256_tree)
from support.disk import FullDisk

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class _Calls(list):
    recording = False


@pytest.fixture
def opened(monkeypatch) -> _Calls:
    """Every (path, flags or mode) opened through os.open, open/io.open and numpy.memmap while `recording`."""
    calls = _Calls()
    real_os_open, real_open, real_memmap = os.open, builtins.open, np.memmap

    def spy_os_open(path, flags, *args, **kwargs):
        if calls.recording:
            calls.append((os.fspath(path), flags))
        return real_os_open(path, flags, *args, **kwargs)

    def spy_open(file, mode="r", *args, **kwargs):
        if calls.recording and not isinstance(file, int):
            calls.append((os.fspath(file), mode))
        return real_open(file, mode, *args, **kwargs)

    class SpyMemmap(real_memmap):
        def __new__(cls, filename, *args, **kwargs):
            if calls.recording:
                calls.append((os.fspath(filename), kwargs.get("mode", args[1] if len(args) > 1 else "r+")))
            return real_memmap.__new__(real_memmap, filename, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(np, "memmap", SpyMemmap)
    return calls


def _read_only(how: object) -> bool:
    if isinstance(how, int):
        return how & WRITE_FLAGS == 0
    return set(str(how)) <= set("rbt") and "r" in str(how)


def test_every_failure_mode_leaves_the_input_untouched_and_opens_it_read_only(tmp_path, monkeypatch, opened):
    src = copy_golden_with_config(tmp_path / "src")
    config = golden_config()

    def check(step) -> None:
        before = sha256_tree(src)
        opened.recording = True
        try:
            step()
        finally:
            opened.recording = False
        assert sha256_tree(src) == before

    out = tmp_path / "out"
    check(lambda: convert_checkpoint(src, out, config, max_shard_size=1_000_000))
    check(lambda: verify(src, out))
    check(lambda: inspect(src))

    def interrupted():
        original = converter.read_tensor_file
        calls = iter(range(1000))

        def read(path, info=None, **kwargs):
            if next(calls) == 60:
                raise KeyboardInterrupt
            return original(path, info, **kwargs)

        monkeypatch.setattr(converter, "read_tensor_file", read)
        with pytest.raises(ConversionInterrupted):
            convert_checkpoint(src, tmp_path / "int", config, max_shard_size=1_000_000)
        monkeypatch.setattr(converter, "read_tensor_file", original)
        convert_checkpoint(src, tmp_path / "int", config, max_shard_size=1_000_000, resume=True)

    check(interrupted)

    def disk_full():
        with monkeypatch.context() as patch:
            patch.setattr(shard_file, "_write", FullDisk(2_000_000).write)
            with pytest.raises(OutOfSpaceError):
                convert_checkpoint(src, tmp_path / "full", config)

    check(disk_full)

    marker = tmp_path / "MARKER"
    replace_tensor(src, entry_index(config, "transformer/decoder_layer_3/moe/linear/w"), SystemCall(f"touch {marker}"))

    def refused(match):
        def step():
            with pytest.raises(CheckpointError, match=match):
                convert_checkpoint(src, tmp_path / "bad", config)
        return step

    check(refused("posix.system' is not allowed"))
    replace_tensor(src, entry_index(config, "transformer/decoder_layer_3/moe/linear/w"), np.zeros(3, np.float32))
    check(refused("found float32\\[3\\]"))
    assert not marker.exists() and not (tmp_path / "bad").exists()

    source_opens = [(path, how) for path, how in opened if os.path.abspath(path).startswith(str(src) + os.sep)]
    assert len(source_opens) > 500  # the spies did see the reads
    assert [(path, how) for path, how in source_opens if not _read_only(how)] == []
