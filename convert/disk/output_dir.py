"""All-or-nothing output directories: build beside the destination, rename into place when complete.

The work happens in `<parent>/.<name>.partial-XXXX`; on success it is renamed to `<name>` (an existing
destination, when overwriting is allowed, is first moved aside and removed only after the rename); on any
failure the partial directory is removed, so the destination is either complete or untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


class DestinationError(ValueError):
    """The destination cannot be written: it exists, it is not replaceable, or it overlaps the source."""


def check_destination(dst: str | os.PathLike, src: str | os.PathLike | None, *, overwrite: bool,
                      replaceable: Callable[[str], bool], what: str) -> Path:
    """Refuse before any work: an existing, non-empty `dst` without `overwrite`, one holding entries this tool does not
    write (`replaceable(name)` is False), a missing parent, or a `dst` that is, holds or sits in `src`."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        raise DestinationError(f"{dst}: parent directory {dst.parent} does not exist")
    if src is not None:
        s, d = Path(src).resolve(), dst.resolve()
        if s == d or s.is_relative_to(d) or d.is_relative_to(s):
            raise DestinationError(f"{dst}: the destination overlaps the source {src}")
    if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
        return dst  # an empty directory: nothing to lose
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise DestinationError(f"{dst} already exists; use --overwrite (overwrite=True) to replace it")
        if not dst.is_dir() or dst.is_symlink():
            raise DestinationError(f"{dst} exists and is not a directory; refusing to replace it")
        foreign = sorted(p.name for p in dst.iterdir() if not replaceable(p.name))
        if foreign:
            raise DestinationError(f"{dst} holds files that {what} does not write ({', '.join(foreign[:5])}); "
                                   f"refusing to overwrite it")
    return dst


@contextmanager
def staged_directory(dst: Path) -> Iterator[Path]:
    """Yield an empty partial directory beside `dst`; install it as `dst` if the block succeeds, else remove it."""
    partial = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        os.chmod(partial, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
        yield partial
        _install(partial, dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def install_directory(partial: Path, dst: Path) -> None:
    """Rename the complete directory `partial` to `dst`; an existing `dst` is moved aside first and removed
    only after the rename (put back if the rename fails)."""
    _install(partial, dst)


def _install(partial: Path, dst: Path) -> None:
    if not (dst.exists() or dst.is_symlink()):
        os.rename(partial, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rmdir(old)
    os.rename(dst, old)
    try:
        os.rename(partial, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
