"""The converter's read-ahead: the input asked for in order, in steps the kernel does not cut short, never more
than its window past the file being converted, and files already passed skipped."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

import convert.disk.read_ahead as read_ahead
from convert.disk.read_ahead import ReadAhead, readahead_bytes

MIB = 1 << 20
pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/self/fd").exists(),
                                reason="posix_fadvise and /proc are Linux's")


@pytest.fixture
def advice(monkeypatch):
    """Every posix_fadvise call as (file name, offset, length, advice), instead of the real one."""
    calls: list[tuple[str, int, int, int]] = []
    lock = threading.Lock()

    def record(fd, offset, length, how):
        with lock:
            calls.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, offset, length, how))

    monkeypatch.setattr(os, "posix_fadvise", record)
    monkeypatch.setattr(read_ahead, "READ_AHEAD_STEP", MIB // 4)
    return calls


def _files(tmp_path, sizes_mib) -> list[Path]:
    paths = []
    for i, size in enumerate(sizes_mib):
        path = tmp_path / f"tensor{i:05d}_000"
        with open(path, "wb") as f:
            f.truncate(size * MIB)  # sparse: only the sizes matter
        paths.append(path)
    return paths


def _advised_bytes(calls, name) -> int:
    return sum(length for file, _, length, _ in calls if file == name)


def _settle(calls, expected_bytes: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(c[2] for c in calls) < expected_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time for any call past the window to show up


def test_reads_ahead_in_order_within_its_window(tmp_path, advice):
    paths = _files(tmp_path, [1, 1, 1])
    ahead = ReadAhead(paths, window=3 * MIB // 2, step=64 << 10)
    try:
        _settle(advice, 3 * MIB // 2)
        assert sum(c[2] for c in advice) == 3 * MIB // 2  # the whole window, nothing past it
        assert _advised_bytes(advice, paths[0].name) == MIB
        assert all(how == os.POSIX_FADV_WILLNEED and length <= 64 << 10 for _, _, length, how in advice)
        names = [file for file, *_ in advice]
        assert names == sorted(names)  # file after file, in the order given
        offsets = [offset for file, offset, *_ in advice if file == paths[0].name]
        assert offsets == sorted(offsets) and offsets[0] == 0
        ahead.converting(paths[1])  # the window moves with the conversion: 1 MiB + 1.5 MiB
        _settle(advice, 5 * MIB // 2)
        assert sum(c[2] for c in advice) == 5 * MIB // 2
        ahead.converting(paths[2])
        _settle(advice, 3 * MIB)
        assert sum(c[2] for c in advice) == 3 * MIB
    finally:
        ahead.close()
    assert not ahead.thread.is_alive()


def test_files_already_converted_are_skipped(tmp_path, advice):
    paths = _files(tmp_path, [2, 2, 1])
    ahead = ReadAhead(paths, window=MIB // 2)
    try:
        _settle(advice, MIB // 2)
        ahead.converting(paths[2])  # e.g. the shards before it were reused by --resume
        _settle(advice, MIB)
        assert _advised_bytes(advice, paths[0].name) == MIB // 2
        assert _advised_bytes(advice, paths[1].name) == 0
        assert _advised_bytes(advice, paths[2].name) == MIB // 2  # its first half: the window from its start
    finally:
        ahead.close()


def test_close_stops_a_waiting_thread(tmp_path, advice):
    ahead = ReadAhead(_files(tmp_path, [4]), window=MIB // 4)
    _settle(advice, MIB // 4)
    ahead.close()
    assert not ahead.thread.is_alive() and sum(c[2] for c in advice) == MIB // 4


def test_the_default_window_covers_the_largest_file_and_more(tmp_path, advice):
    paths = _files(tmp_path, [3, 1])
    ahead = ReadAhead(paths)
    ahead.close()
    assert ahead.window == 3 * MIB + read_ahead.READ_AHEAD_BEYOND_LARGEST


def test_the_step_is_the_devices_read_ahead_size(tmp_path):
    step = readahead_bytes(tmp_path)
    assert 128 << 10 <= step <= 16 << 20 and step % 4096 == 0
    dev = os.stat(tmp_path).st_dev
    sysfs = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    if sysfs.exists() and 128 <= int(sysfs.read_text()) <= 16 << 10:
        assert step == int(sysfs.read_text()) << 10
