"""Read the official Grok-1 raw checkpoint without `pickle.load` and without JAX.

Each file `ckpt-0/tensor{i:05d}_000` is a pickle of one parameter: a numpy array, or an object of a
class named `QuantizedWeight8bit` whose state is `{"weight": int8 array, "scales": bf16 array}`.
A pickle is a program, so this module never unpickles. It walks the opcodes itself with a small stack
machine that only builds inert descriptions (`_Global`, `_Call`, `_Payload`, tuples, strs, ints), with:

- an opcode allowlist (protocols 2-5, the opcodes numpy arrays and a pickled dataclass need),
- a global allowlist: `numpy.core.multiarray._reconstruct` (also `numpy._core...`), `numpy.ndarray`,
  `numpy.dtype`, `ml_dtypes.bfloat16` (only as the argument of `numpy.dtype`),
  `<any module>.QuantizedWeight8bit`, and - for protocol 5 pickles of arrays -
  `numpy.core.numeric._frombuffer` (also `numpy._core...`),
- a dtype allowlist (bool, (u)int8..64, float16/32/64, bfloat16; never object dtype 'O'),
- every length prefix checked against the bytes left in the file, shapes bounded (at most 32 dimensions,
  2**48 elements) before anything is allocated, and only regular files opened (never a FIFO or device).

Array payloads are never read while scanning: their (offset, length) is recorded and skipped, so a
scan reads only the few hundred bytes of pickle structure. `read_tensor_file` then reads each payload
straight into one preallocated numpy array, or maps it read-only (`mapped=True`).

Errors are `CheckpointError` (a ValueError) naming the file, what was found and what was expected.
Protocol 2 pickles of Python 3 bytes go through `_codecs.encode`, which is not allowlisted: array data
must be raw bytes (protocol >= 3), as the official checkpoint (protocol 4) has it.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import reprlib
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import ml_dtypes
import numpy as np

from convert.param_names import ParamEntry, checkpoint_layout
from convert.quantized import QuantizedWeight8bit

if TYPE_CHECKING:
    from grok_torch.config import GrokConfig


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


def numpy_dtype(name: str) -> np.dtype:
    """Dtype name ('bfloat16', 'float32', 'int8', ...) -> little-endian numpy dtype."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name).newbyteorder("<")


# ---- the restricted pickle machine ------------------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("ml_dtypes", "bfloat16"): "bfloat16",
}
ALLOWED_GLOBALS_TEXT = ("numpy.core.multiarray._reconstruct, numpy._core.multiarray._reconstruct, "
                        "numpy.core.numeric._frombuffer, numpy._core.numeric._frombuffer, numpy.ndarray, "
                        "numpy.dtype, ml_dtypes.bfloat16, <module>.QuantizedWeight8bit")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_MAX_STRING = 1 << 16  # no string in a checkpoint pickle is longer than a module name
_MAX_MEMO = 1 << 16
_MAX_STACK = 1 << 12
_MAX_OPCODES = 1 << 16  # a checkpoint pickle has about a hundred; this bounds work and memory on hostile input
_MAX_DIMS = 32
_MAX_ELEMENTS = 1 << 48


@dataclass(frozen=True)
class _Global:
    module: str
    name: str
    role: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class _Payload:
    offset: int
    length: int


class _Call:
    """REDUCE `func(*args)` or NEWOBJ `cls.__new__(cls, *args)`, with the state a BUILD gave it. Never run."""

    def __init__(self, func: _Global, args: tuple, how: str):
        self.func, self.args, self.how = func, args, how
        self.state: object = None
        self.built = False


class _Dict:
    def __init__(self) -> None:
        self.items: list[tuple[object, object]] = []


class _List:
    def __init__(self) -> None:
        self.items: list[object] = []


class _Mark:
    pass


_MARK = _Mark()


class _Reader:
    """Reads small structure bytes at a position through a small buffer (os.pread, so never more than
    `chunk` bytes past what the parser asked for); payloads are skipped. Counts the bytes read."""

    def __init__(self, fd: int, size: int, chunk: int = 512):
        self.fd, self.size, self.chunk = fd, size, chunk
        self.pos = 0
        self.bytes_read = 0
        self.buf, self.buf_start = b"", 0

    def remaining(self) -> int:
        return self.size - self.pos

    def read(self, n: int) -> bytes:
        start = self.pos - self.buf_start
        if start < 0 or start + n > len(self.buf):
            self.buf = os.pread(self.fd, max(n, self.chunk), self.pos)
            self.buf_start, start = self.pos, 0
            self.bytes_read += len(self.buf)
        data = self.buf[start:start + n]
        if len(data) != n:
            raise _Truncated(n)
        self.pos += n
        return data

    def skip(self, n: int) -> int:
        """Step over n payload bytes (already checked to be in the file); returns their offset."""
        start = self.pos
        self.pos += n
        return start

    def readline(self, limit: int = 256) -> str:
        chars = bytearray()
        while True:
            ch = self.read(1)
            if ch == b"\n":
                return chars.decode("utf-8", errors="replace")
            chars += ch
            if len(chars) > limit:
                raise _Malformed(f"a GLOBAL name longer than {limit} bytes")


