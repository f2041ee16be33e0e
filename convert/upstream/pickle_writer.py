"""Write raw-checkpoint pickles (protocol 4) by hand, streaming array data from memory or a view.

The output is byte-for-byte what CPython's pickler writes for a numpy array, or for upstream's
`__main__.QuantizedWeight8bit` dataclass holding two arrays: the same opcodes, memo indices and protocol-4
frames (payloads of 64 KiB or more outside frames). No class needs to exist under `__main__`, and a
transposed view is written block by block instead of being copied whole first.

`_reconstruct` is named `numpy.core.multiarray._reconstruct`, as numpy 1.x (upstream's environment) writes
it; numpy 1.x and 2.x both load that name.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

import numpy as np

from convert.disk.blocks import as_bytes, iter_c_blocks

FRAME_SIZE_TARGET = 64 * 1024  # CPython's framing constants (pickle._Framer)
FRAME_SIZE_MIN = 4
RECONSTRUCT_MODULE = "numpy.core.multiarray"
QUANTIZED_CLASS = ("__main__", "QuantizedWeight8bit")

_PROTO, _FRAME, _STOP, _MARK = b"\x80", b"\x95", b".", b"("
_MEMOIZE, _BINGET, _LONG_BINGET = b"\x94", b"h", b"j"
_SHORT_BINUNICODE, _BINUNICODE, _STACK_GLOBAL = b"\x8c", b"X", b"\x93"
_EMPTY_TUPLE, _TUPLE, _TUPLE_N = b")", b"t", {1: b"\x85", 2: b"\x86", 3: b"\x87"}
_BININT, _BININT1, _BININT2, _LONG1 = b"J", b"K", b"M", b"\x8a"
_NONE, _NEWTRUE, _NEWFALSE = b"N", b"\x88", b"\x89"
_REDUCE, _NEWOBJ, _BUILD = b"R", b"\x81", b"b"
_EMPTY_DICT, _SETITEMS = b"}", b"u"
_SHORT_BINBYTES, _BINBYTES, _BINBYTES8 = b"C", b"B", b"\x8e"


class _Global:
    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class _Pickler:
    """The few `save_*` rules of CPython's protocol-4 pickler that arrays and the dataclass need.

    Memo keys stand for object identity in CPython: equal strings, the `b'b'` constant, globals and dtypes
    are shared objects there too; tuples, arrays and data payloads are always fresh.
    """

    def __init__(self, file: BinaryIO, reconstruct_module: str, chunk_bytes: int):
        self.file = file
        self.frame = bytearray()
        self.memo: dict[object, int] = {}
        self.fresh = 0
        self.reconstruct_module = reconstruct_module
        self.chunk_bytes = chunk_bytes

    # -- framing (pickle._Framer)
    def write(self, data: bytes) -> None:
        self.frame += data

    def commit_frame(self, force: bool = False) -> None:
        if self.frame and (force or len(self.frame) >= FRAME_SIZE_TARGET):
            if len(self.frame) >= FRAME_SIZE_MIN:
                self.file.write(_FRAME + struct.pack("<Q", len(self.frame)))
            self.file.write(self.frame)
            self.frame = bytearray()

    def start_save(self, key: object = None) -> bool:
        """Opcode boundary before saving an object; True (and a BINGET written) if `key` is memoized."""
        self.commit_frame()
        if key is not None and key in self.memo:
            index = self.memo[key]
            self.write(_BINGET + bytes([index]) if index < 256 else _LONG_BINGET + struct.pack("<I", index))
            return True
        return False

    def memoize(self, key: object = None) -> None:
        if key is None:
            self.fresh += 1
            key = ("fresh", self.fresh)
        self.memo[key] = len(self.memo)
        self.write(_MEMOIZE)

    # -- plain values
    def save(self, value: object) -> None:
        if value is None:
            self.commit_frame()
            self.write(_NONE)
        elif isinstance(value, bool):
            self.commit_frame()
            self.write(_NEWTRUE if value else _NEWFALSE)
        elif isinstance(value, int):
            self.commit_frame()
            self.write(_int_opcode(value))
        elif isinstance(value, str):
            self.save_str(value)
        elif isinstance(value, tuple):
            self.save_tuple(value)
        elif isinstance(value, _Global):
            self.save_global(value)
        elif isinstance(value, np.dtype):
            self.save_dtype(value)
        else:
            raise TypeError(f"cannot write {type(value).__name__} into a checkpoint pickle")

    def save_str(self, value: str) -> None:
        if self.start_save(("str", value)):
            return
        data = value.encode("utf-8")
        if len(data) <= 0xFF:
            self.write(_SHORT_BINUNICODE + bytes([len(data)]) + data)
        else:
            self.write(_BINUNICODE + struct.pack("<I", len(data)) + data)
        self.memoize(("str", value))

    def save_tuple(self, value: tuple) -> None:
        self.commit_frame()
        if not value:
            self.write(_EMPTY_TUPLE)
            return
        if len(value) <= 3:
            for item in value:
                self.save(item)
            self.write(_TUPLE_N[len(value)])
        else:
            self.write(_MARK)
            for item in value:
                self.save(item)
            self.write(_TUPLE)
        self.memoize()

    def save_global(self, value: _Global) -> None:
        key = ("global", value.module, value.name)
        if self.start_save(key):
            return
        self.save_str(value.module)
        self.save_str(value.name)
        self.write(_STACK_GLOBAL)
        self.memoize(key)

    def save_small_bytes(self, data: bytes, key: object = None) -> None:
        if self.start_save(key):
            return
        self.write(_SHORT_BINBYTES + bytes([len(data)]) + data)
        self.memoize(key)

    # -- numpy objects, as numpy's __reduce__ describes them
    def save_dtype(self, dtype: np.dtype) -> None:
        key = ("dtype", dtype)
        if self.start_save(key):
            return
        func, args, state = dtype.__reduce__()
        if func is not np.dtype or len(args) != 3:
            raise TypeError(f"unexpected pickled form of dtype {dtype}")
        code = args[0] if isinstance(args[0], str) else _Global(args[0].__module__, args[0].__name__)
        self.save(_Global("numpy", "dtype"))
        self.save((code, *args[1:]))
        self.write(_REDUCE)
        self.memoize(key)
        self.save(state)
        self.write(_BUILD)

    def save_array(self, array: np.ndarray) -> None:
        """`_reconstruct(ndarray, (0,), b'b')` + BUILD((1, shape, dtype, False, C-order data))."""
        self.commit_frame()
        self.save(_Global(self.reconstruct_module, "_reconstruct"))
        self.commit_frame()
        self.save(_Global("numpy", "ndarray"))
        self.save((0,))
        self.save_small_bytes(b"b", key=("bytes", b"b"))
        self.write(_TUPLE_N[3])
        self.memoize()
        self.write(_REDUCE)
        self.memoize()
        self.commit_frame()
        self.write(_MARK)
        self.save(1)
        self.save(tuple(int(n) for n in array.shape))
        self.save(array.dtype)
        self.save(False)
        self.save_data(array)
        self.write(_TUPLE)
        self.memoize()
        self.write(_BUILD)

    def save_data(self, array: np.ndarray) -> None:
        nbytes = array.nbytes
        if nbytes == 0 and self.start_save(("bytes", b"")):
            return
        self.commit_frame()
        if nbytes <= 0xFF:
            self.write(_SHORT_BINBYTES + bytes([nbytes]) + bytes(as_bytes(array)))
        elif nbytes < FRAME_SIZE_TARGET:
            self.write(_BINBYTES + struct.pack("<I", nbytes) + bytes(as_bytes(array)))
        else:  # large: outside any frame, streamed block by block
            self.commit_frame(force=True)
            header = _BINBYTES + struct.pack("<I", nbytes) if nbytes <= 0xFFFFFFFF else \
                _BINBYTES8 + struct.pack("<Q", nbytes)
            self.file.write(header)
            for block in iter_c_blocks(array, self.chunk_bytes):
                self.file.write(as_bytes(block))
        self.memoize(("bytes", b"") if nbytes == 0 else None)

    def save_quantized(self, weight: np.ndarray, scales: np.ndarray) -> None:
        """NEWOBJ `__main__.QuantizedWeight8bit` + BUILD({"weight": ..., "scales": ...}), as a dataclass pickles."""
        self.commit_frame()
        self.save(_Global(*QUANTIZED_CLASS))
        self.save(())
        self.write(_NEWOBJ)
        self.memoize()
        self.commit_frame()
        self.write(_EMPTY_DICT)
        self.memoize()
        self.write(_MARK)
        for name, array in (("weight", weight), ("scales", scales)):
            self.save_str(name)
            self.save_array(array)
        self.write(_SETITEMS)
        self.write(_BUILD)

    def finish(self) -> None:
        self.write(_STOP)
        self.commit_frame(force=True)


def _int_opcode(value: int) -> bytes:
    if 0 <= value <= 0xFF:
        return _BININT1 + bytes([value])
    if 0 <= value <= 0xFFFF:
        return _BININT2 + struct.pack("<H", value)
    if -0x80000000 <= value <= 0x7FFFFFFF:
        return _BININT + struct.pack("<i", value)
    encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return _LONG1 + bytes([len(encoded)]) + encoded


def write_array_pickle(file: BinaryIO, array: np.ndarray, *, reconstruct_module: str = RECONSTRUCT_MODULE,
                       chunk_bytes: int = 64 << 20) -> None:
    """Pickle `array` (any strides; written in C order) to `file` as `pickle.dump(array, file, protocol=4)` would."""
    pickler = _Pickler(file, reconstruct_module, chunk_bytes)
    file.write(_PROTO + b"\x04")
    pickler.save_array(array)
    pickler.finish()


def write_quantized_pickle(file: BinaryIO, weight: np.ndarray, scales: np.ndarray, *,
                           reconstruct_module: str = RECONSTRUCT_MODULE, chunk_bytes: int = 64 << 20) -> None:
    """Pickle upstream's `__main__.QuantizedWeight8bit(weight=int8 [..., in, out], scales=bf16 [..., G, out])`."""
    pickler = _Pickler(file, reconstruct_module, chunk_bytes)
    file.write(_PROTO + b"\x04")
    pickler.save_quantized(weight, scales)
    pickler.finish()
