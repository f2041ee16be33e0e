"""ShardFileWriter: the exact bytes and sha256 through staging buffers, with O_DIRECT or without, and errors
of its writer thread raised in the caller's thread."""

from __future__ import annotations

import errno
import hashlib
import os

import numpy as np
import pytest

import convert.disk.shard_file as shard_file
from convert.disk.shard_file import ALIGN, ShardFileWriter, direct_io_supported

STAGE = 2 * ALIGN  # small stages, so a few KiB cross many stage boundaries
SIZES = [0, 1, 7, ALIGN - 1, ALIGN, ALIGN + 1, STAGE - 3, STAGE, STAGE + 5, 3 * STAGE + 11, 100]


def _pieces(seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in SIZES]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_the_file_holds_exactly_the_bytes_written(tmp_path, direct):
    if direct and not direct_io_supported(tmp_path):
        pytest.skip(f"{tmp_path}: this file system has no O_DIRECT")
    pieces = _pieces()
    path = tmp_path / "shard"
    with ShardFileWriter(path, direct=direct, stage_bytes=STAGE) as writer:
        assert writer.direct is direct  # the mode under test is the one in use
        for piece in pieces:
            assert writer.write(piece) == len(piece)
        writer.write(np.arange(10, dtype=np.float32))  # arrays are taken as their bytes
        size, sha256 = writer.finish()
    expected = b"".join(pieces) + np.arange(10, dtype=np.float32).tobytes()
    assert path.read_bytes() == expected  # no padding left after the last, partial block
    assert (size, sha256) == (len(expected), hashlib.sha256(expected).hexdigest())


def test_without_a_hash_and_without_data(tmp_path):
    with ShardFileWriter(tmp_path / "empty", hash=False, stage_bytes=STAGE) as writer:
        assert writer.finish(sync=False) == (0, None)
    assert (tmp_path / "empty").read_bytes() == b""


def test_an_existing_file_is_never_overwritten(tmp_path):
    (tmp_path / "shard").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        ShardFileWriter(tmp_path / "shard")
    assert (tmp_path / "shard").read_bytes() == b"keep"


def test_direct_io_can_be_switched_off_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(shard_file.DIRECT_IO_ENV, "0")
    with ShardFileWriter(tmp_path / "shard", stage_bytes=STAGE) as writer:
        assert writer.direct is False
        writer.write(b"x" * 10)
        assert writer.finish() == (10, hashlib.sha256(b"x" * 10).hexdigest())


def test_a_file_system_that_refuses_direct_writes_gets_buffered_ones(tmp_path, monkeypatch):
    """Some file systems take O_DIRECT at open and refuse the write (EINVAL): the rest goes through the page
    cache, from the same position, and the file is still exact."""
    if not direct_io_supported(tmp_path):
        pytest.skip(f"{tmp_path}: this file system has no O_DIRECT")
    refused = []

    def write(fd, data):
        if len(refused) < 1 and stage_writer.direct:
            refused.append(len(data))
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return os.write(fd, data)

    monkeypatch.setattr(shard_file, "_write", write)
    pieces = _pieces(1)
    with ShardFileWriter(tmp_path / "shard", direct=True, stage_bytes=STAGE) as stage_writer:
        for piece in pieces:
            stage_writer.write(piece)
        size, sha256 = stage_writer.finish()
        assert stage_writer.direct is False
    expected = b"".join(pieces)
    assert refused and (tmp_path / "shard").read_bytes() == expected
    assert sha256 == hashlib.sha256(expected).hexdigest()


def test_an_error_of_the_writer_thread_reaches_the_caller_and_everything_is_closed(tmp_path, monkeypatch):
    calls = []

    def write(fd, data):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return os.write(fd, data)

    monkeypatch.setattr(shard_file, "_write", write)
    with pytest.raises(OSError) as err:
        with ShardFileWriter(tmp_path / "shard", stage_bytes=STAGE) as writer:
            for _ in range(20):
                writer.write(b"y" * STAGE)
            writer.finish()
    assert err.value.errno == errno.EIO and err.value.filename == str(tmp_path / "shard")
    assert not writer._thread.is_alive()
    with pytest.raises(OSError) as closed:
        os.fstat(writer.fd)
    assert closed.value.errno == errno.EBADF


def test_leaving_early_stops_the_thread_and_closes_the_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ShardFileWriter(tmp_path / "shard", stage_bytes=STAGE) as writer:
            writer.write(b"z" * (3 * STAGE))
            raise KeyboardInterrupt
    assert not writer._thread.is_alive()
    with pytest.raises(OSError):
        os.fstat(writer.fd)


def test_stage_size_must_be_whole_blocks(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4096"):
        ShardFileWriter(tmp_path / "shard", stage_bytes=1000)
    assert not (tmp_path / "shard").exists()


# ---- write_sharded_safetensors: each shard on the disk before it is recorded ---------------------------------

def _shards_of(tmp_path, monkeypatch, events: list[tuple[str, str]], fail_fsync_of: str | None = None) -> None:
    """Write 4 one-tensor shards, recording every fsync (by file name) and every on_shard call, in order."""
    from convert.disk.safetensors_writer import TensorToWrite, write_sharded_safetensors

    real_fsync = os.fsync

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name == fail_fsync_of:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)
        events.append(("fsync", name))

    monkeypatch.setattr(os, "fsync", fsync)
    tensors = [TensorToWrite(f"t{i}", "float32", (3000,), lambda i=i: [np.full(3000, i, np.float32)])
               for i in range(4)]

    def on_shard(path, size, sha256):
        assert size == path.stat().st_size and sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        events.append(("recorded", path.name))

    write_sharded_safetensors(tmp_path, tensors, max_shard_size=12_000, on_shard=on_shard)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd through /proc")
def test_every_shard_is_synced_before_it_is_recorded_and_recorded_in_order(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    _shards_of(tmp_path, monkeypatch, events)
    names = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert [name for kind, name in events if kind == "recorded"] == names
    for name in names:
        assert events.index(("fsync", name)) < events.index(("recorded", name))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd through /proc")
def test_a_failed_fsync_is_raised_and_that_shard_is_never_recorded(tmp_path, monkeypatch):
    failing = "model-00002-of-00004.safetensors"
    events: list[tuple[str, str]] = []
    open_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as err:
        _shards_of(tmp_path, monkeypatch, events, fail_fsync_of=failing)
    assert err.value.errno == errno.EIO
    assert [name for kind, name in events if kind == "recorded"] == ["model-00001-of-00004.safetensors"]
    assert len(os.listdir("/proc/self/fd")) == open_before  # nothing left open
