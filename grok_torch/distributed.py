"""torch.distributed plumbing for tensor parallelism: the process group, local launches, and agreement.

A sharded model needs one process per rank in an initialised process group. Under `torchrun` (one
host or many) the group comes from its environment (`init_from_env`); on one machine `launch` starts
W local processes itself with torch.multiprocessing and torch.distributed's own env:// rendezvous.
NCCL on GPUs, gloo on CPUs.

No rank may hang waiting for another that failed: every step that can fail on one rank only (a
missing shard file, a bad device) ends with `agree`, an all-gather of each rank's outcome, after
which every rank raises the same error naming the ranks at fault.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from grok_torch.errors import UserError

__all__ = ["DistributedError", "backend_for", "init_from_env", "agree", "check_same", "launch", "RankResult",
           "rank_device", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300  # a collective waiting longer than this fails instead of hanging


class DistributedError(UserError):
    """A problem on one or more ranks, raised identically on every rank."""


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group that torchrun (or `launch`) describes in the environment, if not joined."""
    if dist.is_initialized():
        return
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DistributedError(f"no process group: {', '.join(missing)} not set (run under torchrun, or use --tp W "
                               f"to start the processes here)")
    dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s))


def rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    """The device of the rank with `local_rank` on its host: "cuda" means cuda:LOCAL_RANK; more ranks
    than devices is an error naming both."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    index = local_rank if device.index is None else device.index
    if index >= count:
        raise DistributedError(f"local rank {local_rank} needs cuda:{index}, but this host has {count} CUDA "
                               f"device(s): more ranks per host than devices")
    return torch.device("cuda", index)


def agree(error: str | None, what: str, group=None) -> None:
    """Every rank says whether its step `what` failed; if any did, every rank raises DistributedError
    naming each failed rank and its error (so no rank waits forever for the others)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        if error:
            raise DistributedError(f"{what} failed: {error}")
        return
    outcomes: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(outcomes, error, group=group)
    failed = [(rank, message) for rank, message in enumerate(outcomes) if message]
    if failed:
        raise DistributedError(f"{what} failed on {len(failed)} of {len(outcomes)} ranks: "
                               + "; ".join(f"rank {rank}: {message}" for rank, message in failed))


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same(value: str, what: str, group=None) -> None:
    """Every rank must hold the same `value` (a config's JSON, say): DistributedError on every rank if not."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    hashes: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hashes, fingerprint(value), group=group)
    if len(set(hashes)) > 1:
        groups: dict[str, list[int]] = {}
        for rank, digest in enumerate(hashes):
            groups.setdefault(digest, []).append(rank)
        raise DistributedError(f"the ranks do not have the same {what}: "
                               + "; ".join(f"ranks {ranks} have {digest}" for digest, ranks in groups.items()))


# ---- local launch --------------------------------------------------------------------------------------

@dataclass
class RankResult:
    rank: int
    value: Any = None
    error: str | None = None  # "ExceptionType: message" of what the rank raised
    traceback: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(index: int, fn: Callable, world: int, port: int, backend: str, timeout_s: float, out_dir: str,
            args) -> None:
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    result = RankResult(index)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        result.value = fn(index, *args)
    except BaseException as err:  # reported to the parent, which decides
        result.error = f"{type(err).__name__}: {err}"
        result.traceback = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # A file, not a pipe: a large result in a pipe would block this process until the parent reads it,
    # and the parent reads only after every process has ended.
    with open(os.path.join(out_dir, f"rank{index}.pickle"), "wb") as file:
        pickle.dump(result, file)


def launch(fn: Callable, world: int, *args, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S) -> list[RankResult]:
    """Run fn(rank, *args) in `world` fresh local processes joined in one process group; every rank's
    RankResult (its return value, or the error it raised), in rank order. `fn` and `args` must be
    picklable (a module-level function)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="grok-torch-ranks-") as out_dir:
        mp.start_processes(_worker, args=(fn, world, free_port(), backend, timeout_s, out_dir, args), nprocs=world,
                           join=True, start_method="spawn")
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.pickle"), "rb") as file:
                results.append(pickle.load(file))
    return results
