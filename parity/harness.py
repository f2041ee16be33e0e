"""The parity harness: run grok_torch and a reference on the same weights and tokens, and compare
every sub-module's output, layer by layer, in two modes.

- end_to_end: both run the whole model from the tokens; errors compound as they would in use.
- teacher_forced: each grok_torch layer is fed the reference's input to that layer (and the head
  the reference's last hidden state), so an error shows in the layer that makes it.

The reference is the JAX/haiku model of parity.reference on a random config, or a golden directory
produced by the upstream code itself (official ckpt-0 + reference.npz).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from grok_torch.config import GrokConfig
from grok_torch.loading import from_state_dict
from grok_torch.model import COMPUTE_DTYPES, Grok
from parity.compare import (AFTER_EXPERT_CHOICE, DistributionAgreement, TensorComparison, compare_experts,
                            compare_tensor, distribution_agreement, forward_order)
from parity.tolerances import DISTRIBUTION_TOLERANCES, NEAR_TIE_MARGIN, TOLERANCES, tier_of

MODES = ("teacher_forced", "end_to_end")


@dataclass
class ParityRun:
    mode: str
    comparisons: list[TensorComparison]
    distribution: DistributionAgreement
    distribution_passed: bool

    @property
    def top1_agreement(self) -> float:
        return self.distribution.top1

    @property
    def mean_kl(self) -> float:
        return self.distribution.mean_kl

    @property
    def first_failure(self) -> TensorComparison | None:
        return next((c for c in self.comparisons if not c.passed), None)

    @property
    def passed(self) -> bool:
        return self.first_failure is None and self.distribution_passed

    def to_json(self) -> dict:
        return {"mode": self.mode, "passed": self.passed, "top1_agreement": self.top1_agreement,
                "mean_kl": self.mean_kl, "distribution": self.distribution.to_json(),
                "distribution_passed": self.distribution_passed,
                "first_failure": self.first_failure.name if self.first_failure else None,
                "tensors": [c.to_json() for c in self.comparisons]}


@dataclass
class ParityReport:
    label: str
    config: GrokConfig
    dtype: str
    runs: dict[str, ParityRun]
    details: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(run.passed for run in self.runs.values())

    @property
    def first_failure(self) -> tuple[str, TensorComparison] | None:
        """The first tensor beyond tolerance, teacher-forced mode first (it points at the culprit)."""
        for mode in MODES:
            if mode in self.runs and self.runs[mode].first_failure is not None:
                return mode, self.runs[mode].first_failure
        return None

    def to_json(self) -> dict:
        failure = self.first_failure
        return {"label": self.label, "dtype": self.dtype, "passed": self.passed,
                "first_failure": {"mode": failure[0], "tensor": failure[1].name} if failure else None,
                "config": self.config.to_dict(), "details": self.details,
                "runs": {mode: run.to_json() for mode, run in self.runs.items()}}


# ---- activations of grok_torch ---------------------------------------------------------------

def _to_numpy(record: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: (v.to(torch.float32) if v.is_floating_point() else v).cpu().numpy() for k, v in record.items()}


@torch.no_grad()
def torch_end_to_end(model: Grok, tokens: np.ndarray) -> dict[str, np.ndarray]:
    record: dict[str, torch.Tensor] = {}
    model(torch.as_tensor(tokens, dtype=torch.long), record=record)
    return _to_numpy(record)


@torch.no_grad()
def torch_teacher_forced(model: Grok, tokens: np.ndarray, ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each layer run on the reference's input to it; the head on the reference's last layer output."""
    tokens_t = torch.as_tensor(tokens, dtype=torch.long)
    key_valid = model.key_valid(tokens_t)
    record: dict[str, torch.Tensor] = {"input_embeddings": model.embed(tokens_t)}
    for i, layer in enumerate(model.layers):
        layer_input = ref["input_embeddings"] if i == 0 else ref[f"decoder_layer_{i - 1}.out"]
        layer(torch.as_tensor(layer_input).to(model.dtype), key_valid, None, record)
    last = ref[f"decoder_layer_{len(model.layers) - 1}.out"]
    record["logits"] = model.head(torch.as_tensor(last).to(model.dtype), record)
    return _to_numpy(record)


# ---- comparison -----------------------------------------------------------------------------

