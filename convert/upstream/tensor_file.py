"""One raw-checkpoint file: what its pickle describes, and its array data.

Each file `ckpt-0/tensor{i:05d}_000` is a pickle of one parameter: a numpy array, or an object of a class
named `QuantizedWeight8bit` whose state is `{"weight": int8 array, "scales": bf16 array}`. The restricted
machine of `convert.upstream.pickle_vm` reads the pickle's structure without running it; this module checks
that the description is exactly a numpy array (or two, in a QuantizedWeight8bit) of an allowed dtype
(bool, (u)int8..64, float16/32/64, bfloat16; never object dtype 'O'), with a bounded shape (at most 32
dimensions, 2**48 elements) and as many payload bytes as the shape needs, before anything is allocated.
Only regular files are opened (never a FIFO or a device).

`scan_tensor_file` reads only the few hundred bytes of pickle structure; `read_tensor_file` then reads each
payload straight into one preallocated numpy array, or maps it read-only (`mapped=True`).

Errors are `CheckpointError` (a ValueError) naming the file, what was found and what was expected.
Protocol 2 pickles of Python 3 bytes go through `_codecs.encode`, which is not allowlisted: array data
must be raw bytes (protocol >= 3), as the official checkpoint (protocol 4) has it.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert.upstream.pickle_vm import (Call, DictNode, GlobalRef, Malformed, Payload, PickleMachine,
                                        StructureReader, Truncated, brief, label)
from convert.upstream.quantized import QuantizedWeight8bit
from grok_torch.dtypes import numpy_dtype

MAX_DIMS = 32
MAX_ELEMENTS = 1 << 48


class CheckpointError(ValueError):
    """A raw checkpoint (or one file of it) that is missing, malformed, unsafe or not what the config expects."""


# ---- what a scan reports ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ArrayInfo:
    """One array inside a tensor file: dtype name (numpy's, e.g. 'bfloat16'), shape, and payload position."""

    dtype: str
    shape: tuple[int, ...]
    offset: int  # byte offset of the raw data in the file
    nbytes: int
    fortran_order: bool = False

    @property
    def numpy_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)


@dataclass(frozen=True)
class TensorFileInfo:
    """Metadata of one raw-checkpoint file. `array` is the plain array, or the int8 weight of a quantized one."""

    path: Path
    kind: str  # "array" | "quantized"
    array: ArrayInfo
    scales: ArrayInfo | None  # bf16 scales of a quantized weight
    class_name: str | None  # e.g. "__main__.QuantizedWeight8bit" for quantized files
    protocol: int
    file_size: int
    scanned_bytes: int  # bytes of the file the scan read: the pickle structure, never the payloads

    @property
    def quantized(self) -> bool:
        return self.kind == "quantized"

    @property
    def dtype(self) -> str:
        return self.array.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def nbytes(self) -> int:
        return self.array.nbytes + (self.scales.nbytes if self.scales else 0)

    def describe(self) -> str:
        """e.g. `QuantizedWeight8bit(int8[8, 64, 344], scales bfloat16[8, 1, 344])` or `float32[512, 64]`."""
        main = f"{self.array.dtype}{list(self.array.shape)}"
        if self.quantized:
            return f"QuantizedWeight8bit({main}, scales {self.scales.dtype}{list(self.scales.shape)})"
        return main


_DTYPE_CODES = {  # numpy typestr (as numpy pickles it) -> dtype name
    "b1": "bool", "i1": "int8", "u1": "uint8", "i2": "int16", "u2": "uint16", "i4": "int32",
    "u4": "uint32", "i8": "int64", "u8": "uint64", "f2": "float16", "f4": "float32", "f8": "float64",
}



# ---- from the description to metadata ---------------------------------------------------------------

def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(_is_int(d) and d >= 0 for d in value):
        raise Malformed(f"{what}: shape {brief(value)} is not a tuple of non-negative ints")
    if len(value) > MAX_DIMS:
        raise Malformed(f"{what}: shape with {len(value)} dimensions (at most {MAX_DIMS} expected)")
    if math.prod(d for d in value if d) > MAX_ELEMENTS:  # zero-size arrays too: numpy cannot shape them
        raise Malformed(f"{what}: shape {brief(value)} is implausibly large (more than 2**48 elements)")
    return value


