"""Reading files that came from somewhere else (a config.json, an index, a shard's header) without trusting them.

- Only regular files are read: a FIFO would block forever and a device (/dev/zero) never end, so the kind of
  file is checked on the open descriptor (opened non-blocking) before a byte is read.
- JSON files have a size limit (`MAX_JSON_BYTES`), checked before reading, and reading stops there anyway.
- JSON is parsed strictly: a key twice in one object is refused (readers disagree on which one wins), and
  nesting too deep for the parser is an error like any other.

Every problem is raised as the caller's error class (a ValueError subclass) with a message that starts with
the file's path.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 16 << 20  # far above any config or index grok-torch writes (Grok-1's index: about 100 KB)

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a plain file")


def require_regular_file(path: Path, what: str, error: type[ValueError] = ValueError,
                         when_missing: str | None = None) -> os.stat_result:
    """The stat of `path` (links followed) if it is a regular file; `error` naming it otherwise."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path.parent}: {path.name} is missing" + (f": {when_missing}" if when_missing else "")) from None
    except OSError as err:
        raise error(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: not a regular file ({_kind(info.st_mode)}); the {what} must be one, and was not read")
    return info


def read_bytes(path: str | os.PathLike, what: str, error: type[ValueError] = ValueError,
               limit: int = MAX_JSON_BYTES, when_missing: str | None = None) -> bytes:
    """The whole content of the regular file `path`, at most `limit` bytes; `error` naming the file otherwise.
    The file is opened non-blocking and checked on its descriptor, so a FIFO or a device is never read."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{path.parent}: {path.name} is missing: {when_missing}" if when_missing
                    else f"{path}: no such file") from None
    except OSError as err:
        raise error(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: not a regular file ({_kind(info.st_mode)}); the {what} must be one, and was not read")
        if info.st_size > limit:
            raise error(f"{path}: larger than {_mib(limit)} ({info.st_size:,} bytes); not a {what} grok-torch reads")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise error(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if size > limit:  # it grew while being read
        raise error(f"{path}: larger than {_mib(limit)}; not a {what} grok-torch reads")
    return b"".join(chunks)


def _mib(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes % (1 << 20) == 0 else f"{nbytes:,} bytes"


class DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(f"duplicate key {key!r} in one JSON object")
        result[key] = value
    return result


def parse_json(data: bytes, path: Path, what: str, error: type[ValueError] = ValueError) -> Any:
    """`data` (UTF-8 JSON) parsed strictly: no key twice in an object; `error` naming the file otherwise."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except DuplicateKeyError as err:
        raise error(f"{path}: cannot read the {what}: {err}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: cannot read the {what}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise error(f"{path}: cannot read the {what}: JSON nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, and numbers too long to convert
        raise error(f"{path}: cannot read the {what}: not valid JSON: {err}") from None


def read_json(path: str | os.PathLike, what: str, error: type[ValueError] = ValueError, limit: int = MAX_JSON_BYTES,
              when_missing: str | None = None) -> tuple[Any, bytes]:
    """(parsed value, the file's bytes) of a small JSON file, read and parsed as above."""
    data = read_bytes(path, what, error, limit, when_missing)
    return parse_json(data, Path(path), what, error), data


def type_name(value: Any) -> str:
    """'a list', 'a str', ... for messages about a value of the wrong kind."""
    return "null" if value is None else f"a {type(value).__name__}"
