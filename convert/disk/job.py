"""A resumable job that writes a directory of sharded safetensors: what `convert` and `export-serving` share.

`write_resumable(dst, tensors, ...)` works in the partial directory of `dst` (convert.disk.resume.PartialOutput:
`.<name>.partial` beside it, locked, found again by --resume): it checks the free space, streams the shards
(convert.disk.safetensors_writer; a finished shard of an interrupted run is kept after its size and sha256
check), writes the job's small files (config.json, ...), then the index (with the sha256 of every shard and
of the small files named in `sha256_files`, when asked), and installs the directory: through the caller's
`destination` (convert.disk.output_dir.Destination: marked as grok-torch's, replacing only the checked old
DST), else renamed to a DST that must not exist. On Ctrl-C the finished shards are kept and `interrupted` (a
JobInterrupted) says how to resume; on any other error the partial directory is removed, and a full disk
(bytes, inodes or quota) is reported as OutOfSpaceError. The caller's `options` decide what a resumed run
must share with the interrupted one; the shard plan is added to them here.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable

from convert.disk.output_dir import Destination
from convert.disk.resume import CONVERT, JobNames, PartialOutput
from convert.disk.safetensors_writer import TensorToWrite, plan_shard_files, shard_header, shards_index_text, \
    write_sharded_safetensors
from grok_torch.converted_dir import INDEX_FILE, INDEX_SHA256
from grok_torch.errors import JobInterrupted, OutOfSpaceError, is_no_space
from grok_torch.progress import human_bytes, progress_bar

TEST_STOP_ENV = "GROK_TORCH_TEST_STOP_AT"


def test_stop(event: str) -> None:
    """Test hook only: with GROK_TORCH_TEST_STOP_AT=<event> in the environment ("tensor:N": before the N-th
    tensor written in this run; "shard:N": after the N-th shard finished in this run; "install": before the
    rename into place), announce it on stderr and stop the process (SIGSTOP) there, so a test can kill it
    (SIGKILL) or interrupt it (SIGINT, then SIGCONT) at exactly that point."""
    if os.environ.get(TEST_STOP_ENV) == event and hasattr(signal, "SIGSTOP"):
        sys.stderr.write(f"{TEST_STOP_ENV}: stopped at {event}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)


def _with_stop_points(tensors: list[TensorToWrite]) -> list[TensorToWrite]:
    """The tensors, each announcing "tensor:N" (N counted in the order they are written) when the hook is on."""
    if TEST_STOP_ENV not in os.environ:
        return tensors
    started = itertools.count(1)

    def hooked(chunks: Callable[[], Iterable]) -> Callable[[], Iterable]:
        def call():
            test_stop(f"tensor:{next(started)}")
            return chunks()

        return call

    return [TensorToWrite(t.name, t.dtype, t.shape, hooked(t.chunks)) for t in tensors]


def space_needed(partial: PartialOutput, files: list, extra_sizes: list[int]) -> int:
    """Bytes the rest of the job will occupy: the shards not reused, the small files, the journal and the
    marker, each rounded up to whole blocks of the file system."""
    try:
        block = max(1, os.statvfs(partial.path).f_frsize)
    except (AttributeError, OSError):
        block = 4096
    sizes = [size for name, size, _ in files if not partial.reusable(name, size)]
    sizes += list(extra_sizes) + [64 << 10]  # the journal, generously
    sizes.append(256 + 80 * (len(files) + len(extra_sizes) + 1))  # the marker: a line per file
    return sum(-(-size // block) * block for size in sizes)


@dataclass(frozen=True)
class JobResult:
    shards: list[Path]
    reused: int  # finished shards of an interrupted run, checked and kept


def _encoded(content: str | bytes) -> bytes:
    return content if isinstance(content, bytes) else content.encode()


def write_resumable(dst: Path, tensors: list[TensorToWrite], *, options: dict, max_shard_size: int,
                    metadata: dict[str, str], index_metadata: dict[str, object], extra_files: dict[str, str | bytes],
                    resume: bool, check_space: bool, progress: bool | None, desc: str,
                    log: Callable[[str], None], interrupted: type[JobInterrupted], names: JobNames = CONVERT,
                    owned_name: Callable[[str], bool] | None = None, labels: dict[str, str] | None = None,
                    reading: Callable[[PartialOutput, list], ContextManager] | None = None,
                    destination: Destination | None = None, sha256_files: tuple[str, ...] | None = None) -> JobResult:
    """Write `tensors` (+ index) and `extra_files` {name: text or bytes} as the directory `dst`, resumably.

    `reading(partial, files)`, if given, is a context manager entered around the writing (the converter's
    read-ahead of the sources of the shards not reused). `names`, `owned_name` and `labels` describe the
    job to PartialOutput (messages, the files it writes, the option names shown when a resume is refused).
    `destination`: the claimed DST to install into (see the module's docstring). `sha256_files`: with it, the
    index's metadata records {file: sha256} of every shard and of these extra files (a converted directory's
    config.json), what `grok-torch verify DIR` checks.
    """
    if destination is not None and destination.path != dst:
        raise ValueError(f"destination {destination.path} is not {dst}")
    files = plan_shard_files(tensors, max_shard_size, metadata)
    options = {**options, "shards": [[name, size] for name, size, _ in files],
               "plan_sha256": hashlib.sha256(b"".join(shard_header(shard, metadata) for _, _, shard in files)
                                             ).hexdigest()}
    sized_metadata = dict(index_metadata)
    if sha256_files is not None:  # the index's size, with 64 hex digits where each sha256 will be
        sized_metadata[INDEX_SHA256] = {name: "0" * 64 for name in [*(name for name, _, _ in files), *sha256_files]}
    extra_sizes = [len(shards_index_text(files, sized_metadata).encode())]
    extra_sizes += [len(_encoded(content)) for content in extra_files.values()]
    total = sum(t.nbytes for t in tensors)
    written = itertools.count(1)

    with PartialOutput(dst, options, resume=resume, log=log, names=names, owned_name=owned_name,
                       labels=labels) as partial:
        needed = space_needed(partial, files, extra_sizes)
        free = shutil.disk_usage(partial.path).free
        if check_space and needed > free:
            kept = "" if partial.created else f"; {partial.path} is kept for --resume"
            if partial.created:
                partial.discard()
            raise OutOfSpaceError(f"not enough free space on {dst.parent}: the {names.noun} needs "
                                  f"{human_bytes(needed)}, {human_bytes(free)} are free{kept}; free some space or "
                                  f"choose another DST (--no-space-check skips this check)")
        reused = sum(1 for name, size, _ in files if partial.reusable(name, size))

        def on_shard(path: Path, size: int, sha256: str) -> None:
            partial.record(path, size, sha256)
            if TEST_STOP_ENV in os.environ:
                test_stop(f"shard:{next(written)}")

        with reading(partial, files) if reading is not None else contextlib.nullcontext():
            try:
                with progress_bar(total, desc, progress) as bar:
                    shards = write_sharded_safetensors(partial.path, _with_stop_points(tensors),
                                                       max_shard_size=max_shard_size, metadata=metadata,
                                                       on_bytes=bar.update, reuse_shard=partial.reuse,
                                                       on_shard=on_shard, write_index=False)
                    for name, content in extra_files.items():
                        (partial.path / name).write_bytes(_encoded(content))
                    (partial.path / INDEX_FILE).write_text(shards_index_text(files, _index_metadata(
                        partial, files, index_metadata, extra_files, sha256_files)))
                test_stop("install")
                partial.finish(destination.install if destination is not None else None)
            except KeyboardInterrupt:
                if not partial.path.exists() and dst.exists():
                    raise  # interrupted after the rename: the output is complete
                shards_kept, bytes_kept = partial.keep_finished()
                if shards_kept:
                    message = (f"interrupted: kept {shards_kept} finished shard(s), {human_bytes(bytes_kept)}, in "
                               f"{partial.path}; rerun the same command with --resume to check and reuse them")
                else:
                    message = f"interrupted before any shard was finished: removed {partial.path}"
                raise interrupted(message) from None
            except OSError as err:
                partial.discard()
                if is_no_space(err):
                    raise OutOfSpaceError(f"out of disk space on {dst.parent}: the {names.noun} needs "
                                          f"{human_bytes(needed)}, {human_bytes(free)} were free when it started; "
                                          f"removed the partial output {partial.path}") from err
                raise
            except BaseException:
                partial.discard()
                raise
    return JobResult(shards, reused)


def _index_metadata(partial: PartialOutput, files: list, index_metadata: dict[str, object],
                    extra_files: dict[str, str | bytes], sha256_files: tuple[str, ...] | None) -> dict[str, object]:
    """The index's metadata: the caller's, and with `sha256_files` the sha256 of every shard (as written, or
    as checked when reused: the journal's records) and of those extra files, in shard order."""
    if sha256_files is None:
        return index_metadata
    sums = {name: partial.records[name].sha256 for name, _, _ in files}
    sums.update({name: hashlib.sha256(_encoded(extra_files[name])).hexdigest() for name in sha256_files})
    return {**index_metadata, INDEX_SHA256: sums}