def _describe_dtype(node: object, what: str) -> str:
    """A `numpy.dtype(code, False, True)` + BUILD(state) description -> dtype name."""
    if not (isinstance(node, Call) and node.func.role == "dtype"):
        raise Malformed(f"{what}: dtype is {label(node)}; expected numpy.dtype(...)")
    if len(node.args) != 3 or node.args[1:] != (False, True):
        raise Malformed(f"{what}: numpy.dtype arguments {brief(node.args)}; expected (code, False, True)")
    code = node.args[0]
    if isinstance(code, GlobalRef) and code.role == "bfloat16":
        name, itemsize = "bfloat16", 2
    elif isinstance(code, str) and code in _DTYPE_CODES:
        name = _DTYPE_CODES[code]
        itemsize = np.dtype(name).itemsize
    elif isinstance(code, str) and code.lstrip("<>|=").startswith("O"):
        raise Malformed(f"{what}: object dtype '{code}' is not allowed; expected a numeric dtype")
    else:
        raise Malformed(f"{what}: dtype {brief(code)} is not allowed; expected one of "
                         f"{', '.join(_DTYPE_CODES)} or ml_dtypes.bfloat16")
    state = node.state
    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
        raise Malformed(f"{what}: dtype state {brief(state)}; expected numpy's (3, byteorder, None, ...) tuple")
    byteorder, subarray, names, fields, elsize, alignment, flags = state[1:8]
    if byteorder not in ("<", "|"):
        raise Malformed(f"{what}: byte order {brief(byteorder)}; expected little-endian '<' (or '|')")
    if (subarray, names, fields) != (None, None, None) or (len(state) == 9 and state[8] is not None):
        raise Malformed(f"{what}: a structured/subarray dtype; expected a plain numeric dtype")
    if elsize not in (-1, itemsize) or not _is_int(alignment) or not _is_int(flags):
        raise Malformed(f"{what}: dtype state {brief(state)} does not describe {name}")
    return name


def _describe_array(node: object, what: str) -> ArrayInfo:
    """`_reconstruct(ndarray, (0,), b'b')` + BUILD((1, shape, dtype, fortran, data)), or protocol 5's
    `_frombuffer(data, dtype, shape, order)` -> ArrayInfo."""
    if isinstance(node, Call) and node.func.role == "reconstruct":
        args = node.args
        if not (len(args) == 3 and isinstance(args[0], GlobalRef) and args[0].role == "ndarray"
                and isinstance(args[2], Payload)):
            raise Malformed(f"{what}: _reconstruct arguments are not (numpy.ndarray, shape, bytes)")
        state = node.state
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise Malformed(f"{what}: array state is not numpy's (1, shape, dtype, fortran, data) tuple")
        _, shape, dtype, fortran, data = state
        if not isinstance(fortran, bool):
            raise Malformed(f"{what}: fortran flag {brief(fortran)} is not a bool")
    elif isinstance(node, Call) and node.func.role == "frombuffer":
        if len(node.args) != 4 or node.built:
            raise Malformed(f"{what}: _frombuffer arguments are not (data, dtype, shape, order)")
        data, dtype, shape, order = node.args
        if order not in ("C", "F"):
            raise Malformed(f"{what}: array order {brief(order)}; expected 'C' or 'F'")
        fortran = order == "F"
    else:
        raise Malformed(f"{what} is {label(node)}; expected a numpy array")
    shape = _shape(shape, what)
    dtype_name = _describe_dtype(dtype, what)
    if not isinstance(data, Payload):
        raise Malformed(f"{what}: array data is {label(data)}; expected raw bytes")
    expected = math.prod(shape) * numpy_dtype(dtype_name).itemsize
    if data.length != expected:
        raise Malformed(f"{what}: {data.length} bytes of data for {dtype_name}{list(shape)}; expected {expected}")
    return ArrayInfo(dtype_name, shape, data.offset, data.length, fortran and len(shape) > 1)


def _describe_root(root: object) -> tuple[str, ArrayInfo, ArrayInfo | None, str | None]:
    if isinstance(root, Call) and root.func.role == "quantized":
        state = root.state
        if not isinstance(state, DictNode):
            raise Malformed(f"{root.func} state is {label(state)}; expected a dict with weight and scales")
        fields = dict(state.items) if all(isinstance(k, str) for k, _ in state.items) else {}
        if sorted(fields) != ["scales", "weight"] or len(state.items) != 2:
            keys = [k if isinstance(k, str) else label(k) for k, _ in state.items]
            raise Malformed(f"{root.func} has fields {keys}; expected exactly weight and scales")
        weight = _describe_array(fields["weight"], "QuantizedWeight8bit.weight")
        scales = _describe_array(fields["scales"], "QuantizedWeight8bit.scales")
        return "quantized", weight, scales, str(root.func)
    return "array", _describe_array(root, "the pickled object"), None, None


