"""Dtype names, one vocabulary: numpy's names ('bfloat16', 'float32', 'int8', ...) as the files store them,
their safetensors codes, and the torch dtypes. Imports neither torch nor safetensors at module level, so
the converter and `grok-torch --help` start without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import torch

# numpy dtype name <-> safetensors dtype code
SAFETENSORS_CODES = {
    "bool": "BOOL", "int8": "I8", "uint8": "U8", "int16": "I16", "uint16": "U16", "int32": "I32",
    "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16", "bfloat16": "BF16",
    "float32": "F32", "float64": "F64",
}
SAFETENSORS_NAMES = {code: name for name, code in SAFETENSORS_CODES.items()}


def numpy_dtype(name: str) -> np.dtype:
    """Dtype name ('bfloat16', 'float32', 'int8', ...) -> little-endian numpy dtype."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name).newbyteorder("<")


def dtype_name(dtype) -> str:
    """numpy or torch dtype -> its name in this vocabulary (torch.bfloat16 -> 'bfloat16')."""
    if isinstance(dtype, np.dtype) or isinstance(dtype, type):
        return "bfloat16" if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else np.dtype(dtype).name
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str):
    """Dtype name -> torch dtype ('bfloat16' -> torch.bfloat16)."""
    import torch

    return getattr(torch, name)


def torch_to_numpy(tensor: "torch.Tensor") -> np.ndarray:
    """torch -> numpy without a copy where possible; bf16 becomes ml_dtypes.bfloat16."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    return tensor.numpy()


def numpy_to_torch(array: np.ndarray) -> "torch.Tensor":
    """numpy (ml_dtypes bfloat16 included) -> torch, sharing nothing with the source."""
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype == numpy_dtype("bfloat16"):
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())
