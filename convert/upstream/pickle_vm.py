"""A restricted pickle machine: it reads a pickle's opcodes and builds inert descriptions, never objects.

A pickle is a program, so the raw checkpoint is never unpickled. This stack machine knows only the opcodes
a pickled numpy array or a pickled dataclass needs (protocols 2-5) and builds `GlobalRef`, `Call`,
`Payload`, tuples, strs and ints: nothing is imported, called or allocated from the file. It enforces

- an opcode allowlist, and a global allowlist: `numpy.core.multiarray._reconstruct` (also
  `numpy._core...`), `numpy.ndarray`, `numpy.dtype`, `ml_dtypes.bfloat16`, `<any module>.QuantizedWeight8bit`,
  and - for protocol 5 pickles of arrays - `numpy.core.numeric._frombuffer` (also `numpy._core...`);
- limits on strings, memo, stack depth, marks and opcode count, and every length prefix checked against
  the bytes left in the file before anything is read.

Array payloads are never read: their (offset, length) is recorded as a `Payload` and skipped, so running
the machine reads only the few hundred bytes of pickle structure. What the description means (an array,
a QuantizedWeight8bit) is `convert.upstream.tensor_file`'s business.
"""

from __future__ import annotations

import os
import re
import reprlib
import struct
from dataclasses import dataclass

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


@dataclass(frozen=True)
class GlobalRef:
    module: str
    name: str
    role: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class Payload:
    offset: int
    length: int


class Call:
    """REDUCE `func(*args)` or NEWOBJ `cls.__new__(cls, *args)`, with the state a BUILD gave it. Never run."""

    def __init__(self, func: GlobalRef, args: tuple, how: str):
        self.func, self.args, self.how = func, args, how
        self.state: object = None
        self.built = False


class DictNode:
    def __init__(self) -> None:
        self.items: list[tuple[object, object]] = []


class ListNode:
    def __init__(self) -> None:
        self.items: list[object] = []


class _Mark:
    pass


_MARK = _Mark()


class StructureReader:
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
            raise Truncated(n)
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
                raise Malformed(f"a GLOBAL name longer than {limit} bytes")


class Truncated(Exception):
    pass


class Malformed(Exception):
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


