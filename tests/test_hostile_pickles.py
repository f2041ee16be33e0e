"""Hostile pickles against the restricted reader: refused with a clear CheckpointError, and nothing runs.

Every payload here is live: a control run feeds the same kind of payload to the real `pickle.loads` in a
child process and checks that it does create its marker file (or import its module). The reader then gets
its own copy, aimed at a marker under the test's tmp_path, and the test checks the marker never appears,
no hostile module was imported, and nothing else was written. A second part fuzzes the reader with
mutated valid pickles and with opcode soups (hypothesis): the only outcomes allowed are a result or a
CheckpointError, within a time and memory budget.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import types
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convert.upstream.pickle_writer import write_array_pickle, write_quantized_pickle
from convert.upstream.quantized import QuantizedWeight8bit
from convert.upstream.tensor_file import CheckpointError, read_tensor_file, scan_tensor_file
from support.checkpoints import GOLDEN_DIR, EvalCall, PopenCall, SystemCall

IMPORT_MODULE = f"grok_hostile_import_{os.getpid()}"  # importing it creates IMPORTED
CLASS_MODULE = f"grok_hostile_classes_{os.getpid()}"  # its classes' __setstate__ create SETSTATE


# ---- building payloads ------------------------------------------------------------------------------------

def _str(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()  # GLOBAL


def _proto4(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


class ExecCall:
    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return exec, (self.source,)


def _touch_source(path: Path) -> str:
    return f"open({str(path)!r}, 'w').close()"


def _fake_class(module: str, name: str):
    """A dataclass that pickles as `module.name` without `module` existing on disk for this process."""

    @dataclass
    class Stand:
        weight: np.ndarray
        scales: np.ndarray

    Stand.__module__, Stand.__qualname__, Stand.__name__ = module, name, name
    return Stand


def _pickle_as(module: str, name: str, **fields) -> bytes:
    cls = _fake_class(module, name)
    fake = types.ModuleType(module)
    setattr(fake, name, cls)
    previous = sys.modules.get(module)
    sys.modules[module] = fake  # only so that pickle.dumps can find the class; put back at once
    try:
        return pickle.dumps(cls(**fields), protocol=4)
    finally:
        if previous is None:
            del sys.modules[module]
        else:
            sys.modules[module] = previous


def _small_quantized() -> dict[str, np.ndarray]:
    return {"weight": np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
            "scales": np.ones((1, 4), ml_dtypes.bfloat16)}


def _payloads(d: Path) -> dict[str, bytes]:
    """Each hostile pickle, aimed at marker files in directory `d`."""
    inner = pickle.dumps(SystemCall(f"touch {d / 'NESTED'}"), protocol=4)
    return {
        "os.system": pickle.dumps(SystemCall(f"touch {d / 'SYSTEM'}"), protocol=4),
        "subprocess.Popen": pickle.dumps(PopenCall(["touch", str(d / "POPEN")]), protocol=4),
        "builtins.eval": pickle.dumps(EvalCall(_touch_source(d / "EVAL")), protocol=4),
        "builtins.exec": pickle.dumps(ExecCall(_touch_source(d / "EXEC")), protocol=4),
        # getattr(__import__('os'), 'system')('touch ...'): the classic gadget without naming os.system
        "builtins.getattr": _proto4(_global("builtins", "getattr") + _global("builtins", "__import__")
                                    + _str("os") + b"\x85R" + _str("system") + b"\x86R"
                                    + _str(f"touch {d / 'GETATTR'}") + b"\x85R"),
        "builtins.__import__": _proto4(_global("builtins", "__import__") + _str(IMPORT_MODULE) + b"\x85R"),
        # merely naming a global makes pickle import its module
        "unexpected module": _proto4(_global(IMPORT_MODULE, "anything")),
        # numpy's own exec gadget
        "numpy runstring": _proto4(_global("numpy.testing._private.utils", "runstring")
                                   + _str(_touch_source(d / "RUNSTRING")) + b"}\x86R"),
        "malicious __setstate__": _proto4(_global(CLASS_MODULE, "Evil") + b")\x81}b"),
        "numpy object array": pickle.dumps(np.array([SystemCall(f"touch {d / 'OBJECT'}"), 1], dtype=object),
                                           protocol=4),
        "nested pickle (_pickle.loads)": _proto4(_global("_pickle", "loads") + b"B" + struct.pack("<I", len(inner))
                                                 + inner + b"\x85R"),
        "nested pickle (pickle.loads)": _proto4(_global("pickle", "loads") + b"B" + struct.pack("<I", len(inner))
                                                + inner + b"\x85R"),
    }


MODULE_SOURCES = {
    IMPORT_MODULE: "open({imported!r}, 'w').close()\nanything = None\n",
    CLASS_MODULE: textwrap.dedent("""\
        class Evil:
            def __setstate__(self, state):
                open({setstate!r}, 'w').close()


        class QuantizedWeight8bit:
            def __setstate__(self, state):
                open({setstate!r}, 'w').close()
        """),
}

# what each payload would create, and what the reader's error must say
EXPECTED = {
    "os.system": ("SYSTEM", "'posix.system' is not allowed"),
    "subprocess.Popen": ("POPEN", "'subprocess.Popen' is not allowed"),
    "builtins.eval": ("EVAL", "'builtins.eval' is not allowed"),
    "builtins.exec": ("EXEC", "'builtins.exec' is not allowed"),
    "builtins.getattr": ("GETATTR", "'builtins.getattr' is not allowed"),
    "builtins.__import__": ("IMPORTED", "'builtins.__import__' is not allowed"),
    "unexpected module": ("IMPORTED", f"'{IMPORT_MODULE}.anything' is not allowed"),
    "numpy runstring": ("RUNSTRING", "'numpy.testing._private.utils.runstring' is not allowed"),
    "malicious __setstate__": ("SETSTATE", f"'{CLASS_MODULE}.Evil' is not allowed"),
    "numpy object array": ("OBJECT", "'posix.system' is not allowed"),
    "nested pickle (_pickle.loads)": ("NESTED", "'_pickle.loads' is not allowed"),
    "nested pickle (pickle.loads)": ("NESTED", "'pickle.loads' is not allowed"),
}


def _write_modules(d: Path) -> None:
    for name, source in MODULE_SOURCES.items():
        (d / f"{name}.py").write_text(source.format(imported=str(d / "IMPORTED"), setstate=str(d / "SETSTATE")))


def _side_effects(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.suffix != ".py" and p.name not in ("__pycache__", "inputs"))


CONTROL = textwrap.dedent("""\
    import pickle, sys, time
    sys.path.insert(0, sys.argv[1])
    for path in sys.argv[2:]:
        try:
            result = pickle.loads(open(path, 'rb').read())
            if hasattr(result, 'wait'):
                result.wait()
        except Exception:
            pass
    """)


@pytest.fixture(scope="module")
def live_payloads(tmp_path_factory) -> dict[str, list[str]]:
    """Runs every payload through the real pickle.loads in a child: payload name -> markers it created."""
    found = {}
    for name in EXPECTED:
        d = tmp_path_factory.mktemp("control")
        _write_modules(d)
        (d / "inputs").mkdir()
        path = d / "inputs" / "payload"
        path.write_bytes(_payloads(d)[name])
        subprocess.run([sys.executable, "-c", CONTROL, str(d), str(path)], check=True, timeout=60,
                       capture_output=True)
        found[name] = _side_effects(d)
    return found


def _no_hostile_modules() -> bool:
    return IMPORT_MODULE not in sys.modules and CLASS_MODULE not in sys.modules


@pytest.mark.parametrize("name", list(EXPECTED))
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch, live_payloads, name):
    marker, message = EXPECTED[name]
    assert marker in live_payloads[name], f"control: pickle.loads of {name} did not do its harm"
    _write_modules(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # an import of the hostile modules would succeed
    (tmp_path / "inputs").mkdir()
    path = tmp_path / "inputs" / "tensor00000_000"
    path.write_bytes(_payloads(tmp_path)[name])
    before = path.read_bytes()
    for reader in (scan_tensor_file, read_tensor_file):
        with pytest.raises(CheckpointError) as err:
            reader(path)
        text = str(err.value)
        assert text.startswith(f"{path}: ") and message in text and "\n" not in text
        assert "allowed: numpy.core.multiarray._reconstruct" in text  # and says what is allowed
    time.sleep(0.05)  # a Popen would have had time to run
    assert _side_effects(tmp_path) == [] and _no_hostile_modules()
    assert path.read_bytes() == before


def test_allowed_class_name_from_a_hostile_module_is_read_as_data_only(tmp_path, monkeypatch, live_payloads):
    """`<any module>.QuantizedWeight8bit` is accepted (upstream pickles it from __main__), but the module is
    never imported and its __setstate__ never runs: the fields are read as plain arrays."""
    fields = _small_quantized()
    payload = _pickle_as(CLASS_MODULE, "QuantizedWeight8bit", **fields)
    control = tmp_path / "control"
    control.mkdir()
    _write_modules(control)
    (control / "payload").write_bytes(payload)
    subprocess.run([sys.executable, "-c", CONTROL, str(control), str(control / "payload")], check=True, timeout=60)
    assert "SETSTATE" in _side_effects(control)

    mine = tmp_path / "mine"
    mine.mkdir()
    _write_modules(mine)
    monkeypatch.syspath_prepend(str(mine))
    (mine / "inputs").mkdir()
    path = mine / "inputs" / "tensor00000_000"
    path.write_bytes(payload)
    info = scan_tensor_file(path)
    value = read_tensor_file(path, info)
    assert info.class_name == f"{CLASS_MODULE}.QuantizedWeight8bit"
    assert isinstance(value, QuantizedWeight8bit)
    assert value.weight.tobytes() == fields["weight"].tobytes() and value.scales.tobytes() == fields["scales"].tobytes()
    assert _side_effects(mine) == [] and _no_hostile_modules()


def test_a_pickle_inside_array_data_stays_data(tmp_path):
    inner = pickle.dumps(SystemCall(f"touch {tmp_path / 'NESTED'}"), protocol=4)
    (tmp_path / "inputs").mkdir()
    path = tmp_path / "inputs" / "tensor00000_000"
    path.write_bytes(pickle.dumps(np.frombuffer(inner, np.uint8), protocol=4))
    value = read_tensor_file(path)
    assert value.tobytes() == inner and value.dtype == np.uint8
    assert _side_effects(tmp_path) == []


@pytest.mark.parametrize("body, label", [
    (b"(ios\nsystem\n", "INST"), (b"(No", "OBJ"), (b"\x82\x01", "EXT1"), (b"\x83\x01\x00", "EXT2"),
    (b"\x84\x01\x00\x00\x00", "EXT4"), (b"Px\n", "PERSID"), (b"NQ", "BINPERSID"), (b"\x97", "NEXT_BUFFER"),
    (b"N\x98", "READONLY_BUFFER"), (b"N)R", "REDUCE calls NoneType"), (b"N)\x81", "NEWOBJ creates NoneType"),
])
def test_dangerous_opcodes_are_refused(tmp_path, body, label):
    """Object creation by INST/OBJ, the copyreg extension registry, persistent ids, out-of-band buffers,
    and calls of anything but the allowlisted callables."""
    path = tmp_path / "tensor00000_000"
    path.write_bytes(b"\x80\x05" + body + b".")
    with pytest.raises(CheckpointError, match=label):
        scan_tensor_file(path)


# ---- length prefixes and sizes meant to exhaust memory --------------------------------------------------------

def _peak_bytes(fn) -> int:
    """Peak bytes allocated by Python and numpy while running `fn()` (tracemalloc sees both)."""
    tracemalloc.start()
    try:
        fn()
    except CheckpointError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


HUGE = 1 << 62


@pytest.mark.parametrize("opcode, fmt, what", [
    (b"B", "<I", "a bytes payload"), (b"\x8e", "<Q", "a bytes payload"), (b"\x96", "<Q", "a bytes payload"),
    (b"X", "<I", "a string"), (b"\x8d", "<Q", "a string"), (b"\x95", "<Q", "a FRAME"),
    (b"C", "<B", "a bytes payload"), (b"\x8c", "<B", "a string"),
])
def test_oversized_length_prefix_is_refused_before_allocating(tmp_path, opcode, fmt, what):
    claimed = {"<B": 255, "<I": 0xFFFFFFF0, "<Q": HUGE}[fmt]
    path = tmp_path / "tensor00000_000"
    path.write_bytes(b"\x80\x04" + opcode + struct.pack(fmt, claimed) + b"x" * 40)
    with pytest.raises(CheckpointError, match=f"{what} claims {claimed} bytes but only 40 bytes are left"):
        scan_tensor_file(path)
    assert _peak_bytes(lambda: scan_tensor_file(path)) < 256 << 10
    assert _peak_bytes(lambda: read_tensor_file(path)) < 256 << 10


@pytest.mark.parametrize("shape", [(1 << 40,), (1 << 20, 1 << 20, 1 << 20), (0, HUGE), (0,) + (1,) * 40])
def test_a_shape_bigger_than_its_data_is_refused_before_allocating(tmp_path, shape):
    """The array's shape claims far more than its 12 bytes of data (or more than numpy can shape)."""
    good = bytearray(pickle.dumps(np.zeros(3, np.float32), protocol=4))
    at = good.index(b"K\x03\x85")  # the shape (3,): BININT1 3, TUPLE1
    shape_ops = b"(" + b"".join(b"\x8a\x08" + struct.pack("<q", d) if d > 255 else b"K" + bytes([d])
                                for d in shape) + b"t"
    path = tmp_path / "tensor00000_000"
    path.write_bytes(bytes(good[:at]) + shape_ops + bytes(good[at + 3:]))
    with pytest.raises(CheckpointError, match="bytes of data for float32|implausibly large|dimensions"):
        read_tensor_file(path)
    assert _peak_bytes(lambda: read_tensor_file(path)) < 256 << 10


