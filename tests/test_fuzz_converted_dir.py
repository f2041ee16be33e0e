"""A seeded fuzz campaign over the converted-directory reader (ConvertedDir, and grok_torch.load on top of it).

Hundreds of copies of two small converted directories (int8 and bf16, several shards each), each with one
file mutated (tests/support/fuzz.py: a shard's header bytes, a shard's header JSON, the index JSON,
config.json). Every case, under a time limit, must end one of two ways:

- refused: a LoadError (and `grok-torch inspect` prints one `error:` line, never "unexpected");
- accepted: every tensor holds exactly the bytes the files claim for it (read back by an oracle that slices
  the shard at the offsets its header states), for the names the index lists, with the dtype and shape the
  unmutated directory has there; load() builds the model from those bytes. Accepted cases whose bytes equal the unmutated directory's are "accepted-same"; a valid file
  can also claim other bytes for a name (two tensors of one dtype and shape trading offsets): "accepted as
  claimed", and then verify=True (the sha256 recorded by the converter) must refuse it, as it must every
  accepted case whose shard files changed.

Never another exception ("unclean"), never a case over the time limit ("hang"), never bytes other than
claimed ("accepted-different"). The counts are printed (pytest -s); GROK_TORCH_FUZZ_CASES=N runs N cases.
"""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import grok_torch
from convert.converter import convert_checkpoint
from convert.upstream.export import export_upstream
from grok_torch.cli import main
from grok_torch.config import GrokConfig
from grok_torch.converted_dir import ConvertedDir, LoadError
from grok_torch.model import Grok
from support.fuzz import MUTATIONS, claimed_bytes

CASES = int(os.environ.get("GROK_TORCH_FUZZ_CASES", "800"))
SEED = 16
LIMIT_S = 10.0  # per case; a case takes milliseconds
CLI_EVERY = 10  # every tenth case also goes through `grok-torch inspect`

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")


class Hang(Exception):
    pass


