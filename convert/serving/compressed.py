"""compressed-tensors "pack-quantized" W8A16: how an int8 linear is stored for vLLM, bit for bit.

Checked against vllm-project/compressed-tensors src/compressed_tensors/compressors/pack_quantized/ @ac8e2ba8
(and the 0.20.1 release, whose own compressor and decompressor the tests run) and vLLM's reader
vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py @519b90d4.

A quantized linear with engine name `P.weight` is stored as

- `P.weight_packed`: int32 `[out, in / 4]`: each int8 value q as the byte q + 128 (q XOR 0x80, compressed-
  tensors' unsigned 8-bit with offset 128, vLLM's `uint8b128`), four bytes per word along the input dim,
  the first element in the lowest byte (little-endian);
- `P.weight_scale`: bf16 `[out, in / 128]`: symmetric group-wise scales, group 128 along the input dim;
- `P.weight_shape`: int64 `[2]` = `[out, in]`.

Each dequantizes as w[o, j] = q[o, j] * scale[o, j // 128]. Upstream's scales are per output channel (one
group) or per tensor-parallel shard (8 groups along the input: 768 wide for o_proj, 4096 for linear_1), so
repeating each of upstream's scales over the 128-wide groups it covers gives every element exactly the
int8 x bf16 product upstream dequantizes to. Group 128 is the largest Marlin takes (vLLM's bf16 W8A16
kernels: Marlin {-1, 32, 64, 128}, Machete {-1, 64, 128}); upstream's own 768/4096 groups fit none.
The repetition costs bytes: `scale_overhead(config)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    from convert.upstream.param_names import ParamEntry
    from grok_torch.config import GrokConfig

GROUP_SIZE = 128
PACK = 4  # int8 values per int32 word
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")  # replace the `weight` of a linear's name


class GroupSizeError(ValueError):
    """A linear whose int8 scale groups cannot be written as compressed-tensors groups of GROUP_SIZE."""


def compressed_names(weight_name: str) -> dict[str, str]:
    """`P.weight` -> {"weight_packed": `P.weight_packed`, "weight_scale": ..., "weight_shape": ...}."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"{weight_name}: a linear's weight name ends in .weight")
    prefix = weight_name[: -len("weight")]
    return {suffix: prefix + suffix for suffix in SUFFIXES}


def split_compressed_name(name: str) -> tuple[str, str] | None:
    """`P.weight_packed` -> (`P.weight`, "weight_packed"); None for a name without a compressed suffix."""
    for suffix in SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix)] + "weight", suffix
    return None


def check_groups(entry: "ParamEntry", group_size: int = GROUP_SIZE) -> int:
    """How many times each of the entry's scales repeats along the input (in / scale_groups / group_size);
    GroupSizeError naming the tensor if the groups do not fit whole."""
    in_features = entry.torch_shape[-1]
    width = in_features // entry.scale_groups
    if in_features % entry.scale_groups or width % group_size or in_features % PACK:
        raise GroupSizeError(f"{entry.torch_name}: input width {in_features} in {entry.scale_groups} scale group(s) "
                             f"of {width} cannot be written as compressed-tensors groups of {group_size} (each "
                             f"upstream group must hold whole groups of {group_size}); export --weights bf16")
    return width // group_size


def pack_int8(q: np.ndarray) -> np.ndarray:
    """int8 `[rows, in]` -> int32 `[rows, in / 4]`: q + 128 as bytes, four per little-endian word."""
    if q.dtype != np.int8 or q.shape[-1] % PACK:
        raise ValueError(f"expected int8 [..., in] with in divisible by {PACK}, got {q.dtype} {list(q.shape)}")
    biased = np.ascontiguousarray(q).view(np.uint8) ^ np.uint8(0x80)
    return biased.view("<i4")


def unpack_int8(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_int8`: int32 `[rows, in / 4]` -> int8 `[rows, in]`."""
    biased = np.ascontiguousarray(packed.astype("<i4", copy=False)).view(np.uint8)
    return (biased ^ np.uint8(0x80)).view(np.int8)


def repeat_scales(scales: np.ndarray, repeats: int) -> np.ndarray:
    """bf16 scales `[rows, G]` -> `[rows, G * repeats]`: each scale once per 128-wide group it covers."""
    return np.ascontiguousarray(np.repeat(scales, repeats, axis=-1))


def unrepeat_scales(scales: np.ndarray, repeats: int) -> np.ndarray:
    """The inverse of `repeat_scales` (ValueError unless every group of `repeats` columns holds one value)."""
    *lead, columns = scales.shape
    grouped = scales.reshape(*lead, columns // repeats, repeats)
    if not (grouped.view(np.uint16) == grouped[..., :1].view(np.uint16)).all():
        raise ValueError("weight_scale does not repeat one scale per upstream group: not a grok-torch export")
    return np.ascontiguousarray(grouped[..., 0])


def quantization_config(group_size: int = GROUP_SIZE) -> dict:
    """config.json's `quantization_config` for every Linear (vLLM's MoE asks the scheme of `Linear` for the
    experts' synthetic gate/up/down names too). `format` is repeated inside the group: newer vLLM reads the
    MoE scheme's format from the group, not from the top level."""
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
               "dynamic": False, "actorder": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}


def scale_overhead(config: "GrokConfig", group_size: int = GROUP_SIZE) -> tuple[int, int]:
    """(bytes of upstream's own bf16 scales, bytes of the group-`group_size` scales) over every linear."""
    from convert.upstream.param_names import checkpoint_layout

    native = grouped = 0
    bf16 = np.dtype(ml_dtypes.bfloat16).itemsize
    for entry in checkpoint_layout(config):
        if entry.quantizable:
            *lead, out_features, in_features = entry.torch_shape
            rows = int(np.prod(lead, dtype=np.int64)) * out_features
            native += rows * entry.scale_groups * bf16
            grouped += rows * (in_features // group_size) * bf16
    return native, grouped
