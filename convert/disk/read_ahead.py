"""Reading the raw checkpoint ahead of the converter, into the page cache, so the disk is never idle while
the converter transposes and writes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

READ_AHEAD_STEP = 64 << 20  # how often the read-ahead thread checks its window
READ_AHEAD_BEYOND_LARGEST = 1 << 30


def readahead_bytes(path: Path) -> int:
    """The most one posix_fadvise(WILLNEED) reads for `path`'s file system: Linux cuts each call to the
    device's read-ahead size (8 MiB on the benchmark machine's disk, 128 KiB by default), so one call for a
    whole file reads only its first few MiB. From /sys/class/bdi; 128 KiB where that cannot be read."""
    try:
        dev = os.stat(path).st_dev
        kib = int(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text())
    except (OSError, ValueError, AttributeError):
        kib = 128
    return min(max(kib, 128), 16 << 10) << 10


class ReadAhead:
    """Keeps the disk reading the input ahead of the conversion. One background thread asks the kernel to read
    the raw files into the page cache (posix_fadvise WILLNEED, in steps the kernel does not cut short), in
    order, at most `window` bytes past the start of the file being converted: the largest file plus 1 GiB by
    default, so the next file is on its way while the largest one is converted. Without it the transposes
    fault in their input column by column from a cold disk (an int8 MoE weight took 6-8 s instead of 1.3 s).

    This fills the page cache, not this process's memory, and is a hint: errors are ignored, and where
    posix_fadvise does not exist nothing is done."""

    def __init__(self, paths: list[Path], window: int | None = None, step: int | None = None) -> None:
        self.files: list[tuple[Path, int, int]] = []  # (path, start in the input stream, size)
        start = 0
        for path in paths:
            try:
                size = os.stat(path).st_size
            except OSError:
                size = 0
            self.files.append((path, start, size))
            start += size
        largest = max((size for _, _, size in self.files), default=0)
        self.window = window if window is not None else largest + READ_AHEAD_BEYOND_LARGEST
        self.step = step or (readahead_bytes(paths[0]) if paths else 128 << 10)
        self.starts = {path: begin for path, begin, _ in self.files}
        self.position = 0  # start of the file being converted
        self.stopped = False
        self.changed = threading.Condition()
        self.thread = None
        if hasattr(os, "posix_fadvise") and self.files:
            self.thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
            self.thread.start()

    def converting(self, path: Path) -> None:
        with self.changed:
            self.position = self.starts.get(path, self.position)
            self.changed.notify()

    def close(self) -> None:
        with self.changed:
            self.stopped = True
            self.changed.notify()
        if self.thread is not None:
            self.thread.join()

    def _run(self) -> None:
        for path, start, size in self.files:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            except OSError:
                continue
            try:
                for offset in range(0, size, READ_AHEAD_STEP):
                    with self.changed:
                        while not self.stopped and start + offset + READ_AHEAD_STEP > self.position + self.window:
                            self.changed.wait()
                        if self.stopped:
                            return
                        if start + size <= self.position:
                            break  # already converted (or skipped: a reused shard)
                    end = min(offset + READ_AHEAD_STEP, size)
                    for at in range(offset, end, self.step):
                        os.posix_fadvise(fd, at, min(self.step, end - at), os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)