def _random_int8_state(config: GrokConfig, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in Grok(config, weights="int8").state_dict().items():
        if tensor.dtype == torch.int8:
            state[name] = torch.randint(-128, 128, tensor.shape, dtype=torch.int8, generator=generator)
        else:
            state[name] = (torch.rand(tensor.shape, generator=generator) * 0.02).to(tensor.dtype)
    return state


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Two converted directories written by the converter (hashes, marker) of a random one-layer model, and the
    raw checkpoint they were converted from."""
    config = GrokConfig.from_name("tiny-1l")
    root = tmp_path_factory.mktemp("fuzz-base")
    export_upstream(_random_int8_state(config, SEED), root / "raw", config=config)
    return {weights: convert_checkpoint(root / "raw", root / weights, config, weights=weights,
                                        max_shard_size=60_000).dst for weights in ("int8", "bf16")} | {"raw": root / "raw"}


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _described(tensor: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    return str(tensor.dtype), tuple(tensor.shape)


def _copy(base: Path, case: Path) -> None:
    """A copy made of hard links (the mutations replace a file, never write through it)."""
    case.mkdir()
    for path in base.iterdir():
        os.link(path, case / path.name)


def _changed(base: Path, case: Path, pattern: str) -> bool:
    names = {p.name for p in base.glob(pattern)} | {p.name for p in case.glob(pattern)}
    return any(not (case / n).exists() or not (base / n).exists() or (case / n).read_bytes() != (base / n).read_bytes()
               for n in names)


def _on_alarm(signum, frame):
    raise Hang()


def _run(base: Path, reference: dict[str, bytes], reference_described: dict[str, tuple], case: Path,
         base_config: GrokConfig, changed_config: list[str]) -> str:
    """The outcome of reading `case`: refused | accepted-same | accepted-as-claimed | accepted-different |
    verify-missed (the last two must never happen)."""
    try:
        directory = ConvertedDir(case)
        loaded = {name: _tensor_bytes(directory.tensor(name)) for name in directory.tensors}
        described = {name: _described(directory.tensor(name)) for name in directory.tensors}
        model = grok_torch.load(case, dtype="fp32")  # fp32 compute: the embedding is not cast
    except LoadError as err:
        assert "\n" not in str(err) and str(case) in str(err), str(err)
        return "refused"
    if directory.config.config != base_config:
        changed_config.append(case.name)  # a consistent edit (sha256 updated) to another valid config
    state = {name: _tensor_bytes(t) for name, t in model.state_dict().items()}
    claimed = {name: claimed_bytes(case, name) for name in loaded}
    if any(claimed[name] is None or claimed[name] != loaded[name] or state.get(name) != loaded[name] for name in loaded):
        return "accepted-different"
    if set(loaded) != set(reference) or set(state) != set(loaded):
        return "accepted-different"
    if any(described[name] != reference_described[name] for name in loaded):  # a relabelled dtype, another shape
        return "accepted-different"
    if _changed(base, case, "model-*.safetensors"):  # what verify=True exists for
        try:
            ConvertedDir(case, verify=True)
        except LoadError:
            pass
        else:
            return "verify-missed"
    return "accepted-same" if all(loaded[n] == reference[n] for n in loaded) else "accepted-as-claimed"


def test_fuzz_campaign(bases, tmp_path, capsys):
    from support.checkpoints import sha256_tree

    raw = bases.pop("raw")
    untouched = {weights: sha256_tree(base) for weights, base in bases.items()}
    references, descriptions = {}, {}
    for weights, base in bases.items():
        directory = ConvertedDir(base)
        references[weights] = {name: _tensor_bytes(directory.tensor(name)) for name in directory.tensors}
        descriptions[weights] = {name: _described(directory.tensor(name)) for name in directory.tensors}
        directory.close()
    config = GrokConfig.from_name("tiny-1l")
    changed_config: list[str] = []
    counts: Counter = Counter()
    by_target: dict[str, Counter] = {target: Counter() for target in MUTATIONS}
    problems, slowest = [], 0.0
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    started = time.monotonic()
    try:
        for number in range(CASES):
            rng = random.Random(f"{SEED}-{number}")
            target = list(MUTATIONS)[number % len(MUTATIONS)]
            weights = rng.choice(sorted(bases))
            case = tmp_path / f"case{number:04d}"
            _copy(bases[weights], case)
            description = MUTATIONS[target](rng, case)
            begin = time.monotonic()
            faulthandler.dump_traceback_later(LIMIT_S * 6, exit=True, file=sys.__stderr__)  # hung in native code
            signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
            try:
                outcome = _run(bases[weights], references[weights], descriptions[weights], case, config,
                               changed_config)
                if number % CLI_EVERY == 0:
                    for command in (["inspect", str(case)], ["verify", str(raw), str(case)]):
                        result = CliRunner().invoke(main, command)
                        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
                        good = (result.exit_code in (0, 3) and len(errors) == (result.exit_code == 3)
                                if outcome.startswith("accepted") else result.exit_code == 1 and len(errors) == 1)
                        if not good or "unexpected" in result.output:
                            problems.append(f"case {number} ({description}): {command[0]}: {result.output[-300:]}")
            except Hang:
                outcome = "hang"
            except Exception as err:  # noqa: BLE001 - what the campaign is looking for
                outcome = "unclean"
                problems.append(f"case {number} ({weights}, {description}): {type(err).__name__}: {str(err)[:300]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                faulthandler.cancel_dump_traceback_later()
            slowest = max(slowest, time.monotonic() - begin)
            if outcome in ("accepted-different", "verify-missed", "hang"):
                problems.append(f"case {number} ({weights}, {description}): {outcome}")
            counts[outcome] += 1
            by_target[target][outcome] += 1
            for path in case.iterdir():
                path.unlink()
            case.rmdir()
    finally:
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(f"\nfuzz: {CASES} cases in {elapsed:.1f} s (slowest {slowest * 1000:.0f} ms): "
              + ", ".join(f"{k} {counts[k]}" for k in ("accepted-same", "accepted-as-claimed", "refused",
                                                         "accepted-different", "unclean", "hang", "verify-missed"))
              + f"; {len(changed_config)} accepted with another valid config (edited consistently, sha256 updated)")
        for target, target_counts in by_target.items():
            print(f"  {target}: " + ", ".join(f"{k} {v}" for k, v in sorted(target_counts.items())))
    assert {weights: sha256_tree(base) for weights, base in bases.items()} == untouched  # only copies mutated
    assert problems == []
    assert counts["accepted-different"] == counts["unclean"] == counts["hang"] == counts["verify-missed"] == 0
    # not vacuous: every kind of mutation is refused sometimes, and some mutations are harmless
    assert all(c["refused"] > 0 for c in by_target.values()), by_target
    assert counts["accepted-same"] > 0 and slowest < LIMIT_S