class _Truncated(Exception):
    pass


class _Malformed(Exception):
    pass


_OPCODE_NAMES = {
    0x80: "PROTO", 0x95: "FRAME", 0x28: "MARK", 0x2E: "STOP", 0x8C: "SHORT_BINUNICODE", 0x58: "BINUNICODE",
    0x8D: "BINUNICODE8", 0x94: "MEMOIZE", 0x71: "BINPUT", 0x72: "LONG_BINPUT", 0x68: "BINGET",
    0x6A: "LONG_BINGET", 0x63: "GLOBAL", 0x93: "STACK_GLOBAL", 0x29: "EMPTY_TUPLE", 0x74: "TUPLE",
    0x85: "TUPLE1", 0x86: "TUPLE2", 0x87: "TUPLE3", 0x7D: "EMPTY_DICT", 0x73: "SETITEM", 0x75: "SETITEMS",
    0x5D: "EMPTY_LIST", 0x61: "APPEND", 0x65: "APPENDS", 0x4A: "BININT", 0x4B: "BININT1", 0x4D: "BININT2",
    0x8A: "LONG1", 0x4E: "NONE", 0x88: "NEWTRUE", 0x89: "NEWFALSE", 0x52: "REDUCE", 0x81: "NEWOBJ",
    0x62: "BUILD", 0x43: "SHORT_BINBYTES", 0x42: "BINBYTES", 0x8E: "BINBYTES8", 0x96: "BYTEARRAY8",
}


