"""Decode's weight-only GEMV on the CPU: a small C kernel (gemv.c beside this file), built at first use.

At batch 1 a linear layer is a matrix-vector product bound by the bytes of its weight. torch's CPU
kernels reach that bound for one scale per output channel (`_weight_int8pack_mm`) but not for the
grouped scales of o_proj and the experts' down projections (8 groups along the input), and its bf16
GEMM promotes through fp32 copies. gemv.c streams each weight once, int8 or bf16, applies each group's
scale to its fp32 dot, and writes fp32 or bf16 (grok_torch.kernels uses it in the fast numerics).

The library is compiled with the system C compiler (`$CC`, else `cc`) into a per-user cache
(`$GROK_TORCH_CACHE`, else `$XDG_CACHE_HOME/grok-torch`, else `~/.cache/grok-torch`), once per source,
compiler and CPU, and loaded with ctypes. Where there is no compiler, or `GROK_TORCH_GEMV=0`, nothing is
built and `available()` is False: the callers keep torch's kernels (slower, the same numerics class).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from jaxtyping import BFloat16, Float, Int8
from torch import Tensor

__all__ = ["MAX_ROWS", "available", "why_unavailable", "int8_gemv", "bf16_gemv", "supports"]

SOURCE = Path(__file__).with_name("gemv.c")
# gemv.c's MAX_ROWS; above 8 rows the weight is no longer the bound (torch's GEMMs take over).
MAX_ROWS = 8
# Flag sets tried in order: tuned to this CPU with OpenMP threads, then portable, then one thread.
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-fopenmp"), ("-O3",))
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def cache_dir() -> Path:
    root = os.environ.get("GROK_TORCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "grok-torch")
    return Path(root) / "gemv"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        import platform

        return platform.machine() + platform.processor()


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Build the library at `target` (atomically: a temporary file renamed); None, or the compiler's error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip()
            return message.splitlines()[-1] if message else f"exit {done.returncode}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library, or None and the reason."""
    if os.environ.get("GROK_TORCH_GEMV", "1") == "0":
        return None, "disabled by GROK_TORCH_GEMV=0"
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        return None, f"no C compiler ({compiler!r} not found; set CC)"
    try:
        source = SOURCE.read_bytes()
    except OSError as e:
        return None, f"its source is missing ({e})"
    errors, cpu = [], _cpu_signature().encode()
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(), cpu,
                                          torch.__version__.encode()])).hexdigest()[:16]
        target = cache_dir() / f"gemv-{key}.so"
        if not target.exists():
            error = _compile(compiler, flags, target)
            if error is not None:
                errors.append(f"{' '.join(flags)}: {error}")
                continue
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as e:
            errors.append(f"{target}: {e}")
            continue
        _int = ctypes.c_int
        lib.grok_gemv_int8.argtypes = [_I64, _I64, _I64, _PTR, _int, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64,
                                       _int, _int]
        lib.grok_gemv_bf16.argtypes = [_I64, _I64, _I64, _PTR, _int, _PTR, _I64, _PTR, _I64, _int, _int]
        lib.grok_gemv_int8.restype = lib.grok_gemv_bf16.restype = ctypes.c_int
        return lib, ""
    return None, "the C kernel did not build (" + "; ".join(errors) + ")"


def available() -> bool:
    """The kernel is built and loaded (it is built on the first call)."""
    return _library()[0] is not None


def why_unavailable() -> str:
    """Why `available()` is False ("" when it is True)."""
    return _library()[1]


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether x @ weight^T can run here: a CPU tensor pair, at most MAX_ROWS rows, a weight dense along its
    input (any row stride), and the library built. The kernel records no gradients: its callers
    (grok_torch.kernels) keep it out of autograd, scales included."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.device.type == "cpu" and weight.device.type == "cpu" and 0 < rows <= MAX_ROWS
            and x.dtype in (torch.float32, torch.bfloat16) and weight.dim() == 2 and weight.stride(-1) == 1
            and available())


def _rows(x: Tensor) -> Tensor:
    """x as dense [rows, in] (a view where it already is)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.is_contiguous() else flat.contiguous()


def _check(code: int, what: str) -> None:
    if code != 0:
        raise (MemoryError if code == 2 else ValueError)(f"gemv: {what} failed (code {code})")


def int8_gemv(x: Float[Tensor, "*batch inp"], weight: Int8[Tensor, "out inp"],
              scales: BFloat16[Tensor, "out groups"], out_dtype: torch.dtype | None = None) -> Float[Tensor, "*batch out"]:
    """x @ (weight * scales)^T, each group's scale applied to its fp32 dot; output in `out_dtype` (None: x's
    dtype; bf16 rounded once from the fp32 sum). `scales[:, g]` scales input columns g*in/G .. (g+1)*in/G - 1."""
    lib = _library()[0]
    flat = _rows(x)
    n, k = weight.shape
    if scales.dtype != torch.bfloat16 or scales.stride(-1) != 1:
        scales = scales.to(torch.bfloat16).contiguous()
    out_dtype = out_dtype or x.dtype
    out = torch.empty(flat.shape[0], n, dtype=out_dtype)
    _check(lib.grok_gemv_int8(flat.shape[0], n, k, flat.data_ptr(), int(x.dtype == torch.bfloat16), weight.data_ptr(),
                              weight.stride(0), scales.data_ptr(), scales.shape[-1], scales.stride(0), out.data_ptr(),
                              n, int(out_dtype == torch.bfloat16), torch.get_num_threads()), "grok_gemv_int8")
    return out.view(*x.shape[:-1], n)


def bf16_gemv(x: Float[Tensor, "*batch inp"], weight: BFloat16[Tensor, "out inp"],
              out_dtype: torch.dtype | None = None) -> Float[Tensor, "*batch out"]:
    """x @ weight^T for a bf16 weight: the exact fp32 products summed in fp32; output in `out_dtype` (None:
    x's dtype)."""
    lib = _library()[0]
    flat = _rows(x)
    n, k = weight.shape
    out_dtype = out_dtype or x.dtype
    out = torch.empty(flat.shape[0], n, dtype=out_dtype)
    _check(lib.grok_gemv_bf16(flat.shape[0], n, k, flat.data_ptr(), int(x.dtype == torch.bfloat16), weight.data_ptr(),
                              weight.stride(0), out.data_ptr(), n, int(out_dtype == torch.bfloat16),
                              torch.get_num_threads()), "grok_gemv_bf16")
    return out.view(*x.shape[:-1], n)
