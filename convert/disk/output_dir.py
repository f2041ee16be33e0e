"""Destinations: claimed by one run at a time, replaced only when grok-torch wrote them, never half-written.

- A run claims its destination DST with `Destination`: an exclusive lock on `.<name>.lock` beside it (flock;
  the file holds the run's PID, and a second run on the same DST refuses at once, naming it). The lock is
  held until the run ends and the lock file is removed then (a killed run leaves it, unlocked: harmless).
- Existing DST: refused without overwrite. With overwrite, replaced only if grok-torch wrote it: it holds
  the marker file `.grok-torch-output` that a writer puts in last (which writer, and every file it wrote),
  nothing that the marker does not list, and, for a conversion, a config.json with the format marker. File
  names decide nothing. What is refused or replaced is described in the message.
- The output is built in a partial directory beside DST and renamed into place when complete; the rename
  never replaces a DST that appeared meanwhile, and replaces an old one only if it is still the directory
  that was checked (moved aside first, removed after the rename, put back if it fails).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from grok_torch.converted_dir import CONFIG_FILE, FORMAT_MARKER, grok_torch_version
from grok_torch.errors import OutOfSpaceError, is_no_space
from grok_torch.progress import human_bytes
from grok_torch.untrusted_files import read_json

MARKER_FILE = ".grok-torch-output"
MARKER_FORMAT = "grok-torch-output"
WRITERS = ("convert", "export-upstream", "export-serving")  # the commands that write (and may replace) one
_SCAN_LIMIT = 100_000  # entries looked at when describing or checking a destination


class DestinationError(ValueError):
    """The destination cannot be written: it exists, it is not replaceable, it overlaps the source, another run
    holds it, or it appeared while the output was being built."""


# ---- the lock --------------------------------------------------------------------------------------------------

def lock_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.lock"


class DestinationLock:
    """An exclusive, non-blocking flock on `.<name>.lock` beside `dst`, with this process's PID in it; the
    lock file is removed on release. Taken by another process (or another open here): DestinationError naming
    the holder's PID."""

    def __init__(self, dst: str | os.PathLike, what: str = "grok-torch"):
        self.dst, self.what = Path(dst), what
        self.path = lock_path(self.dst)
        self.fd: int | None = None

    def __enter__(self) -> "DestinationLock":
        try:
            import fcntl
        except ImportError:  # no flock on this platform: no protection against concurrent runs
            return self
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as err:
                if is_no_space(err):
                    raise OutOfSpaceError(f"out of disk space on {self.dst.parent}: cannot create the lock file "
                                          f"{self.path} ({err.strerror}); nothing was written") from err
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise DestinationError(f"{self.dst} is being written by another grok-torch run (PID {holder}); wait "
                                       f"for it to finish, or choose another DST") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # a finishing run removed the file between our open and our lock: take the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return self
        raise DestinationError(f"{self.path}: could not take the lock (the file keeps being replaced)")

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still holding it: whoever opens the path next gets a new file
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


# ---- what a destination holds ----------------------------------------------------------------------------------