def compare_activations(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], config: GrokConfig,
                        tokens: np.ndarray, dtype: str, mode: str) -> ParityRun:
    tolerances = TOLERANCES[(dtype, mode)]
    comparisons: list[TensorComparison] = []
    # Tokens that legitimately chose other experts (near-ties) are left out of what follows: in
    # teacher-forced mode for the rest of that layer, end to end for the rest of the model.
    diverged = np.zeros(np.asarray(tokens).shape, dtype=bool)
    for name in forward_order(config.num_layers):
        if name not in ref:
            continue  # a golden set may lack an intermediate; compare what it has
        if name not in ours:
            raise KeyError(f"grok_torch recorded no tensor {name!r}")
        suffix = name.rsplit(".", 1)[-1]
        if suffix == "expert_index":
            layer = name.rsplit(".", 1)[0]
            comparison, agree = compare_experts(name, ours[name], ref[name], ref[f"{layer}.router_probs"],
                                                NEAR_TIE_MARGIN[(dtype, mode)], skip=diverged)
            comparisons.append(comparison)
            diverged |= ~agree
            continue
        affected = suffix in AFTER_EXPERT_CHOICE or mode == "end_to_end"
        mask = ~diverged if affected and diverged.any() else None
        tier = tier_of(name)
        comparisons.append(compare_tensor(name, ours[name], ref[name], tolerances[tier], tier, mask))
        if suffix == "out" and mode == "teacher_forced":
            diverged[:] = False
    real = np.asarray(tokens) > config.pad_token
    agreement = distribution_agreement(ours["logits"], ref["logits"], real)
    return ParityRun(mode, comparisons, agreement, DISTRIBUTION_TOLERANCES[(dtype, mode)].accepts(agreement))


def compare_model(model: Grok, tokens: np.ndarray, ref: dict[str, np.ndarray], dtype: str,
                  modes: tuple[str, ...] = MODES) -> dict[str, ParityRun]:
    runs = {}
    for mode in modes:
        ours = torch_end_to_end(model, tokens) if mode == "end_to_end" else torch_teacher_forced(model, tokens, ref)
        runs[mode] = compare_activations(ours, ref, model.config, tokens, dtype, mode)
    return runs


# ---- inputs -----------------------------------------------------------------------------------

