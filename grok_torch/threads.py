"""How many CPU threads torch computes with: by default one per physical core this process may run on.

A second hardware thread of a core (SMT, hyper-threading) shares that core's vector units and caches,
so memory- and GEMM-bound work gains nothing from it and loses to the contention; torch's own default
(one thread per logical CPU in some builds) is then slower. The physical cores are read from
/sys/devices/system/cpu/cpu*/topology (each (package, core) pair once), restricted to the CPUs in
os.sched_getaffinity (a container's or taskset's limit); without that information, every allowed CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["physical_cores", "set_threads"]

_CPU_ROOT = Path("/sys/devices/system/cpu")


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores(cpu_root: Path = _CPU_ROOT) -> int:
    """Physical cores among the CPUs this process may use (at least 1)."""
    allowed = _allowed_cpus()
    cores = set()
    for cpu in allowed:
        topology = cpu_root / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(allowed))  # no topology (some containers): count what we may use
        cores.add((package, core))
    return max(1, len(cores))


_chosen: int | None = None  # a count asked for by name in this process (--threads, threads=)


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads`; the number now in use. None: the count asked for earlier in
    this process (a CLI's --threads before its load), else physical_cores(). ValueError below 1."""
    global _chosen
    if threads is None:
        threads = _chosen if _chosen is not None else physical_cores()
    elif threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    else:
        _chosen = threads
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
