"""Helpers that build raw checkpoints for tests: copies of the golden one, altered or permuted."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

from convert.upstream.param_names import checkpoint_layout
from convert.upstream.raw_checkpoint import TENSOR_FILE
from grok_torch.config import GrokConfig
from support.paths import GOLDEN_DIR



def golden_config() -> GrokConfig:
    return GrokConfig.from_json(GOLDEN_DIR / "config.json")


def copy_golden(dst_dir: Path) -> Path:
    """A writable copy of the golden checkpoint: dst_dir/ckpt-0/... (config.json not copied); returns dst_dir."""
    shutil.copytree(GOLDEN_DIR / "ckpt-0", Path(dst_dir) / "ckpt-0")
    return Path(dst_dir)


def tensor_path(ckpt_root: Path, index: int) -> Path:
    return Path(ckpt_root) / "ckpt-0" / TENSOR_FILE.format(index=index)


def replace_tensor(ckpt_root: Path, index: int, obj: object, protocol: int = 4) -> Path:
    """Overwrite file `index` with `pickle.dumps(obj)` (pickling only; nothing is ever unpickled)."""
    path = tensor_path(ckpt_root, index)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def entry_index(config: GrokConfig, haiku_name: str) -> int:
    """File index of a parameter, e.g. `transformer/decoder_layer_2/rms_norm/scale`."""
    return next(e.index for e in checkpoint_layout(config) if e.haiku_name == haiku_name)


def permute_layers_numeric(src_dir: Path, dst_dir: Path, config: GrokConfig) -> Path:
    """Write dst_dir/ckpt-0 with the layers' files in numeric layer order (0, 1, 2, ...) where the format
    has them in lexicographic order (0, 1, 10, 11, 2, ...): the mistake of a converter that assumes numeric
    order. The k-th layer slot of the file sequence then holds layer k, so a correct reader sees, e.g.,
    layer 2's weights as `decoder_layer_10`. Shapes agree, so validation passes; the model must not."""
    src_ckpt, dst_ckpt = Path(src_dir) / "ckpt-0", Path(dst_dir) / "ckpt-0"
    dst_ckpt.mkdir(parents=True)
    layout = checkpoint_layout(config)
    lexicographic = sorted(range(config.num_layers), key=str)  # layer of each slot in file order
    by_name = {e.haiku_name: e.index for e in layout}
    for entry in layout:
        source_index = entry.index
        if entry.layer is not None:
            numeric_layer = lexicographic.index(entry.layer)  # the slot number this layer occupies
            source_name = entry.haiku_name.replace(f"decoder_layer_{entry.layer}/", f"decoder_layer_{numeric_layer}/")
            source_index = by_name[source_name]
        shutil.copyfile(src_ckpt / TENSOR_FILE.format(index=source_index),
                        dst_ckpt / TENSOR_FILE.format(index=entry.index))
    return Path(dst_dir)


class SystemCall:
    """Unpickling this would run `os.system(command)`."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EvalCall:
    """Unpickling this would run `eval(source)`."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return eval, (self.source,)


class PopenCall:
    """Unpickling this would start `subprocess.Popen(argv)`."""

    def __init__(self, argv: list[str]):
        self.argv = argv

    def __reduce__(self):
        import subprocess

        return subprocess.Popen, (self.argv,)


def sha256_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path (to show that inputs are never modified)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def copy_golden_with_config(dst_dir: Path) -> Path:
    """copy_golden plus the golden config.json beside ckpt-0 (so the CLI picks it up); returns dst_dir."""
    copy_golden(dst_dir)
    shutil.copyfile(GOLDEN_DIR / "config.json", Path(dst_dir) / "config.json")
    return Path(dst_dir)


def random_conversion(root: Path, config: GrokConfig, seed: int = 0) -> tuple[Path, dict]:
    """parity.init's seeded random weights for `config`, written in the official format by export-upstream
    (root/upstream) and converted to int8 (root/converted). Returns (the converted directory, the haiku tree
    {module: {param: array | QuantizedWeight8bit}} that was written)."""
    from convert.converter import convert_checkpoint
    from convert.upstream.export import export_upstream
    from convert.upstream.tree import haiku_tree_to_state_dict
    from parity.init import init_params

    params = init_params(config, seed=seed)
    export_upstream(haiku_tree_to_state_dict(params, config), Path(root) / "upstream", config=config, progress=False)
    converted = convert_checkpoint(Path(root) / "upstream", Path(root) / "converted", config, progress=False).dst
    return converted, params