def test_deeply_nested_structures_give_a_clear_error(tmp_path):
    """Tuples nested 60000 deep: a plain repr() in the error message would raise RecursionError."""
    good = pickle.dumps(np.zeros(3, np.float32), protocol=4)
    at = good.index(b"K\x03\x85")
    path = tmp_path / "tensor00000_000"
    path.write_bytes(good[:at] + b"K\x03" + b"\x85" * 60_000 + good[at + 3:])
    with pytest.raises(CheckpointError, match="is not a tuple of non-negative ints"):
        scan_tensor_file(path)
    path.write_bytes(b"\x80\x04N" + b"\x85" * 60_000 + b".")
    with pytest.raises(CheckpointError, match="expected a numpy array"):
        scan_tensor_file(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_or_device_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "tensor00000_000"
    os.mkfifo(fifo)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="not a regular file"):
        scan_tensor_file(fifo)
    assert time.perf_counter() - start < 1
    if os.path.exists("/dev/zero"):
        link = tmp_path / "tensor00001_000"
        link.symlink_to("/dev/zero")
        with pytest.raises(CheckpointError, match="not a regular file"):
            scan_tensor_file(link)


# ---- fuzzing -------------------------------------------------------------------------------------------------

def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((2, 3)).astype(np.float32), np.asfortranarray(rng.standard_normal((3, 2))),
              rng.standard_normal(4).astype(ml_dtypes.bfloat16), np.arange(5, dtype=np.int8), np.zeros((0, 2), np.int16)]
    seeds = [pickle.dumps(a, protocol=p) for a in arrays for p in (3, 4, 5)]
    for array in arrays[:2]:
        buffer = io.BytesIO()
        write_array_pickle(buffer, array)
        seeds.append(buffer.getvalue())
    buffer = io.BytesIO()
    write_quantized_pickle(buffer, **_small_quantized())
    seeds.append(buffer.getvalue())
    seeds.append(_pickle_as("__main__", "QuantizedWeight8bit", **_small_quantized()))
    seeds.append((GOLDEN_DIR / "ckpt-0" / "tensor00001_000").read_bytes())
    return seeds