class _Machine:
    """The stack machine. `run()` returns the inert description of the pickled object."""

    def __init__(self, reader: _Reader):
        self.r = reader
        self.stack: list[object] = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}
        self.protocol = 0
        self.stopped, self.result = False, None

    # -- helpers
    def push(self, value: object) -> None:
        if len(self.stack) >= _MAX_STACK:
            raise _Malformed(f"stack deeper than {_MAX_STACK}")
        self.stack.append(value)

    def pop(self) -> object:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise _Malformed("stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list[object]:
        if not self.marks:
            raise _Malformed("no MARK on the stack")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def top(self) -> object:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise _Malformed("stack underflow")
        return self.stack[-1]

    def length(self, fmt: str, what: str) -> int:
        n = struct.unpack(fmt, self.r.read(struct.calcsize(fmt)))[0]
        if n > self.r.remaining():
            raise _Malformed(f"truncated or corrupt: {what} claims {n} bytes but only {self.r.remaining()} bytes "
                             f"are left in the file")
        return n

    def string(self, fmt: str) -> str:
        n = self.length(fmt, "a string")
        if n > _MAX_STRING:
            raise _Malformed(f"a string of {n} bytes (at most {_MAX_STRING} expected)")
        try:
            return self.r.read(n).decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Malformed(f"a string that is not UTF-8 ({err})") from err

    def payload(self, fmt: str) -> _Payload:
        n = self.length(fmt, "a bytes payload")
        return _Payload(self.r.skip(n), n)

    def memo_put(self, index: int) -> None:
        if len(self.memo) >= _MAX_MEMO and index not in self.memo:
            raise _Malformed(f"more than {_MAX_MEMO} memo entries")
        self.memo[index] = self.top()

    def memo_get(self, index: int) -> None:
        if index not in self.memo:
            raise _Malformed(f"memo entry {index} read before it was written")
        self.push(self.memo[index])

    def global_(self, module: str, name: str) -> _Global:
        role = _ALLOWED_GLOBALS.get((module, name))
        if role is None and name == "QuantizedWeight8bit" and _MODULE_RE.match(module):
            role = "quantized"
        if role is None:
            raise _Malformed(f"global '{module}.{name}' is not allowed in a checkpoint pickle "
                             f"(allowed: {ALLOWED_GLOBALS_TEXT})")
        return _Global(module, name, role)

    # -- main loop
    def run(self) -> object:
        first = self.r.read(1)[0]
        if first != 0x80:
            raise _Malformed(f"it does not start with a PROTO opcode (found byte 0x{first:02x}); "
                             f"expected a pickle of protocol 2-5")
        self.protocol = self.r.read(1)[0]
        if not 2 <= self.protocol <= 5:
            raise _Malformed(f"pickle protocol {self.protocol}; expected protocol 2-5")
        for _ in range(_MAX_OPCODES):
            at = self.r.pos
            op = self.r.read(1)[0]
            if op not in self._HANDLERS:
                raise _Malformed(f"opcode 0x{op:02x} ({_opcode_label(op)}) at byte {at} is not allowed; expected "
                                 f"only the opcodes of a pickled numpy array or QuantizedWeight8bit")
            self._HANDLERS[op](self)
            if self.stopped:
                return self.result
        raise _Malformed(f"more than {_MAX_OPCODES} opcodes; a checkpoint pickle has about a hundred")

    def _stop(self) -> None:
        self.result = self.pop()
        if self.stack or self.marks:
            raise _Malformed("STOP with more than one object on the stack")
        self.stopped = True

    def _proto(self) -> None:
        raise _Malformed("a second PROTO opcode")

    def _frame(self) -> None:
        self.length("<Q", "a FRAME")  # frames are only a read-ahead hint; the length is still checked

    def _mark(self) -> None:
        if len(self.marks) >= _MAX_STACK:
            raise _Malformed(f"more than {_MAX_STACK} nested MARKs")
        self.marks.append(len(self.stack))

    def _short_binunicode(self) -> None:
        self.push(self.string("<B"))

    def _binunicode(self) -> None:
        self.push(self.string("<I"))

    def _binunicode8(self) -> None:
        self.push(self.string("<Q"))

    def _memoize(self) -> None:
        self.memo_put(len(self.memo))

    def _binput(self) -> None:
        self.memo_put(self.r.read(1)[0])

    def _long_binput(self) -> None:
        self.memo_put(struct.unpack("<I", self.r.read(4))[0])

    def _binget(self) -> None:
        self.memo_get(self.r.read(1)[0])

    def _long_binget(self) -> None:
        self.memo_get(struct.unpack("<I", self.r.read(4))[0])

    def _global(self) -> None:
        module = self.r.readline()
        name = self.r.readline()
        self.push(self.global_(module, name))

    def _stack_global(self) -> None:
        name, module = self.pop(), self.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Malformed("STACK_GLOBAL on something other than two strings")
        self.push(self.global_(module, name))

    def _empty_tuple(self) -> None:
        self.push(())

    def _tuple(self) -> None:
        self.push(tuple(self.pop_mark()))

    def _tuple_n(self, n: int) -> None:
        items = [self.pop() for _ in range(n)][::-1]
        self.push(tuple(items))

    def _empty_dict(self) -> None:
        self.push(_Dict())

    def _setitem(self) -> None:
        value, key = self.pop(), self.pop()
        target = self.top()
        if not isinstance(target, _Dict):
            raise _Malformed("SETITEM on something that is not a dict")
        target.items.append((key, value))

    def _setitems(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if not isinstance(target, _Dict) or len(items) % 2:
            raise _Malformed("SETITEMS on something that is not a dict, or with an odd number of items")
        target.items.extend(zip(items[::2], items[1::2]))

    def _empty_list(self) -> None:
        self.push(_List())

    def _append(self) -> None:
        value = self.pop()
        target = self.top()
        if not isinstance(target, _List):
            raise _Malformed("APPEND on something that is not a list")
        target.items.append(value)

    def _appends(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if not isinstance(target, _List):
            raise _Malformed("APPENDS on something that is not a list")
        target.items.extend(items)

    def _binint(self) -> None:
        self.push(struct.unpack("<i", self.r.read(4))[0])

    def _binint1(self) -> None:
        self.push(self.r.read(1)[0])

    def _binint2(self) -> None:
        self.push(struct.unpack("<H", self.r.read(2))[0])

    def _long1(self) -> None:
        n = self.r.read(1)[0]
        if n > 8:
            raise _Malformed(f"a LONG1 integer of {n} bytes (at most 8 expected)")
        self.push(int.from_bytes(self.r.read(n), "little", signed=True))

    def _none(self) -> None:
        self.push(None)

    def _newtrue(self) -> None:
        self.push(True)

    def _newfalse(self) -> None:
        self.push(False)

    def _reduce(self) -> None:
        args, func = self.pop(), self.pop()
        if not isinstance(func, _Global) or func.role not in ("reconstruct", "frombuffer", "dtype"):
            raise _Malformed(f"REDUCE calls {_label(func)}; only numpy's _reconstruct, _frombuffer and "
                             f"numpy.dtype may be called")
        if not isinstance(args, tuple):
            raise _Malformed(f"REDUCE of {func} with arguments that are not a tuple")
        self.push(_Call(func, args, "reduce"))

    def _newobj(self) -> None:
        args, cls = self.pop(), self.pop()
        if not isinstance(cls, _Global) or cls.role != "quantized":
            raise _Malformed(f"NEWOBJ creates {_label(cls)}; only QuantizedWeight8bit may be created")
        if args != ():
            raise _Malformed(f"NEWOBJ of {cls} with arguments {_brief(args)}; expected none")
        self.push(_Call(cls, args, "newobj"))

    def _build(self) -> None:
        state = self.pop()
        target = self.top()
        if not isinstance(target, _Call) or target.built:
            raise _Malformed(f"BUILD on {_label(target)}; expected a freshly made array, dtype or "
                             f"QuantizedWeight8bit")
        target.state, target.built = state, True

    def _short_binbytes(self) -> None:
        self.push(self.payload("<B"))

    def _binbytes(self) -> None:
        self.push(self.payload("<I"))

    def _binbytes8(self) -> None:
        self.push(self.payload("<Q"))

    _HANDLERS = {
        0x80: _proto, 0x95: _frame, 0x28: _mark, 0x2E: _stop, 0x8C: _short_binunicode, 0x58: _binunicode,
        0x8D: _binunicode8, 0x94: _memoize, 0x71: _binput, 0x72: _long_binput, 0x68: _binget,
        0x6A: _long_binget, 0x63: _global, 0x93: _stack_global, 0x29: _empty_tuple, 0x74: _tuple,
        0x85: lambda self: self._tuple_n(1), 0x86: lambda self: self._tuple_n(2),
        0x87: lambda self: self._tuple_n(3), 0x7D: _empty_dict, 0x73: _setitem, 0x75: _setitems,
        0x5D: _empty_list, 0x61: _append, 0x65: _appends, 0x4A: _binint, 0x4B: _binint1, 0x4D: _binint2,
        0x8A: _long1, 0x4E: _none, 0x88: _newtrue, 0x89: _newfalse, 0x52: _reduce, 0x81: _newobj,
        0x62: _build, 0x43: _short_binbytes, 0x42: _binbytes, 0x8E: _binbytes8, 0x96: _binbytes8,
    }


def _opcode_label(op: int) -> str:
    if op in _OPCODE_NAMES:
        return _OPCODE_NAMES[op]
    import pickletools  # only for the opcode's name in the error message

    known = {o.code.encode("latin-1")[0]: o.name for o in pickletools.opcodes}
    return known.get(op, "not a pickle opcode")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxtuple, _REPR.maxstring, _REPR.maxother = 3, 9, 60, 60


def _brief(value: object) -> str:
    """A short repr for error messages: hostile input can nest tuples thousands deep (plain repr recurses)."""
    return _REPR.repr(value)


def _label(node: object) -> str:
    if isinstance(node, _Global):
        return f"'{node}'"
    if isinstance(node, _Call):
        return f"the result of {node.func}(...)"
    return type(node).__name__


# ---- from the description to metadata ---------------------------------------------------------------

def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(_is_int(d) and d >= 0 for d in value):
        raise _Malformed(f"{what}: shape {_brief(value)} is not a tuple of non-negative ints")
    if len(value) > _MAX_DIMS:
        raise _Malformed(f"{what}: shape with {len(value)} dimensions (at most {_MAX_DIMS} expected)")
    if math.prod(d for d in value if d) > _MAX_ELEMENTS:  # zero-size arrays too: numpy cannot shape them
        raise _Malformed(f"{what}: shape {_brief(value)} is implausibly large (more than 2**48 elements)")
    return value


def _describe_dtype(node: object, what: str) -> str:
    """A `numpy.dtype(code, False, True)` + BUILD(state) description -> dtype name."""
    if not (isinstance(node, _Call) and node.func.role == "dtype"):
        raise _Malformed(f"{what}: dtype is {_label(node)}; expected numpy.dtype(...)")
    if len(node.args) != 3 or node.args[1:] != (False, True):
        raise _Malformed(f"{what}: numpy.dtype arguments {_brief(node.args)}; expected (code, False, True)")
    code = node.args[0]
    if isinstance(code, _Global) and code.role == "bfloat16":
        name, itemsize = "bfloat16", 2
    elif isinstance(code, str) and code in _DTYPE_CODES:
        name = _DTYPE_CODES[code]
        itemsize = np.dtype(name).itemsize
    elif isinstance(code, str) and code.lstrip("<>|=").startswith("O"):
        raise _Malformed(f"{what}: object dtype '{code}' is not allowed; expected a numeric dtype")
    else:
        raise _Malformed(f"{what}: dtype {_brief(code)} is not allowed; expected one of "
                         f"{', '.join(_DTYPE_CODES)} or ml_dtypes.bfloat16")
    state = node.state
    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
        raise _Malformed(f"{what}: dtype state {_brief(state)}; expected numpy's (3, byteorder, None, ...) tuple")
    byteorder, subarray, names, fields, elsize, alignment, flags = state[1:8]
    if byteorder not in ("<", "|"):
        raise _Malformed(f"{what}: byte order {_brief(byteorder)}; expected little-endian '<' (or '|')")
    if (subarray, names, fields) != (None, None, None) or (len(state) == 9 and state[8] is not None):
        raise _Malformed(f"{what}: a structured/subarray dtype; expected a plain numeric dtype")
    if elsize not in (-1, itemsize) or not _is_int(alignment) or not _is_int(flags):
        raise _Malformed(f"{what}: dtype state {_brief(state)} does not describe {name}")
    return name


def _describe_array(node: object, what: str) -> ArrayInfo:
    """`_reconstruct(ndarray, (0,), b'b')` + BUILD((1, shape, dtype, fortran, data)), or protocol 5's
    `_frombuffer(data, dtype, shape, order)` -> ArrayInfo."""
    if isinstance(node, _Call) and node.func.role == "reconstruct":
        args = node.args
        if not (len(args) == 3 and isinstance(args[0], _Global) and args[0].role == "ndarray"
                and isinstance(args[2], _Payload)):
            raise _Malformed(f"{what}: _reconstruct arguments are not (numpy.ndarray, shape, bytes)")
        state = node.state
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise _Malformed(f"{what}: array state is not numpy's (1, shape, dtype, fortran, data) tuple")
        _, shape, dtype, fortran, data = state
        if not isinstance(fortran, bool):
            raise _Malformed(f"{what}: fortran flag {_brief(fortran)} is not a bool")
    elif isinstance(node, _Call) and node.func.role == "frombuffer":
        if len(node.args) != 4 or node.built:
            raise _Malformed(f"{what}: _frombuffer arguments are not (data, dtype, shape, order)")
        data, dtype, shape, order = node.args
        if order not in ("C", "F"):
            raise _Malformed(f"{what}: array order {_brief(order)}; expected 'C' or 'F'")
        fortran = order == "F"
    else:
        raise _Malformed(f"{what} is {_label(node)}; expected a numpy array")
    shape = _shape(shape, what)
    dtype_name = _describe_dtype(dtype, what)
    if not isinstance(data, _Payload):
        raise _Malformed(f"{what}: array data is {_label(data)}; expected raw bytes")
    expected = math.prod(shape) * numpy_dtype(dtype_name).itemsize
    if data.length != expected:
        raise _Malformed(f"{what}: {data.length} bytes of data for {dtype_name}{list(shape)}; expected {expected}")
    return ArrayInfo(dtype_name, shape, data.offset, data.length, fortran and len(shape) > 1)


def _describe_root(root: object) -> tuple[str, ArrayInfo, ArrayInfo | None, str | None]:
    if isinstance(root, _Call) and root.func.role == "quantized":
        state = root.state
        if not isinstance(state, _Dict):
            raise _Malformed(f"{root.func} state is {_label(state)}; expected a dict with weight and scales")
        fields = dict(state.items) if all(isinstance(k, str) for k, _ in state.items) else {}
        if sorted(fields) != ["scales", "weight"] or len(state.items) != 2:
            keys = [k if isinstance(k, str) else _label(k) for k, _ in state.items]
            raise _Malformed(f"{root.func} has fields {keys}; expected exactly weight and scales")
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
            reader = _Reader(f.fileno(), size)
            machine = _Machine(reader)
            try:
                root = machine.run()
                if reader.remaining():
                    raise _Malformed(f"{reader.remaining()} bytes after the STOP opcode")
                kind, array, scales, class_name = _describe_root(root)
            except _Truncated:
                raise CheckpointError(f"{path}: truncated: the pickle ends at byte {size} before its STOP "
                                      f"opcode") from None
            except _Malformed as err:
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


# ---- whole checkpoints --------------------------------------------------------------------------------

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
        raise CheckpointError(f"{ckpt_dir}: " + "; ".join(problems) + f"; expected exactly {count} files "
                              f"{expected[0]} .. {expected[-1]} for this config")
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
    layout = checkpoint_layout(config)
    files = check_file_list(ckpt_dir, len(layout))
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
        raise CheckpointError(head + ":\n  " + "\n  ".join(problems[:20])
                              + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
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