def _open_input(path: Path):
    """Open a checkpoint file read-only, unbuffered. Only a regular file (or a link to one) is accepted: opening
    a FIFO would block forever, and a device such as /dev/zero never ends. O_NONBLOCK makes the open of a FIFO
    return at once (it changes nothing for regular files); the file is checked before anything is read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{path}: not a regular file; expected a pickled numpy array or "
                                  f"QuantizedWeight8bit")
        return open(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def scan_tensor_file(path: str | os.PathLike) -> TensorFileInfo:
    """Metadata of one raw-checkpoint file (kind, dtypes, shapes, payload offsets), reading only the pickle
    structure. Raises CheckpointError naming the file for anything unsafe, malformed or truncated."""
    path = Path(path)
    try:
        with _open_input(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CheckpointError(f"{path}: empty file; expected a pickled numpy array or QuantizedWeight8bit")
            reader = StructureReader(f.fileno(), size)
            machine = PickleMachine(reader)
            try:
                root = machine.run()
                if reader.remaining():
                    raise Malformed(f"{reader.remaining()} bytes after the STOP opcode")
                kind, array, scales, class_name = _describe_root(root)
            except Truncated:
                raise CheckpointError(f"{path}: truncated: the pickle ends at byte {size} before its STOP "
                                      f"opcode") from None
            except Malformed as err:
                raise CheckpointError(f"{path}: {err}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from err
    return TensorFileInfo(path, kind, array, scales, class_name, machine.protocol, size, reader.bytes_read)


def _read_array(f, info: ArrayInfo, path: Path) -> np.ndarray:
    """Read one payload into a single new array (C order, or a Fortran-ordered view of the same buffer)."""
    flat = np.empty(math.prod(info.shape), dtype=info.numpy_dtype)
    view = memoryview(flat.view(np.uint8))
    f.seek(info.offset)
    done = 0
    while done < info.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path}: truncated: {info.nbytes - done} bytes of array data missing")
        done += n
    return flat.reshape(info.shape, order="F" if info.fortran_order else "C")


def _map_array(f, info: ArrayInfo, path: Path) -> np.ndarray:
    """A read-only array over one payload, mapped from the file (no data read until touched)."""
    size = os.fstat(f.fileno()).st_size
    if info.offset + info.nbytes > size:
        raise CheckpointError(f"{path}: truncated: {info.offset + info.nbytes - size} bytes of array data missing")
    if info.nbytes == 0:
        return np.empty(info.shape, dtype=info.numpy_dtype, order="F" if info.fortran_order else "C")
    start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(f.fileno(), info.offset + info.nbytes - start, access=mmap.ACCESS_READ, offset=start)
    flat = np.frombuffer(mapped, dtype=info.numpy_dtype, count=math.prod(info.shape), offset=info.offset - start)
    return flat.reshape(info.shape, order="F" if info.fortran_order else "C")


def read_tensor_file(path: str | os.PathLike, info: TensorFileInfo | None = None, *,
                     mapped: bool = False) -> np.ndarray | QuantizedWeight8bit:
    """One raw-checkpoint file -> numpy array, or QuantizedWeight8bit(int8 weight, bf16 scales).

    By default the arrays are read into new memory. With `mapped` they are read-only views of the file mapped
    into memory: the page cache's own pages, so nothing is copied or zeroed (the converter's way: the input
    is read once, and fresh pages cost the kernel more than the read itself on the benchmark machine).
    Their pages are read when touched, and unmapped when the arrays are gone."""
    info = info or scan_tensor_file(path)
    load = _map_array if mapped else _read_array
    try:
        with _open_input(info.path) as f:
            array = load(f, info.array, info.path)
            if info.quantized:
                return QuantizedWeight8bit(weight=array, scales=load(f, info.scales, info.path))
            return array
    except OSError as err:
        raise CheckpointError(f"{info.path}: cannot read: {err.strerror or err}") from err
