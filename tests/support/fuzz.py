"""Mutations of a converted directory for the reader's fuzz test, and an oracle of what the files claim.

Each mutation changes one file of a copy of a converted directory: a shard's header bytes (bits flipped,
bytes set, inserted or deleted, the length field changed, the file cut short), a shard's header JSON
(offsets, shapes, dtypes, names, metadata, entries removed, duplicated or added), the index JSON, or
config.json (every field's type and value; then, half the time, the sha256 recorded for it in the index is
updated too, as a consistent editor would, so that the field checks and not only the checksum are tried).

The oracle reads what a directory claims without the reader under test: the index's weight_map (plain
json) and, per shard, the header's offsets (plain json, duplicates noted), so that the bytes a tensor must
hold are the bytes at the offsets its header states.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from pathlib import Path
from typing import Any, Callable

from grok_torch.converted_dir import CONFIG_FILE, INDEX_FILE

DTYPE_CODES = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
               "F8_E4M3", "F8_E5M2", "X", "", 5, None]
JSON_CHARS = b'{}[]",:0123456789-+eE. \\ntfalsenu'
ODD_VALUES: list[Any] = [0, -1, 1, 2, 3, 7, 10**9, 10**30, -(10**12), 0.5, 1.5, float("nan"), float("inf"), "64",
                         "", True, False, None, [], [64], {}, {"a": 1}]


def split_shard(raw: bytes) -> tuple[int, bytes, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return length, raw[8:8 + length], raw[8 + length:]


def join_shard(header_text: bytes, data: bytes, pad: bool = True) -> bytes:
    if pad:
        header_text += b" " * (-len(header_text) % 8)
    return struct.pack("<Q", len(header_text)) + header_text + data


# ---- mutations: each takes (rng, directory) and changes one file, returning a description --------------------

def _shard(rng: random.Random, directory: Path) -> Path:
    return rng.choice(sorted(directory.glob("model-*.safetensors")))


def _replace(path: Path, data: bytes) -> None:
    """Write a new file at `path` (the copy's files are hard links to the original: never write through them)."""
    path.unlink()
    path.write_bytes(data)


def header_bytes(rng: random.Random, directory: Path) -> str:
    path = _shard(rng, directory)
    raw = bytearray(path.read_bytes())
    length, _, _ = split_shard(bytes(raw))
    end = 8 + length
    kind = rng.choice(["flip", "flip", "set", "set", "insert", "delete", "length", "truncate"])
    if kind == "flip":
        for _ in range(rng.randint(1, 3)):
            position = rng.randrange(end)
            raw[position] ^= 1 << rng.randrange(8)
    elif kind == "set":
        position = rng.randrange(8, end)
        raw[position] = rng.choice(JSON_CHARS) if rng.random() < 0.7 else rng.randrange(256)
    elif kind == "insert":
        raw.insert(rng.randrange(8, end), rng.choice(JSON_CHARS))
    elif kind == "delete":
        del raw[rng.randrange(8, end)]
    elif kind == "length":
        value = rng.choice([length + rng.randint(-16, 16), 0, rng.randrange(1 << 64), len(raw), len(raw) - 7])
        raw[:8] = struct.pack("<Q", max(0, min(value, (1 << 64) - 1)))
    else:
        del raw[rng.randrange(end):]
    _replace(path, bytes(raw))
    return f"header bytes ({kind}) of {path.name}"


def header_json(rng: random.Random, directory: Path) -> str:
    path = _shard(rng, directory)
    _, text, data = split_shard(path.read_bytes())
    header = json.loads(text)
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.choice(["offsets", "offsets", "swap", "swap_same", "shape", "shape", "dtype", "dtype", "remove",
                       "duplicate", "field", "rename", "metadata", "add", "type", "pad"])
    raw_text = None
    if kind == "offsets":
        which = rng.randrange(2)
        entry["data_offsets"][which] = rng.choice([entry["data_offsets"][which] + rng.randint(-9, 9), -8, 0,
                                                   len(data), len(data) + 1, 1 << 63, "0", None])
    elif kind == "swap":
        other = header[rng.choice(names)]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif kind == "swap_same":  # two tensors of one dtype and shape trade places: a valid file, other claims
        same = [n for n in names if n != name and (header[n]["dtype"], header[n]["shape"]) == (entry["dtype"], entry["shape"])]
        if same:
            other = header[rng.choice(same)]
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif kind == "shape":
        shape = entry["shape"]
        choice = rng.randrange(6)
        if choice == 0:
            entry["shape"] = shape[::-1]
        elif choice == 1:
            i = rng.randrange(len(shape))
            shape[i] = max(0, shape[i] + rng.choice([-1, 1]))
        elif choice == 2:
            entry["shape"] = shape[:-1] if len(shape) > 1 else []
        elif choice == 3:
            entry["shape"] = [1] + shape
        elif choice == 4:
            entry["shape"] = rng.choice(ODD_VALUES)
        else:  # the same element count in another shape
            total = 1
            for dim in shape:
                total *= dim
            entry["shape"] = [total]
    elif kind == "dtype":
        entry["dtype"] = rng.choice(DTYPE_CODES)
    elif kind == "remove":
        del header[name]
    elif kind == "duplicate":
        clone = dict(entry)
        if rng.random() < 0.5:
            clone["data_offsets"] = header[rng.choice(names)]["data_offsets"]
        body = json.dumps(header)
        pair = json.dumps(name) + ": " + json.dumps(clone)
        raw_text = ("{" + pair + ", " + body[1:] if rng.random() < 0.5 else body[:-1] + ", " + pair + "}").encode()
    elif kind == "field":
        entry[rng.choice(["note", "offsets", "dtype2"])] = rng.choice(ODD_VALUES)
    elif kind == "rename":
        header[rng.choice([rng.choice(names), name + "x", "layers.99.attn.q_proj.weight", "", "__metadata__",
                           name + "\nerror: injected", "\u202e" + name])] = header.pop(name)
    elif kind == "metadata":
        meta = header.get("__metadata__", {})
        choice = rng.randrange(4)
        if choice == 0:
            header.pop("__metadata__", None)
        elif choice == 1:
            meta["weight_format"] = rng.choice(["bf16", "fp32", "int8", "int4", ""])
        elif choice == 2:
            meta[rng.choice(["format", "source", "x"])] = rng.choice(ODD_VALUES)
        else:
            header["__metadata__"] = rng.choice(ODD_VALUES)
    elif kind == "add":
        header[rng.choice(["extra", names[0] + ".copy"])] = dict(entry)
    elif kind == "type":
        raw_text = json.dumps(rng.choice(ODD_VALUES)).encode()
    else:
        raw_text = (json.dumps(header) + " " * rng.randint(1, 9)).encode()  # unpadded, or padded otherwise
        _replace(path, join_shard(raw_text, data, pad=False))
        return f"header JSON ({kind}) of {path.name}"
    text = raw_text if raw_text is not None else json.dumps(header).encode()
    _replace(path, join_shard(text, data))
    return f"header JSON ({kind}) of {path.name}"


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def index_json(rng: random.Random, directory: Path) -> str:
    path = directory / INDEX_FILE
    index = json.loads(path.read_text())
    weight_map, metadata = index["weight_map"], index["metadata"]
    names = sorted(weight_map)
    shards = sorted(set(weight_map.values()))
    name = rng.choice(names)
    kind = rng.choice(["remap", "remap", "delete", "add", "rename", "value", "total_size", "weight_format",
                       "sha256", "structure", "text", "reorder"])
    text = None
    if kind == "remap":
        weight_map[name] = rng.choice(shards)
    elif kind == "delete":
        del weight_map[name]
    elif kind == "add":
        weight_map[rng.choice(["extra.weight", name + "x"])] = rng.choice(shards)
    elif kind == "rename":
        weight_map[rng.choice([rng.choice(names), name + ".x", name + "\nerror: injected"])] = weight_map.pop(name)
    elif kind == "value":
        weight_map[name] = rng.choice(["../" + shards[0], "/etc/passwd", shards[0].replace("00001", "00009"),
                                       "model-00001-of-00001.safetensors", "", 3, None, [shards[0]]])
    elif kind == "total_size":
        metadata["total_size"] = rng.choice(ODD_VALUES + [metadata["total_size"] + rng.choice([-1, 1])])
    elif kind == "weight_format":
        metadata["weight_format"] = rng.choice(["int8", "bf16", "fp32", "int4", None, 8])
    elif kind == "sha256":
        sums = metadata.get("sha256", {})
        choice = rng.randrange(4)
        if choice == 0:
            metadata.pop("sha256", None)
        elif choice == 1 and sums:
            key = rng.choice(sorted(sums))
            sums[key] = rng.choice(["0" * 64, sums[key].upper(), sums[key][:-1], 5])
        elif choice == 2:
            sums["extra.safetensors"] = "0" * 64
        elif sums:
            del sums[rng.choice(sorted(sums))]
    elif kind == "structure":
        choice = rng.randrange(5)
        if choice == 0:
            del index["weight_map"]
        elif choice == 1:
            index["weight_map"] = list(weight_map.items())
        elif choice == 2:
            index["metadata"] = rng.choice(ODD_VALUES)
        elif choice == 3:
            text = json.dumps([index])
        else:
            index["weight_map"] = {}
    elif kind == "text":
        body = json.dumps(index)
        choice = rng.randrange(4)
        if choice == 0:
            text = body[: rng.randrange(len(body))]
        elif choice == 1:
            text = body.replace('"weight_map": {', '"weight_map": {' + json.dumps(name) + ': "' + shards[-1] + '", ', 1)
        elif choice == 2:
            text = _nested(rng.choice([100, 5000, 200_000]))
        else:
            text = "\ufeff" + body
    else:
        index["weight_map"] = dict(sorted(weight_map.items(), reverse=True))  # the same content, another order
    path.unlink()
    path.write_text(text if text is not None else json.dumps(index, indent=rng.choice([None, 2])))
    return f"index JSON ({kind})"


def config_json(rng: random.Random, directory: Path) -> str:
    path = directory / CONFIG_FILE
    values = json.loads(path.read_text())
    kind = rng.choice(["grok_config", "grok_config", "grok_config", "delete_field", "top", "quantized", "text",
                       "reformat"])
    text = None
    if kind == "grok_config":
        field = rng.choice(sorted(values["grok_config"]))
        current = values["grok_config"][field]
        values["grok_config"][field] = rng.choice(ODD_VALUES + [current, current * 2 if not isinstance(current, str) else current,
                                                                float(current) if isinstance(current, int) else current])
    elif kind == "delete_field":
        del values["grok_config"][rng.choice(sorted(values["grok_config"]))]
    elif kind == "top":
        field = rng.choice(["format", "format_version", "weight_format", "grok_torch_version", "source", "grok_config",
                            "quantized", "tokenizer"])
        if rng.random() < 0.3:
            values.pop(field, None)
        else:
            values[field] = rng.choice(ODD_VALUES + ["int8", "bf16", "fp32", "grok-torch-converted"])
    elif kind == "quantized":
        quantized = values["quantized"]
        name = rng.choice(sorted(quantized))
        choice = rng.randrange(4)
        if choice == 0:
            quantized[name] = not quantized[name]
        elif choice == 1:
            del quantized[name]
        elif choice == 2:
            quantized["layers.0.extra.weight"] = True
        else:
            quantized[name] = rng.choice(ODD_VALUES)
    elif kind == "text":
        body = json.dumps(values)
        choice = rng.randrange(4)
        if choice == 0:
            text = body[: rng.randrange(len(body))]
        elif choice == 1:
            text = body[:-1] + ', "weight_format": "bf16"}'
        elif choice == 2:
            text = _nested(rng.choice([100, 5000, 200_000]))
        else:
            path.unlink()
            path.write_bytes(body.encode()[:10] + b"\xff\xfe" + body.encode()[10:])
            return "config.json (text: invalid UTF-8)"
    else:  # the same values, written another way
        text = json.dumps(values, indent=rng.choice([None, 1, 4]), sort_keys=rng.random() < 0.5)
    path.unlink()
    path.write_text(text if text is not None else json.dumps(values, indent=2))
    index_path = directory / INDEX_FILE
    index = json.loads(index_path.read_text())
    if rng.random() < 0.5 and "sha256" in index["metadata"]:  # a consistent editor: record the new sha256 too
        index["metadata"]["sha256"][CONFIG_FILE] = hashlib.sha256(path.read_bytes()).hexdigest()
        index_path.unlink()
        index_path.write_text(json.dumps(index, indent=2))
        return f"config.json ({kind}), sha256 updated"
    return f"config.json ({kind})"


MUTATIONS: dict[str, Callable[[random.Random, Path], str]] = {
    "header bytes": header_bytes, "header JSON": header_json, "index JSON": index_json, "config.json": config_json}


# ---- the oracle ----------------------------------------------------------------------------------------------

def claimed_bytes(directory: Path, name: str) -> bytes | None:
    """The bytes that `directory`'s files say tensor `name` holds (index -> shard -> header offsets), read
    with plain json and slicing; None if they do not say it unambiguously."""
    try:
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        raw = (directory / weight_map[name]).read_bytes()
        length, text, data = split_shard(raw)
        seen: list[str] = []

        def pairs(items):
            seen.extend(key for key, _ in items)
            return dict(items)

        header = json.loads(text, object_pairs_hook=pairs)
        if seen.count(name) != 1:
            return None
        begin, end = header[name]["data_offsets"]
        return data[begin:end]
    except Exception:  # noqa: BLE001 - whatever the files are, the oracle only says "no claim"
        return None
