"""Writing one large output file at the disk's speed, with its sha256.

Bytes handed to `ShardFileWriter.write` are copied into page-aligned staging buffers. A background thread
writes each full buffer with O_DIRECT, straight from this process's memory to the disk, while the caller
fills the next one, and a second thread hashes the same buffer during the write.

Why O_DIRECT: copying into the page cache was the largest single cost of an int8 conversion on the 2-core
benchmark machine (28 % of its CPU samples, more than the transposes), and `cp` pays it too. Skipping the
page cache also leaves it to the input's read-ahead, which matters when the output is 318 GB.

Where the file system refuses O_DIRECT (tmpfs on older kernels, some network file systems), or with
GROK_TORCH_DIRECT_IO=0 in the environment, the same buffers are written through the page cache instead.
Either way the file holds exactly the bytes given. The last, partial buffer is written padded to a whole
block, and the file is then truncated to its true length.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ALIGN = 4096  # O_DIRECT wants buffer address, length and file offset in whole logical blocks; 4096 covers 512
STAGE_BYTES = 32 << 20
STAGES = 2  # one being filled by the caller, one being written
DIRECT_IO_ENV = "GROK_TORCH_DIRECT_IO"

_write = os.write  # the one system call that puts bytes in the file (a seam for the disk-full tests)


def direct_io_wanted() -> bool:
    return os.environ.get(DIRECT_IO_ENV, "1").strip().lower() not in ("0", "no", "false", "off")


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for an open file; whether it is now on. False where the platform or the file
    system has no direct I/O (Linux refuses the flag with EINVAL there)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        import fcntl

        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if on else (flags & ~os.O_DIRECT))
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
    except (ImportError, OSError):
        return False


def direct_io_supported(directory: str | os.PathLike) -> bool:
    """Whether files in `directory` take O_DIRECT (found with a probe file, removed again)."""
    probe = Path(directory) / ".grok-torch-direct-io-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return _set_direct(fd, True)
    finally:
        os.close(fd)
        probe.unlink()


class ShardFileWriter:
    """Create `path` (it must not exist) and stream bytes into it; `finish()` returns (size, sha256 hex).

    Use as a context manager: leaving it without `finish()` (an error, Ctrl-C) stops the writer thread and
    closes the file, which the caller then removes. An error of the writer thread (ENOSPC, EIO) is raised
    in the caller's thread by the next `write` or by `finish`, unchanged.
    """

    def __init__(self, path: str | os.PathLike, *, direct: bool | None = None, hash: bool = True,
                 stage_bytes: int = STAGE_BYTES) -> None:
        if stage_bytes <= 0 or stage_bytes % ALIGN:
            raise ValueError(f"stage_bytes must be a positive multiple of {ALIGN}, got {stage_bytes}")
        self.path = path
        self._buffer = mmap.mmap(-1, stage_bytes * STAGES)  # anonymous: page-aligned
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        self.direct = _set_direct(self.fd, True) if (direct_io_wanted() if direct is None else direct) else False
        self.stage_bytes = stage_bytes
        self.size = 0
        self.sha = hashlib.sha256() if hash else None
        self._stages = [np.frombuffer(self._buffer, np.uint8, stage_bytes, i * stage_bytes) for i in range(STAGES)]
        self._free: queue.Queue[int] = queue.Queue()
        for index in range(STAGES):
            self._free.put(index)
        self._full: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._filling: int | None = None
        self._filled = 0
        self._error: BaseException | None = None
        self._stop = False
        self._closed = False
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256") if hash else None
        self._thread = threading.Thread(target=self._drain, name=f"write {os.fspath(path)}", daemon=True)
        self._thread.start()

    # ---- the caller's side ----

    def write(self, data) -> int:
        """Copy `data` (any C-contiguous buffer) into the staging buffers; returns its length in bytes."""
        source = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        done = 0
        while done < source.size:
            if self._filling is None:
                self._filling = self._take_free_stage()
                self._filled = 0
            n = min(self.stage_bytes - self._filled, source.size - done)
            np.copyto(self._stages[self._filling][self._filled:self._filled + n], source[done:done + n])
            self._filled += n
            done += n
            if self._filled == self.stage_bytes:
                self._full.put((self._filling, self._filled))
                self._filling = None
        self.size += done
        return done

    def finish(self, sync: bool = True) -> tuple[int, str | None]:
        """Write what is left, wait for the writer, trim the padding, fsync (if `sync`) and close.
        Returns (bytes written, sha256 hex digest or None)."""
        if self._filling is not None and self._filled:
            self._full.put((self._filling, self._filled))
            self._filling = None
        self._full.put(None)
        self._thread.join()
        self._raise_error()
        if os.fstat(self.fd).st_size != self.size:
            os.ftruncate(self.fd, self.size)  # drop the padding of the last block
        if sync:
            os.fsync(self.fd)
        self._close()
        return self.size, self.sha.hexdigest() if self.sha else None

    def abort(self) -> None:
        """Stop without writing what is queued; close the file (the caller removes it)."""
        if self._closed:
            return
        self._stop = True
        self._full.put(None)
        self._thread.join()
        self._close()

    def __enter__(self) -> "ShardFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def _take_free_stage(self) -> int:
        while True:
            self._raise_error()
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive():
                    self._raise_error()
                    raise RuntimeError(f"{self.path}: the writer thread stopped")

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._stop = True
            raise error

    def _close(self) -> None:
        self._closed = True
        if self._hasher is not None:
            self._hasher.shutdown()
        del self._stages
        try:
            self._buffer.close()
        except BufferError:  # a view of it is still alive somewhere: the garbage collector frees it later
            pass
        os.close(self.fd)

    # ---- the writer thread ----

    def _drain(self) -> None:
        offset = 0
        while True:
            item = self._full.get()
            if item is None:
                return
            index, length = item
            try:
                if not self._stop:
                    self._write_stage(index, length, offset)
                    offset += length
            except BaseException as err:  # handed to the caller's thread
                self._error, self._stop = err, True
            finally:
                self._free.put(index)

    def _write_stage(self, index: int, length: int, offset: int) -> None:
        padded = -(-length // ALIGN) * ALIGN  # only the last stage is not whole blocks
        start = index * self.stage_bytes
        if padded > length:
            self._stages[index][length:padded] = 0
        with memoryview(self._buffer) as whole:
            stage = whole[start:start + padded]
            hashed = self._hasher.submit(self.sha.update, stage[:length]) if self._hasher else None
            try:
                self._write_all(stage, offset)
            finally:
                if hashed is not None:
                    hashed.result()
                stage.release()

    def _write_all(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            try:
                n = _write(self.fd, data[done:])
            except OSError as err:
                # the file system took O_DIRECT when the file was opened but refuses this write: carry on
                # through the page cache, from the same position
                if err.errno == errno.EINVAL and self.direct:
                    self.direct = _set_direct(self.fd, False)
                    if not self.direct:
                        os.lseek(self.fd, offset + done, os.SEEK_SET)
                        continue
                if err.filename is None:  # os.write does not say which file: the message should
                    raise OSError(err.errno, err.strerror, os.fspath(self.path)) from err
                raise
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self.path))
            done += n
