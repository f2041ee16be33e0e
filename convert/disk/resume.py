"""A conversion's partial output: found again after an interruption, reused only after checking it.

`grok-torch convert SRC DST` writes into `<parent of DST>/.<DST name>.partial` (always that name, so a
rerun finds it) and renames it to DST only when complete; DST itself never exists half-written. Inside,
`.convert-journal.json` records the conversion's options (source path and its files' sizes and times,
weight format, shard size limit, config, version, shard plan) and, as each shard is finished (written,
flushed to disk with fsync, closed), its name, size and the sha256 of the bytes as they were written.
The journal is replaced atomically (write, fsync, rename), so a kill at any moment leaves either the old
or the new one.

On a rerun with `--resume`: the options must be the same (else a clear refusal naming what differs);
each recorded shard is reused only if its size and sha256 still match, and everything else in the
directory (a shard being written when the process died, a shard that fails its check) is removed and
written again. The shards are a pure function of the options, so the result is byte-identical to an
uninterrupted run. Without `--resume`, an existing partial directory is refused, never silently
replaced. A lock (flock on the directory) keeps two converts from writing the same one.

`grok-torch export-serving` (convert.serving) writes its output the same way; `JobNames`, `owned_name` and
`labels` say whose partial directory it is (convert's by default).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from convert.disk.output_dir import DestinationError, install_directory
from grok_torch.converted_dir import is_owned_name, sha256_file
from grok_torch.errors import OutOfSpaceError, is_no_space

JOURNAL_FILE = ".convert-journal.json"
JOURNAL_VERSION = 1


def partial_path(dst: Path) -> Path:
    """Where the conversion to `dst` is built: `.<name>.partial` beside it."""
    return dst.parent / f".{dst.name}.partial"


sha256_of = sha256_file


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _lock(path: Path) -> int | None:
    """An exclusive, non-blocking flock on directory `path`: its fd, or None if another process holds it.
    Released when the fd is closed, including when the process dies."""
    fd = os.open(path, os.O_RDONLY)
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no protection against two concurrent converts
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@dataclass(frozen=True)
class JobNames:
    """How the messages name the job whose output this is: `grok-torch <command>`, "an interrupted <noun>",
    "<gerund> from the start"."""

    command: str
    noun: str
    gerund: str


CONVERT = JobNames("convert", "conversion", "converting")


@dataclass(frozen=True)
class ShardRecord:
    name: str
    size: int
    sha256: str


def _describe_difference(old: dict, new: dict, labels: dict[str, str] | None = None) -> str:
    names = {"source": "source", "source_files": "the source files (sizes or modification times)",
             "weight_format": "--weights", "max_shard_size": "--max-shard-size", "grok_config": "the config",
             "grok_torch_version": "the grok-torch version", "shards": "the shard plan",
             "plan_sha256": "the shard plan", **(labels or {})}
    differ = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if set(differ) - {"shards", "plan_sha256"}:
        differ = [key for key in differ if key not in ("shards", "plan_sha256")]  # follows from the others
    parts = []
    for key in differ:
        label = names.get(key, key)
        shown = key in (labels or {}) and not isinstance(new.get(key), (dict, list))  # a labelled scalar
        if key in ("weight_format", "max_shard_size", "grok_torch_version", "source") or shown:
            parts.append(f"{label} was {old.get(key)}, now {new.get(key)}")
        elif label not in parts:
            parts.append(label)
    return "; ".join(dict.fromkeys(parts))


class PartialOutput:
    """The partial directory of one conversion, locked while this object is open. Use as a context manager:
    on entering, it is created (fresh) or checked and cleaned (resume); then the converter asks `reuse()`
    for each shard, calls `record()` after each shard, and ends with `finish()`, `discard()` or
    `keep_finished()`. `names` says whose output it is (convert's by default), `owned_name(file name)` which
    files that job writes (a converted directory's by default), `labels` how to name its options when a
    resume is refused ({option key: label}; the old and new values of a scalar option are shown)."""

    def __init__(self, dst: Path, options: dict, *, resume: bool, log: Callable[[str], None],
                 names: JobNames = CONVERT, owned_name: Callable[[str], bool] | None = None,
                 labels: dict[str, str] | None = None):
        self.dst = dst
        self.names = names
        self.owned_name = owned_name or is_owned_name
        self.labels = labels
        self.path = partial_path(dst)
        self.options = json.loads(json.dumps(options))  # as it reads back from the journal
        self.resume = resume
        self.log = log
        self.fd: int | None = None
        self.created = False
        self.records: dict[str, ShardRecord] = {}
        self.verified: dict[str, ShardRecord] = {}  # finished shards of an earlier run that passed the check

    # ---- set-up
    def __enter__(self) -> "PartialOutput":
        try:
            return self._enter()
        except OSError as err:
            if is_no_space(err) and not isinstance(err, OutOfSpaceError):
                raise OutOfSpaceError(f"out of disk space on {self.dst.parent} ({err.strerror}) before the "
                                      f"{self.names.noun} started; nothing was left behind") from err
            raise

    def _enter(self) -> "PartialOutput":
        path = self.path
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise DestinationError(f"{path} exists and is not a directory that {self.names.command} made; remove it")
        if not path.exists():
            if self.resume:
                self.log(f"nothing to resume ({path} does not exist): {self.names.gerund} from the start")
            path.mkdir(mode=0o777)  # the umask applies: an ordinary directory once renamed to DST
            self.created = True
            try:
                self._take_lock()
                self._save()
            except BaseException:  # e.g. no inode left for the journal: leave nothing
                self._release()
                self.discard()
                raise
            return self
        self._take_lock()
        try:
            self._adopt()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _take_lock(self) -> None:
        self.fd = _lock(self.path)
        if self.fd is None:
            raise DestinationError(f"{self.path} is being written by another grok-torch {self.names.command} right now; "
                                   f"wait for it to finish")

    def _release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _adopt(self) -> None:
        """Take over the partial directory of an interrupted run (resume only): check, keep, clean."""
        journal = self._load_journal()
        if not self.resume:
            done = f"{len(journal['shards'])} finished shard(s)" if journal else "no finished shard"
            raise DestinationError(f"{self.path} holds the partial output of an interrupted {self.names.noun} ({done}); "
                                   f"rerun with --resume to check and reuse it, or delete it to start over")
        foreign = sorted(p.name for p in self.path.iterdir() if not self._owned(p.name))
        if foreign:
            raise DestinationError(f"{self.path} holds files that {self.names.command} does not write "
                                   f"({', '.join(foreign[:5])}); refusing to resume into it")
        if journal is None:
            self.log(f"{self.path} has no readable journal: {self.names.gerund} from the start")
            self._clear(keep=())
            self._save()
            return
        if journal["options"] != self.options:
            raise DestinationError(f"{self.path} was made with different options ("
                                   f"{_describe_difference(journal['options'], self.options, self.labels)}); rerun with the "
                                   f"same options, or delete it to start over")
        recorded = [ShardRecord(**r) for r in journal["shards"]]
        bad = []
        for record in recorded:
            file = self.path / record.name
            ok = (file.is_file() and not file.is_symlink() and file.stat().st_size == record.size
                  and sha256_of(file) == record.sha256)
            if ok:
                self.verified[record.name] = record
            else:
                bad.append(record.name)
        self._clear(keep=set(self.verified))
        self.records = dict(self.verified)
        self._save()
        kept = sum(r.size for r in self.verified.values())
        message = (f"resuming {self.path}: reusing {len(self.verified)} finished shard(s) ({kept:,} bytes) after "
                   f"checking their size and sha256")
        if bad:
            message += f"; {len(bad)} failed the check and will be written again ({', '.join(bad[:3])})"
        self.log(message)

    def _owned(self, name: str) -> bool:
        return name in (JOURNAL_FILE, JOURNAL_FILE + ".tmp") or self.owned_name(name)

    def _load_journal(self) -> dict | None:
        try:
            journal = json.loads((self.path / JOURNAL_FILE).read_text())
            if journal.get("journal_version") != JOURNAL_VERSION or not isinstance(journal.get("options"), dict):
                return None
            for record in journal["shards"]:
                ShardRecord(**record)
            return journal
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def _clear(self, keep) -> None:
        """Remove everything in the directory but the journal and the shards in `keep`."""
        for entry in self.path.iterdir():
            if entry.name not in keep and entry.name != JOURNAL_FILE:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def _save(self) -> None:
        journal = {"journal_version": JOURNAL_VERSION, "options": self.options,
                   "shards": [r.__dict__ for r in self.records.values()]}
        tmp = self.path / (JOURNAL_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(journal, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / JOURNAL_FILE)
        _fsync_dir(self.path)

    # ---- while writing
    def reusable(self, name: str, size: int) -> bool:
        record = self.verified.get(name)
        return record is not None and record.size == size

    def reuse(self, path: Path, size: int) -> bool:
        """For the writer: keep a verified shard; otherwise make room for writing it afresh."""
        if self.reusable(path.name, size):
            return True
        self.verified.pop(path.name, None)
        self.records.pop(path.name, None)
        if path.exists() or path.is_symlink():
            path.unlink()
        return False

    def record(self, path: Path, size: int, sha256: str) -> None:
        self.records[path.name] = ShardRecord(path.name, size, sha256)
        self._save()

    # ---- ending
    def finish(self, install: Callable[[Path], None] | None = None) -> None:
        """Complete: drop the journal, then `install(path)` the directory as DST (Destination.install: marked as
        grok-torch's, replacing only the old DST that was checked); without `install`, rename it to a DST that
        must not exist."""
        (self.path / JOURNAL_FILE).unlink()
        _fsync_dir(self.path)
        (install or (lambda path: install_directory(path, self.dst)))(self.path)
        _fsync_dir(self.dst.parent)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def keep_finished(self) -> tuple[int, int]:
        """After an interruption: remove what is not a recorded, finished shard (the shard being written);
        keep the rest for --resume. With nothing finished, remove the directory. Returns (shards, bytes) kept."""
        journal = self._load_journal()
        finished = {r["name"]: r["size"] for r in journal["shards"]} if journal else {}
        if not finished:
            self.discard()
            return 0, 0
        self._clear(keep=set(finished))
        return len(finished), sum(finished.values())
