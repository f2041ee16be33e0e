"""The raw checkpoint as a whole: the directory `ckpt-0/` and its file set, checked against a config.

`validate_raw_checkpoint` checks file count and names, and every tensor's kind, dtype and shape from
pickle metadata alone (`convert.upstream.tensor_file`), before anything is read; `iter_raw_checkpoint`
and `read_raw_checkpoint` then give the parameters, under their haiku names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from convert.upstream.param_names import ParamEntry, checkpoint_layout, parameter_count
from convert.upstream.quantized import QuantizedWeight8bit
from convert.upstream.tensor_file import CheckpointError, TensorFileInfo, read_tensor_file, scan_tensor_file

if TYPE_CHECKING:
    from grok_torch.config import GrokConfig


TENSOR_FILE = "tensor{index:05d}_000"
_TENSOR_FILE_RE = re.compile(r"^tensor(\d{5})_000$")


def resolve_ckpt_dir(src: str | os.PathLike) -> Path:
    """A directory holding `ckpt-0/`, or `ckpt-0` itself -> the directory of tensor files."""
    src = Path(src)
    if (src / "ckpt-0").is_dir():
        return src / "ckpt-0"
    if src.is_dir() and any(_TENSOR_FILE_RE.match(p.name) for p in src.iterdir()):
        return src
    if not src.exists():
        raise CheckpointError(f"{src}: no such directory; expected a raw checkpoint (a directory holding ckpt-0/)")
    raise CheckpointError(f"{src}: not a raw checkpoint: expected ckpt-0/ with files tensor00000_000, ... inside")


def is_raw_checkpoint(path: str | os.PathLike) -> bool:
    try:
        resolve_ckpt_dir(path)
        return True
    except CheckpointError:
        return False


PROBLEMS_SHOWN = 5  # an error is one line: the first few problems, and how many more


class FileCountError(CheckpointError):
    """The checkpoint's tensor files do not match the number the config asks for (often: the wrong config)."""


def check_file_list(ckpt_dir: Path, count: int) -> list[Path]:
    """The `count` tensor files of `ckpt_dir` in order; missing or extra entries raise CheckpointError."""
    expected = [TENSOR_FILE.format(index=i) for i in range(count)]
    present = {p.name for p in ckpt_dir.iterdir()}
    missing = [name for name in expected if name not in present]
    extra = sorted(present - set(expected))
    problems = []
    if missing:
        problems.append(f"missing file(s) {_name_list(missing)}")
    if extra:
        problems.append(f"extra file(s) {_name_list(extra)}")
    if problems:
        found = sum(1 for name in present if _TENSOR_FILE_RE.match(name))
        fits = (f" (its {found} tensor files fit a {(found - 2) // 12}-layer Grok)"
                if found > 2 and (found - 2) % 12 == 0 else "")
        raise FileCountError(f"{ckpt_dir}: " + "; ".join(problems) + f"; expected exactly {count} files "
                             f"{expected[0]} .. {expected[-1]} for this config{fits}")
    return [ckpt_dir / name for name in expected]


def _name_list(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# Accepted storage per parameter kind. Linear weights: int8+bf16 scales as released, or plain float
# (a dequantized re-save). Embedding, norms and router: float32 only, as upstream keeps them; a bf16
# one would be a different checkpoint (or a mixed-up file) and is refused rather than guessed at.
PLAIN_LINEAR_DTYPES = ("bfloat16", "float32")
NON_LINEAR_DTYPES = ("float32",)


def expected_storage(entry: ParamEntry) -> str:
    """What validation accepts for `entry`, in words (for error messages and docs)."""
    if entry.quantizable:
        return (f"QuantizedWeight8bit(int8{list(entry.haiku_shape)}, scales bfloat16"
                f"{list(entry.haiku_scales_shape)}) or a bfloat16/float32 array {list(entry.haiku_shape)}")
    return f"a float32 array {list(entry.haiku_shape)}"


def check_tensor(entry: ParamEntry, info: TensorFileInfo) -> str | None:
    """None if `info` is an acceptable storage of `entry`, else what is wrong (without the file name)."""
    ok = False
    if info.quantized:
        ok = (entry.quantizable and info.array.dtype == "int8" and info.array.shape == entry.haiku_shape
              and info.scales.dtype == "bfloat16" and info.scales.shape == entry.haiku_scales_shape)
    elif entry.quantizable:
        ok = info.dtype in PLAIN_LINEAR_DTYPES and info.shape == entry.haiku_shape
    else:
        ok = info.dtype in NON_LINEAR_DTYPES and info.shape == entry.haiku_shape
    if ok:
        return None
    return f"parameter {entry.haiku_name}: found {info.describe()}; expected {expected_storage(entry)}"


def validate_raw_checkpoint(src: str | os.PathLike, config: "GrokConfig") -> list[tuple[ParamEntry, TensorFileInfo]]:
    """Check the whole checkpoint against `config` from metadata only: file count and names, and every
    tensor's kind, dtype and shape. Returns (entry, info) in file order; raises one CheckpointError listing
    every problem (each naming file and parameter)."""
    ckpt_dir = resolve_ckpt_dir(src)
    # The config may be untrusted (SRC/config.json): the file count and the bytes must fit it before its
    # layout is built, so a config of a model the checkpoint cannot hold costs nothing to refuse.
    files = check_file_list(ckpt_dir, parameter_count(config))
    try:
        config.check_stored_bytes(sum(os.stat(path).st_size for path in files), f"its {len(files)} files")
    except ValueError as err:
        raise CheckpointError(f"{ckpt_dir}: {err}") from None
    layout = checkpoint_layout(config)
    pairs, problems = [], []
    for entry, path in zip(layout, files):
        try:
            info = scan_tensor_file(path)
        except CheckpointError as err:
            problems.append(f"{err} (parameter {entry.haiku_name})")
            continue
        problem = check_tensor(entry, info)
        if problem:
            problems.append(f"{path}: {problem}")
        pairs.append((entry, info))
    if problems:
        head = f"{ckpt_dir}: {len(problems)} tensor file(s) do not match the config"
        raise CheckpointError(head + ": " + "; ".join(problems[:PROBLEMS_SHOWN])
                              + (f"; ... and {len(problems) - PROBLEMS_SHOWN} more" if len(problems) > PROBLEMS_SHOWN else ""))
    return pairs


def iter_raw_checkpoint(src: str | os.PathLike, config: "GrokConfig"
                        ) -> Iterator[tuple[ParamEntry, np.ndarray | QuantizedWeight8bit]]:
    """Validate, then yield (entry, value) one parameter at a time (memory: one parameter)."""
    for entry, info in validate_raw_checkpoint(src, config):
        yield entry, read_tensor_file(info.path, info)


def read_raw_checkpoint(src: str | os.PathLike, config: "GrokConfig"
                        ) -> dict[str, dict[str, np.ndarray | QuantizedWeight8bit]]:
    """The whole checkpoint as haiku's tree: {module path: {param: value}}, e.g.
    `tree["transformer/decoder_layer_0/moe/linear"]["w"]`. Loads everything: for tests and small models."""
    tree: dict[str, dict[str, np.ndarray | QuantizedWeight8bit]] = {}
    for entry, value in iter_raw_checkpoint(src, config):
        tree.setdefault(entry.haiku_module, {})[entry.haiku_param] = value
    return tree