SEEDS = _seeds()
INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1]


@st.composite
def mutated_pickles(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["flip", "byte", "insert", "delete", "truncate", "duplicate", "integer"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "duplicate":
            size = draw(st.integers(1, 32))
            data[at:at] = data[at:at + size]
        else:
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(INTERESTING)) % (1 << (8 * width))
            data[at:at + width] = value.to_bytes(width, "little")
    return bytes(data)


_TOKENS = [
    b"(", b")", b"t", b"\x85", b"\x86", b"\x87", b"}", b"s", b"u", b"]", b"a", b"e", b"N", b"\x88", b"\x89",
    b"R", b"\x81", b"b", b"\x94", b"h\x00", b"h\x01", b"q\x05", b"j\x00\x00\x00\x00", b".", b"\x93",
    b"K\x00", b"K\x03", b"M\x00\x01", b"J\xff\xff\xff\xff", b"\x8a\x01\xff", b"\x8a\x08" + b"\xff" * 7 + b"\x7f",
    b"C\x04abcd", b"C\x0c" + bytes(12), b"B\x02\x00\x00\x00ab", b"\x8e\x01" + bytes(7) + b"z",
    _str("<"), _str("|"), _str("f4"), _str("i1"), _str("O8"), _str("b"), _str("C"), _str("F"), _str("weight"),
    _str("scales"), _str("numpy"), _str("dtype"), _str("ndarray"),
    _global("numpy.core.multiarray", "_reconstruct"), _global("numpy._core.numeric", "_frombuffer"),
    _global("numpy", "ndarray"), _global("numpy", "dtype"), _global("ml_dtypes", "bfloat16"),
    _global("__main__", "QuantizedWeight8bit"), _global("os", "system"),
]


@st.composite
def opcode_soups(draw) -> bytes:
    tokens = draw(st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=60))
    return b"\x80" + bytes([draw(st.sampled_from([2, 3, 4, 5]))]) + b"".join(tokens)