def _entries(root: Path) -> list[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything under `root` (links not followed), at most _SCAN_LIMIT."""
    found: list[tuple[str, os.stat_result]] = []
    stack = [root]
    while stack and len(found) < _SCAN_LIMIT:
        directory = stack.pop()
        with os.scandir(directory) as it:
            for entry in it:
                info = entry.stat(follow_symlinks=False)
                found.append((Path(entry.path).relative_to(root).as_posix(), info))
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    return sorted(found)


def _contents(root: Path) -> tuple[str, str]:
    """('4 files, 37 bytes', 'config.json, model-00001-of-00002.safetensors, ...') of what `root` holds (the
    marker not counted)."""
    entries = _entries(root)
    files = [(name, info) for name, info in entries if not stat.S_ISDIR(info.st_mode) and name != MARKER_FILE]
    size = sum(info.st_size for _, info in files)
    at_least = "at least " if len(entries) >= _SCAN_LIMIT else ""
    names = ", ".join(name for name, _ in files[:4]) + (", ..." if len(files) > 4 else "")
    return f"{at_least}{len(files)} files, {human_bytes(size)}", names


def _read_marker(dst: Path) -> dict | str:
    """The marker of a grok-torch output in `dst`, checked; else why `dst` is not one (a phrase)."""
    path = dst / MARKER_FILE
    if not os.path.lexists(path):
        return f"no {MARKER_FILE} marker in it"
    if path.is_symlink():
        return f"{MARKER_FILE} is a symbolic link"
    try:
        marker, _ = read_json(path, "grok-torch output marker", DestinationError)
    except DestinationError as err:
        return str(err).removeprefix(f"{path}: ")
    files = marker.get("files") if isinstance(marker, dict) else None
    if (not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or marker.get("written_by") not in WRITERS
            or not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in files.items())):
        return f"{MARKER_FILE} is not the marker grok-torch writes"
    if marker["written_by"] == "convert":
        try:
            values, _ = read_json(dst / CONFIG_FILE, "config", DestinationError)
        except DestinationError:
            values = None
        if not isinstance(values, dict) or values.get("format") != FORMAT_MARKER:
            return f"its {CONFIG_FILE} does not say \"format\": \"{FORMAT_MARKER}\""
    return marker


def _foreign_entries(dst: Path, marker: dict) -> list[str]:
    """What in `dst` the marker does not account for: anything but the regular files it lists, the
    directories holding them, and the marker itself."""
    listed = set(marker["files"])
    parents = {p.as_posix() for name in listed for p in Path(name).parents if p != Path(".")}
    entries = _entries(dst)
    if len(entries) >= _SCAN_LIMIT:
        return [f"more than {_SCAN_LIMIT:,} entries"]
    foreign = []
    for name, info in entries:
        if name == MARKER_FILE:
            continue
        if stat.S_ISREG(info.st_mode) and name in listed:
            continue
        if stat.S_ISDIR(info.st_mode) and name in parents:
            continue
        foreign.append(name)
    return foreign


def _identity(path: Path) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino


def _check(dst: Path, src: Path | None, overwrite: bool, log: Callable[[str], None] | None):
    """(identity of the directory that may be replaced, or None; whether it is an empty directory)."""
    if not dst.parent.is_dir():
        raise DestinationError(f"{dst}: parent directory {dst.parent} does not exist")
    if src is not None:
        s, d = Path(src).resolve(), dst.resolve()
        if s == d or s.is_relative_to(d) or d.is_relative_to(s):
            raise DestinationError(f"{dst}: the destination overlaps the source {src}")
    if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
        return _identity(dst), True  # an empty directory: nothing to lose
    if not (dst.exists() or dst.is_symlink()):
        return None, False
    if not overwrite:
        raise DestinationError(f"{dst} already exists; use --overwrite to replace it")
    if not dst.is_dir() or dst.is_symlink():
        raise DestinationError(f"{dst} exists and is not a directory; refusing to replace it")
    marker = _read_marker(dst)
    if isinstance(marker, str):
        counts, names = _contents(dst)
        raise DestinationError(f"{dst} was not written by grok-torch ({marker}); refusing to remove it: it holds "
                               f"{counts} ({names}). Remove it yourself, or choose another DST")
    foreign = _foreign_entries(dst, marker)
    if foreign:
        raise DestinationError(f"{dst} holds files that grok-torch did not write ({', '.join(foreign[:5])}"
                               f"{', ...' if len(foreign) > 5 else ''}); refusing to overwrite it")
    if log:
        log(f"replacing {dst}: the output of grok-torch {marker['written_by']} ({_contents(dst)[0]})")
    return _identity(dst), False


def check_destination(dst: str | os.PathLike, src: str | os.PathLike | None, *, overwrite: bool, what: str = "",
                      replaceable: Callable[[str], bool] | None = None,
                      log: Callable[[str], None] | None = None) -> Path:
    """Refuse before any work: an existing, non-empty `dst` without `overwrite`, one that grok-torch did not
    write (see the module's docstring; `replaceable`, the file-name test of earlier versions, is no longer
    used), a missing parent, or a `dst` that is, holds or sits in `src`. `log` is told what will be replaced."""
    dst = Path(dst)
    _check(dst, None if src is None else Path(src), overwrite, log)
    return dst


# ---- writing and installing ------------------------------------------------------------------------------------

def _rename_no_replace(src: Path, dst: Path) -> None:
    """rename(2) that fails with FileExistsError if `dst` exists (renameat2 RENAME_NOREPLACE on Linux; elsewhere,
    or where the file system lacks it, a check just before the rename: every grok-torch run holds the lock)."""
    try:
        import ctypes

        renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, ImportError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def write_marker(directory: Path, written_by: str) -> None:
    """The marker of a complete grok-torch output: who wrote it and every file in it (relative path: size)."""
    files = {name: info.st_size for name, info in _entries(directory) if stat.S_ISREG(info.st_mode)}
    text = json.dumps({"format": MARKER_FORMAT, "written_by": written_by, "grok_torch_version": grok_torch_version(),
                       "files": files}, indent=1) + "\n"
    fd = os.open(directory / MARKER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class Destination:
    """The destination of one run: locked while open, checked under the lock, and installed into by
    `install(partial)` (or `staged()`) without replacing anything but the directory that was checked."""

    def __init__(self, dst: str | os.PathLike, src: str | os.PathLike | None, *, overwrite: bool, what: str,
                 log: Callable[[str], None] | None = None):
        if what not in WRITERS:
            raise ValueError(f"unknown writer {what!r}; expected one of {', '.join(WRITERS)}")
        self.path, self.src, self.overwrite, self.what, self.log = Path(dst), src, overwrite, what, log
        self.lock = DestinationLock(self.path, what)
        self.replaces: tuple[int, int] | None = None
        self.replaces_empty = False

    def __enter__(self) -> "Destination":
        if not self.path.parent.is_dir():
            raise DestinationError(f"{self.path}: parent directory {self.path.parent} does not exist")
        self.lock.__enter__()
        try:
            self.replaces, self.replaces_empty = _check(self.path, None if self.src is None else Path(self.src),
                                                        self.overwrite, self.log)
        except BaseException:
            self.lock.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.__exit__()

    def install(self, partial: Path) -> None:
        """Mark the complete directory `partial` as grok-torch's and rename it to the destination."""
        dst = self.path
        write_marker(partial, self.what)
        if self.replaces is None:
            install_directory(partial, dst)
            return
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}"  # a name, no new inode
        try:
            _rename_no_replace(dst, old)
        except FileNotFoundError:  # it went away meanwhile: nothing to replace
            install_directory(partial, dst)
            return
        if _identity(old) != self.replaces or (self.replaces_empty and any(old.iterdir())):
            _rename_no_replace(old, dst)
            raise DestinationError(f"{dst} changed while grok-torch was writing (it is not the directory that was "
                                   f"checked, or no longer empty); left it untouched (the new output is removed)")
        try:
            _rename_no_replace(partial, dst)
        except BaseException:
            _rename_no_replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """An empty partial directory beside the destination; installed if the block succeeds, else removed.
        Running out of space (bytes, inodes or quota) anywhere in it is an OutOfSpaceError."""
        dst = self.path
        partial = None
        try:
            partial = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
            os.chmod(partial, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
            yield partial
            self.install(partial)
        except BaseException as err:
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)
            if is_no_space(err) and not isinstance(err, OutOfSpaceError):
                raise OutOfSpaceError(f"out of disk space on {dst.parent} ({err}); removed the partial output") from err
            raise


@contextmanager
def staged_directory(dst: Path, what: str = "export-upstream") -> Iterator[Path]:
    """For callers that ran check_destination themselves: claim `dst` (lock), check it again, and yield an empty
    partial directory beside it, installed if the block succeeds, else removed. An existing `dst` is replaced
    only if grok-torch wrote it (the caller's check decided whether one may be replaced at all)."""
    with Destination(dst, None, overwrite=True, what=what) as target, target.staged() as partial:
        yield partial


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def install_directory(partial: Path, dst: Path) -> None:
    """Rename the complete directory `partial` to `dst`, which must not exist (Destination.install replaces a
    checked one)."""
    try:
        _rename_no_replace(partial, dst)
    except FileExistsError:
        raise DestinationError(f"{dst} appeared while grok-torch was writing it; left it untouched (the new output "
                               f"is removed); remove it or choose another DST, and run again") from None
