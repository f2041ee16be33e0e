"""A destination without enough space: refused up front, or ENOSPC while writing; cleaned up either way.

The real thing runs on a small tmpfs when this machine lets the test mount one (root); the same paths are
also driven by a simulated file system (free space reported by shutil.disk_usage, ENOSPC raised by the
shard writer's files after a byte budget), so they are tested everywhere.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
from click.testing import CliRunner

import convert.disk.shard_file as shard_file
from convert.cli import convert_cmd
from convert.converter import convert_checkpoint
from grok_torch.errors import EXIT_NO_SPACE, OutOfSpaceError
from support.disk import FullDisk
from support.checkpoints import golden_config, sha256_tree

NEEDED = "7,487,488 bytes (7.5 MB)"  # the golden checkpoint in int8, 1 MB shards, in 4 KiB blocks, marker included


Usage = namedtuple("Usage", "total used free")


def _report_free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(free * 10, free * 9, free))


def _assert_clean(parent: Path) -> None:
    assert [p.name for p in parent.iterdir()] == []


def test_not_enough_space_is_refused_before_writing(src, src_sums, tmp_path, monkeypatch):
    _report_free(monkeypatch, 1_000_000)
    with pytest.raises(OutOfSpaceError) as err:
        convert_checkpoint(src, tmp_path / "out", golden_config(), max_shard_size=1_000_000)
    assert str(err.value) == (f"not enough free space on {tmp_path}: the conversion needs {NEEDED}, "
                              f"1,000,000 bytes (1.0 MB) are free; free some space or choose another DST "
                              f"(--no-space-check skips this check)")
    assert err.value.errno == errno.ENOSPC
    _assert_clean(tmp_path)
    assert sha256_tree(src) == src_sums


def test_enough_space_passes_the_check(src, tmp_path, monkeypatch):
    _report_free(monkeypatch, 7_487_488)
    convert_checkpoint(src, tmp_path / "out", golden_config(), max_shard_size=1_000_000)
    assert len(list((tmp_path / "out").iterdir())) == 11  # 8 shards, index, config, marker


@pytest.mark.parametrize("budget", [100, 2_500_000, 7_300_000])
def test_disk_filling_up_while_writing_removes_the_partial_output(src, src_sums, tmp_path, monkeypatch, budget):
    monkeypatch.setattr(shard_file, "_write", FullDisk(budget).write)
    with pytest.raises(OutOfSpaceError) as err:
        convert_checkpoint(src, tmp_path / "out", golden_config(), max_shard_size=1_000_000)
    free = shutil.disk_usage(tmp_path).free
    message = str(err.value)
    assert message.startswith(f"out of disk space on {tmp_path}: the conversion needs {NEEDED}, ")
    assert message.endswith(f"were free when it started; removed the partial output {tmp_path / '.out.partial'}")
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert free > 0
    _assert_clean(tmp_path)
    assert sha256_tree(src) == src_sums


def test_cli_exit_code_and_one_line(src, src_sums, tmp_path, monkeypatch):
    _report_free(monkeypatch, 1_000_000)
    result = CliRunner().invoke(convert_cmd, [str(src), str(tmp_path / "out"), "--max-shard-size", "1MB"])
    assert result.exit_code == EXIT_NO_SPACE == 4
    assert result.stderr.splitlines()[-1].startswith("error: not enough free space on ")
    assert "Traceback" not in result.output
    monkeypatch.setattr(shard_file, "_write", FullDisk(3_000_000).write)
    result = CliRunner().invoke(convert_cmd, [str(src), str(tmp_path / "out"), "--max-shard-size", "1MB",
                                              "--no-space-check"])
    assert result.exit_code == 4 and result.stderr.splitlines()[-1].startswith("error: out of disk space on ")
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    _assert_clean(tmp_path)
    assert sha256_tree(src) == src_sums


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs at tmp_path/mnt (needs root and a mount that is allowed here), unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root: the simulated tests above cover the same paths")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the simulated tests above cover the same paths")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_real_small_file_system(src, src_sums, small_tmpfs):
    needed = re.escape(f"the conversion needs {NEEDED}, ")
    with pytest.raises(OutOfSpaceError, match=f"not enough free space on {small_tmpfs}: {needed}"
                                              r"3,1\d\d,\d\d\d bytes \(3\.1 MB\) are free"):
        convert_checkpoint(src, small_tmpfs / "out", golden_config(), max_shard_size=1_000_000)
    _assert_clean(small_tmpfs)
    with pytest.raises(OutOfSpaceError, match=f"out of disk space on {small_tmpfs}: {needed}"
                                              r"3,1\d\d,\d\d\d bytes \(3\.1 MB\) were free when it started; "
                                              r"removed the partial output"):
        convert_checkpoint(src, small_tmpfs / "out", golden_config(), max_shard_size=1_000_000, check_space=False)
    _assert_clean(small_tmpfs)
    assert shutil.disk_usage(small_tmpfs).used == 0
    assert sha256_tree(src) == src_sums