class _Hang(Exception):
    pass


def _within(seconds: float):
    """Raise _Hang after `seconds` (SIGALRM, main thread only; elsewhere the elapsed-time check remains)."""
    import contextlib
    import threading

    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def guard():
        def on_alarm(signum, frame):
            raise _Hang(f"the reader ran for more than {seconds} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return guard()


def _check_reader_on(tmp_path: Path, data: bytes) -> None:
    """Property: scan + read of `data` returns a value or raises CheckpointError, fast and in bounded memory."""
    path = tmp_path / "tensor00000_000"
    path.write_bytes(data)
    start = time.perf_counter()
    tracemalloc.start()
    try:
        with _within(5.0):
            try:
                info = scan_tensor_file(path)
                value = read_tensor_file(path, info)
                arrays = [value.weight, value.scales] if isinstance(value, QuantizedWeight8bit) else [value]
                assert sum(a.nbytes for a in arrays) <= len(data)
                assert [tuple(a.shape) for a in arrays] == [info.array.shape] + ([info.scales.shape] if info.scales else [])
            except CheckpointError as err:
                assert str(err).startswith(f"{path}: ")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0, "the reader took too long"
    assert peak < 4 * len(data) + (2 << 20), f"the reader allocated {peak} bytes for a {len(data)}-byte file"


FUZZ = settings(max_examples=int(os.environ.get("GROK_TORCH_FUZZ_EXAMPLES", 200)), deadline=None, derandomize=True,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=mutated_pickles())
def test_fuzz_mutated_valid_pickles(tmp_path, data):
    _check_reader_on(tmp_path, data)


@FUZZ
@given(data=opcode_soups())
def test_fuzz_opcode_soups(tmp_path, data):
    _check_reader_on(tmp_path, data)


def test_the_fuzz_seeds_are_valid_and_agree_with_pickle(tmp_path):
    """The seeds the fuzzer mutates are accepted as they are (else it would only ever explore errors)."""
    for number, seed in enumerate(SEEDS):
        path = tmp_path / f"seed{number}"
        path.write_bytes(seed)
        value = read_tensor_file(path)
        assert isinstance(value, (np.ndarray, QuantizedWeight8bit))
        if isinstance(value, np.ndarray):
            reference = pickle.loads(seed)
            assert value.dtype == reference.dtype and value.shape == reference.shape
            assert value.tobytes() == reference.tobytes() or math.prod(value.shape) == 0