def parity_tokens(config: GrokConfig, *, seed: int = 0, batch: int = 4, seq_len: int = 256) -> np.ndarray:
    """[batch, seq_len] random real tokens; row 1 right-padded, row 2 left-padded, row 3 with one pad
    mid-row (row 0 unpadded), so masking, RoPE positions and padding quirks are all exercised."""
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(config.pad_token + 1, config.vocab_size, size=(batch, seq_len))
    quarter = max(1, seq_len // 4)
    if batch > 1:
        tokens[1, -quarter:] = config.pad_token
    if batch > 2:
        tokens[2, :quarter] = config.pad_token
    if batch > 3:
        tokens[3, seq_len // 2] = config.pad_token
    return tokens.astype(np.int64)


def _check_model(model: Grok, config: GrokConfig, dtype: str, purpose: str) -> None:
    """A model handed to the harness must run the config and compute dtype being compared."""
    problems = config.differences(model.config)
    if model.dtype != COMPUTE_DTYPES[dtype]:
        problems.append(f"compute dtype: {dtype} needed, the model computes in {str(model.dtype).removeprefix('torch.')}")
    if problems:
        raise ValueError(f"{purpose} needs the model of its own config and dtype; this one differs in "
                         + "; ".join(problems))


# ---- the two sources of truth ---------------------------------------------------------------------

def run_parity(config: GrokConfig, *, dtype: str = "fp32", seed: int = 0, weights: str = "int8",
               quantize_attention: bool = True, quantize_moe: bool = True, seq_len: int = 256, batch: int = 4,
               label: str | None = None, model_hook=None, params=None, model: Grok | None = None) -> ParityReport:
    """grok_torch vs the JAX/haiku reference on the same weights.

    The weights are `params` (a haiku tree {module: {param: array | QuantizedWeight8bit}}, e.g. a raw
    checkpoint read back) or, by default, a seeded random checkpoint of `config` whose linear layers are
    stored as `weights`: "int8" (int8 + bf16 scales; `quantize_attention`/`quantize_moe` False keep those
    as fp32 arrays) or plain "bf16"/"fp32" arrays. The torch side is
    `model` (e.g. loaded from a conversion of those weights) or, by default, a model built directly
    from `params`. `model_hook(model)`, if given, may alter the torch model before the comparison
    (used to check that injected bugs are caught).
    """
    from convert.upstream.tree import haiku_tree_to_state_dict
    from parity.init import init_params
    from parity.reference import reference_forward

    timings = {}
    start = time.perf_counter()
    if weights not in ("int8", "bf16", "fp32"):
        raise ValueError(f"weights must be int8, bf16 or fp32, got {weights!r}")
    if params is None:
        quantized = weights == "int8"
        params = init_params(config, seed=seed, quantize_attention=quantize_attention and quantized,
                             quantize_moe=quantize_moe and quantized,
                             float_dtype=weights if not quantized else "fp32")
    tokens = parity_tokens(config, seed=seed, batch=batch, seq_len=seq_len)
    timings["init_s"] = time.perf_counter() - start
    start = time.perf_counter()
    _, ref = reference_forward(params, tokens, config, fprop_dtype=dtype, capture=True)
    timings["reference_s"] = time.perf_counter() - start
    if model is None:
        model = from_state_dict(haiku_tree_to_state_dict(params, config), config, dtype=dtype, numerics="upstream")
    else:
        _check_model(model, config, dtype, "parity")
    if model_hook is not None:
        model_hook(model)
    start = time.perf_counter()
    runs = compare_model(model, tokens, ref, dtype)
    timings["torch_and_compare_s"] = time.perf_counter() - start
    details = {"seed": seed, "weights": weights, "quantize_attention": quantize_attention, "quantize_moe": quantize_moe,
               "tokens_shape": list(tokens.shape), "timings": timings}
    return ParityReport(label or "haiku reference", config, dtype, runs, details)


def run_checkpoint(converted_dir: str | Path, *, raw_dir: str | Path | None = None, dtype: str = "bf16",
                   seed: int = 0, seq_len: int = 256, batch: int = 4) -> ParityReport:
    """A user's own converted checkpoint: grok_torch loaded from `converted_dir` (weights as stored) against
    the haiku reference on the same weights - the raw checkpoint `raw_dir` when given (what the conversion
    came from), else the converted tensors themselves in upstream's tree."""
    import grok_torch
    from convert.upstream.raw_checkpoint import read_raw_checkpoint
    from convert.upstream.tree import state_dict_to_haiku_tree
    from grok_torch.converted_dir import ConvertedDir

    directory = ConvertedDir(converted_dir)
    config = directory.config.config
    model = grok_torch.load(converted_dir, dtype=dtype, numerics="upstream")
    if raw_dir is not None:
        params, label = read_raw_checkpoint(raw_dir, config), f"haiku reference on {raw_dir}"
    else:
        state = {name: directory.tensor(name) for name in directory.tensors}
        params, label = state_dict_to_haiku_tree(state, config), f"haiku reference on {converted_dir}'s own tensors"
    report = run_parity(config, dtype=dtype, seed=seed, seq_len=min(seq_len, config.sequence_len), batch=batch,
                        params=params, model=model, label=label)
    report.details.update({"checkpoint": str(converted_dir), "raw": None if raw_dir is None else str(raw_dir),
                           "weights": model.weights})
    return report


def load_golden(golden_dir: str | Path) -> tuple[GrokConfig, dict[str, torch.Tensor], np.ndarray, dict[str, np.ndarray]]:
    """A golden directory: config.json (upstream names), ckpt-0/ (official format), reference.npz."""
    from convert.upstream.raw_checkpoint import read_raw_checkpoint
    from convert.upstream.tree import haiku_tree_to_state_dict

    golden_dir = Path(golden_dir)
    for required in ("config.json", "ckpt-0", "reference.npz"):
        if not (golden_dir / required).exists():
            raise FileNotFoundError(f"{golden_dir} is not a golden directory: {required} is missing")
    config = GrokConfig.from_json(golden_dir / "config.json")
    state = haiku_tree_to_state_dict(read_raw_checkpoint(golden_dir, config), config)
    with np.load(golden_dir / "reference.npz") as npz:
        ref = {k: npz[k] for k in npz.files}
    return config, state, ref["tokens"].astype(np.int64), ref


def run_golden(golden_dir: str | Path, *, state: dict[str, torch.Tensor] | None = None, model: Grok | None = None,
               model_hook=None) -> ParityReport:
    """grok_torch (bf16, upstream's precision) vs activations recorded from the upstream code.

    `state` replaces the golden checkpoint's weights (e.g. the same checkpoint after a conversion);
    `model` is a grok_torch model to check instead (e.g. loaded from a converted directory).
    """
    config, golden_state, tokens, ref = load_golden(golden_dir)
    if model is None:
        model = from_state_dict(state if state is not None else golden_state, config, dtype="bf16", numerics="upstream")
    else:
        _check_model(model, config, "bf16", "the golden run")
    if model_hook is not None:
        model_hook(model)
    runs = compare_model(model, tokens, ref, "bf16")
    return ParityReport(f"golden {Path(golden_dir).name}", config, "bf16", runs, {"golden_dir": str(golden_dir)})


# ---- tensor parallelism: the same comparisons, grok_torch sharded over W local processes -------------------

def gathered_activations(model: Grok, ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A sharded model's record with its head-split intermediates gathered to the full width (every rank
    takes part; a whole model's record is returned as it is)."""
    if getattr(model, "tp", None) is None:
        return ours
    from grok_torch.tp import gather_record

    tensors = {name: torch.as_tensor(value) for name, value in ours.items()}
    return _to_numpy(gather_record(tensors, model.tp))


def torch_activations_tp(model: Grok, tokens: np.ndarray, ref: dict[str, np.ndarray],
                         modes: tuple[str, ...] = MODES) -> dict[str, dict[str, np.ndarray]]:
    """{mode: grok_torch's full-width activations} of this rank's (sharded) model; every rank calls it."""
    runs = {}
    for mode in modes:
        ours = torch_end_to_end(model, tokens) if mode == "end_to_end" else torch_teacher_forced(model, tokens, ref)
        runs[mode] = gathered_activations(model, ours)
    return runs


def _tp_rank(rank: int, world: int, payload_path: str, dtype: str) -> dict | None:
    """One rank of a parity run: the whole model from the payload's state, sharded, run in both modes."""
    import torch.distributed as dist

    from grok_torch.tp import shard

    payload = torch.load(payload_path, weights_only=False)
    config = GrokConfig.from_dict(payload["config"])
    model = from_state_dict(payload["state"], config, dtype=dtype, numerics="upstream")
    shard(model, rank, world, dist.group.WORLD)
    del payload["state"]
    runs = torch_activations_tp(model, payload["tokens"], payload["ref"])
    return runs if rank == 0 else None


def compare_model_tp(state: dict[str, torch.Tensor], config: GrokConfig, tokens: np.ndarray,
                     ref: dict[str, np.ndarray], dtype: str, tp: int) -> dict[str, ParityRun]:
    """compare_model for grok_torch sharded over `tp` local gloo processes built from `state`."""
    import tempfile

    from grok_torch.distributed import launch

    with tempfile.TemporaryDirectory(prefix="grok-torch-tp-") as tmp:
        path = str(Path(tmp) / "payload.pt")
        torch.save({"state": state, "config": config.to_dict(), "tokens": tokens, "ref": ref}, path)
        results = launch(_tp_rank, tp, tp, path, dtype)
    failed = [r for r in results if r.error]
    if failed:
        raise RuntimeError("; ".join(f"rank {r.rank}: {r.error}" for r in failed))
    ours = results[0].value
    return {mode: compare_activations(ours[mode], ref, config, tokens, dtype, mode) for mode in ours}


def run_parity_tp(config: GrokConfig, *, tp: int, dtype: str = "fp32", seed: int = 0, weights: str = "int8",
                  quantize_attention: bool = True, quantize_moe: bool = True, seq_len: int = 256,
                  batch: int = 4) -> ParityReport:
    """run_parity with grok_torch sharded over `tp` ranks (gloo, local processes); the reference runs once,
    in this process."""
    from convert.upstream.tree import haiku_tree_to_state_dict
    from grok_torch.tp import check_degree
    from parity.init import init_params
    from parity.reference import reference_forward

    check_degree(config, tp)
    quantized = weights == "int8"
    params = init_params(config, seed=seed, quantize_attention=quantize_attention and quantized,
                         quantize_moe=quantize_moe and quantized, float_dtype=weights if not quantized else "fp32")
    tokens = parity_tokens(config, seed=seed, batch=batch, seq_len=seq_len)
    _, ref = reference_forward(params, tokens, config, fprop_dtype=dtype, capture=True)
    start = time.perf_counter()
    runs = compare_model_tp(haiku_tree_to_state_dict(params, config), config, tokens, ref, dtype, tp)
    details = {"seed": seed, "weights": weights, "quantize_attention": quantize_attention, "quantize_moe": quantize_moe,
               "tokens_shape": list(tokens.shape), "tp": tp, "timings": {"torch_and_compare_s": time.perf_counter() - start}}
    return ParityReport(f"haiku reference, grok_torch over tp={tp}", config, dtype, runs, details)


def run_golden_tp(golden_dir: str | Path, *, tp: int) -> ParityReport:
    """run_golden with grok_torch sharded over `tp` ranks (gloo, local processes)."""
    from grok_torch.tp import check_degree

    config, state, tokens, ref = load_golden(golden_dir)
    check_degree(config, tp)
    runs = compare_model_tp(state, config, tokens, ref, "bf16", tp)
    return ParityReport(f"golden {Path(golden_dir).name}, grok_torch over tp={tp}", config, "bf16", runs,
                        {"golden_dir": str(golden_dir), "tp": tp})