class PickleMachine:
    """The stack machine. `run()` returns the inert description of the pickled object."""

    def __init__(self, reader: StructureReader):
        self.r = reader
        self.stack: list[object] = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}
        self.protocol = 0
        self.stopped, self.result = False, None

    # -- helpers
    def push(self, value: object) -> None:
        if len(self.stack) >= _MAX_STACK:
            raise Malformed(f"stack deeper than {_MAX_STACK}")
        self.stack.append(value)

    def pop(self) -> object:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise Malformed("stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list[object]:
        if not self.marks:
            raise Malformed("no MARK on the stack")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def top(self) -> object:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise Malformed("stack underflow")
        return self.stack[-1]

    def length(self, fmt: str, what: str) -> int:
        n = struct.unpack(fmt, self.r.read(struct.calcsize(fmt)))[0]
        if n > self.r.remaining():
            raise Malformed(f"truncated or corrupt: {what} claims {n} bytes but only {self.r.remaining()} bytes "
                             f"are left in the file")
        return n

    def string(self, fmt: str) -> str:
        n = self.length(fmt, "a string")
        if n > _MAX_STRING:
            raise Malformed(f"a string of {n} bytes (at most {_MAX_STRING} expected)")
        try:
            return self.r.read(n).decode("utf-8")
        except UnicodeDecodeError as err:
            raise Malformed(f"a string that is not UTF-8 ({err})") from err

    def payload(self, fmt: str) -> Payload:
        n = self.length(fmt, "a bytes payload")
        return Payload(self.r.skip(n), n)

    def memo_put(self, index: int) -> None:
        if len(self.memo) >= _MAX_MEMO and index not in self.memo:
            raise Malformed(f"more than {_MAX_MEMO} memo entries")
        self.memo[index] = self.top()

    def memo_get(self, index: int) -> None:
        if index not in self.memo:
            raise Malformed(f"memo entry {index} read before it was written")
        self.push(self.memo[index])

    def global_(self, module: str, name: str) -> GlobalRef:
        role = _ALLOWED_GLOBALS.get((module, name))
        if role is None and name == "QuantizedWeight8bit" and _MODULE_RE.match(module):
            role = "quantized"
        if role is None:
            raise Malformed(f"global '{module}.{name}' is not allowed in a checkpoint pickle "
                             f"(allowed: {ALLOWED_GLOBALS_TEXT})")
        return GlobalRef(module, name, role)

    # -- main loop
    def run(self) -> object:
        first = self.r.read(1)[0]
        if first != 0x80:
            raise Malformed(f"it does not start with a PROTO opcode (found byte 0x{first:02x}); "
                             f"expected a pickle of protocol 2-5")
        self.protocol = self.r.read(1)[0]
        if not 2 <= self.protocol <= 5:
            raise Malformed(f"pickle protocol {self.protocol}; expected protocol 2-5")
        for _ in range(_MAX_OPCODES):
            at = self.r.pos
            op = self.r.read(1)[0]
            if op not in self._HANDLERS:
                raise Malformed(f"opcode 0x{op:02x} ({_opcode_label(op)}) at byte {at} is not allowed; expected "
                                 f"only the opcodes of a pickled numpy array or QuantizedWeight8bit")
            self._HANDLERS[op](self)
            if self.stopped:
                return self.result
        raise Malformed(f"more than {_MAX_OPCODES} opcodes; a checkpoint pickle has about a hundred")

    def _stop(self) -> None:
        self.result = self.pop()
        if self.stack or self.marks:
            raise Malformed("STOP with more than one object on the stack")
        self.stopped = True

    def _proto(self) -> None:
        raise Malformed("a second PROTO opcode")

    def _frame(self) -> None:
        self.length("<Q", "a FRAME")  # frames are only a read-ahead hint; the length is still checked

    def _mark(self) -> None:
        if len(self.marks) >= _MAX_STACK:
            raise Malformed(f"more than {_MAX_STACK} nested MARKs")
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
            raise Malformed("STACK_GLOBAL on something other than two strings")
        self.push(self.global_(module, name))

    def _empty_tuple(self) -> None:
        self.push(())

    def _tuple(self) -> None:
        self.push(tuple(self.pop_mark()))

    def _tuple_n(self, n: int) -> None:
        items = [self.pop() for _ in range(n)][::-1]
        self.push(tuple(items))

    def _empty_dict(self) -> None:
        self.push(DictNode())

    def _setitem(self) -> None:
        value, key = self.pop(), self.pop()
        target = self.top()
        if not isinstance(target, DictNode):
            raise Malformed("SETITEM on something that is not a dict")
        target.items.append((key, value))

    def _setitems(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if not isinstance(target, DictNode) or len(items) % 2:
            raise Malformed("SETITEMS on something that is not a dict, or with an odd number of items")
        target.items.extend(zip(items[::2], items[1::2]))

    def _empty_list(self) -> None:
        self.push(ListNode())

    def _append(self) -> None:
        value = self.pop()
        target = self.top()
        if not isinstance(target, ListNode):
            raise Malformed("APPEND on something that is not a list")
        target.items.append(value)

    def _appends(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if not isinstance(target, ListNode):
            raise Malformed("APPENDS on something that is not a list")
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
            raise Malformed(f"a LONG1 integer of {n} bytes (at most 8 expected)")
        self.push(int.from_bytes(self.r.read(n), "little", signed=True))

    def _none(self) -> None:
        self.push(None)

    def _newtrue(self) -> None:
        self.push(True)

    def _newfalse(self) -> None:
        self.push(False)

    def _reduce(self) -> None:
        args, func = self.pop(), self.pop()
        if not isinstance(func, GlobalRef) or func.role not in ("reconstruct", "frombuffer", "dtype"):
            raise Malformed(f"REDUCE calls {label(func)}; only numpy's _reconstruct, _frombuffer and "
                             f"numpy.dtype may be called")
        if not isinstance(args, tuple):
            raise Malformed(f"REDUCE of {func} with arguments that are not a tuple")
        self.push(Call(func, args, "reduce"))

    def _newobj(self) -> None:
        args, cls = self.pop(), self.pop()
        if not isinstance(cls, GlobalRef) or cls.role != "quantized":
            raise Malformed(f"NEWOBJ creates {label(cls)}; only QuantizedWeight8bit may be created")
        if args != ():
            raise Malformed(f"NEWOBJ of {cls} with arguments {brief(args)}; expected none")
        self.push(Call(cls, args, "newobj"))

    def _build(self) -> None:
        state = self.pop()
        target = self.top()
        if not isinstance(target, Call) or target.built:
            raise Malformed(f"BUILD on {label(target)}; expected a freshly made array, dtype or "
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


def brief(value: object) -> str:
    """A short repr for error messages: hostile input can nest tuples thousands deep (plain repr recurses)."""
    return _REPR.repr(value)


def label(node: object) -> str:
    if isinstance(node, GlobalRef):
        return f"'{node}'"
    if isinstance(node, Call):
        return f"the result of {node.func}(...)"
    return type(node).__name__
