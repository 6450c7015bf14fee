"""Read (memory-mapped) and write safetensors files with numpy alone: no torch, bfloat16 included.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw data.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_write_path
from pipeline.core.errors import StagepipeError

# safetensors dtype name -> numpy dtype used to view the raw bytes (BF16 is viewed as uint16 and widened).
_RAW_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
               "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
# Qwen2.5-VL checkpoints saved by some transformers versions nest the language model and the vision tower one
# level down; the converter reads every tensor by its usual name (model.layers.0..., visual.blocks.0...)
NAME_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (0x7FFF + ((u >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def read_header(path: Path) -> tuple[dict, int]:
    """Return (header dict without __metadata__, byte offset where tensor data starts)."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise StagepipeError(f"{path}: not a safetensors file (shorter than 8 bytes); re-download or re-save it")
            (n,) = struct.unpack("<Q", raw_len)
            if n > os.path.getsize(path):
                raise StagepipeError(f"{path}: not a safetensors file (bad header length); re-download or re-save it")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StagepipeError(f"{path}: cannot read safetensors header ({e}); re-download or re-save it") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class CheckpointWeights:
    """All tensors of a HF checkpoint folder (one model.safetensors or shards + index), memory-mapped on demand."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise StagepipeError(f"{index}: invalid shard index ({e}); re-download the checkpoint") from None
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = ["model.safetensors"]
        else:
            raise StagepipeError(f"{self.model_dir}: no model.safetensors or model.safetensors.index.json; "
                                 "point --model_path at a HuggingFace checkpoint folder")
        self.files = [self.model_dir / f for f in files]
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        for path in self.files:
            if not path.exists():
                raise StagepipeError(f"{path}: shard named in the index is missing; re-download the checkpoint")
            header, data_start = read_header(path)
            size = path.stat().st_size
            for name, info in header.items():
                try:
                    begin, end = (int(v) for v in info["data_offsets"])
                    ok = 0 <= begin <= end and data_start + end <= size
                except (KeyError, TypeError, ValueError):
                    ok = False
                if not ok:  # a truncated file would otherwise fail later, deep inside np.memmap
                    raise StagepipeError(f"{path}: tensor '{name}' lies outside the file ({size} bytes); "
                                         "the file is truncated or corrupt; re-download it")
                self._entries[name] = (path, info, data_start)
        for stored, usual in NAME_ALIASES:
            for name in [n for n in self._entries if n.startswith(stored)]:
                self._entries.setdefault(usual + name[len(stored):], self._entries[name])

    def names(self) -> list[str]:
        return list(self._entries)

    def has(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> str:
        return self._entries[name][1]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return tuple(self._entries[name][1]["shape"])

    def _require(self, name: str):
        if name not in self._entries:
            raise StagepipeError(f"{self.model_dir}: tensor '{name}' is missing from the checkpoint; "
                                 "is it a complete Qwen2/Qwen3 causal-LM checkpoint?")

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (bf16 as uint16 bits), memory-mapped read-only."""
        self._require(name)
        path, info, data_start = self._entries[name]
        if info["dtype"] not in _RAW_DTYPES:
            raise StagepipeError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        dt = np.dtype(_RAW_DTYPES[info["dtype"]])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise StagepipeError(f"{path}: tensor '{name}' has a size that does not match its shape; file is corrupt")
        return np.memmap(path, dtype=dt, mode="r", offset=data_start + begin, shape=shape)

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """The tensor converted to `dtype` (a fresh in-memory array)."""
        arr = self.raw(name)
        if self.dtype(name) == "BF16":
            arr = bf16_bits_to_f32(arr)
        return np.asarray(arr, dtype=dtype)


def save_safetensors(path: Path, tensors: dict[str, np.ndarray], bf16: bool = False, metadata: dict | None = None):
    """Write tensors to a safetensors file atomically. With bf16=True float arrays are stored as BF16."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    blobs = []
    offset = 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if bf16 and arr.dtype.kind == "f":
            data, dtype_name = f32_to_bf16_bits(arr), "BF16"
        else:
            dtype_name = {np.dtype(v): k for k, v in _RAW_DTYPES.items() if k != "BF16"}[arr.dtype]
            data = arr
        nbytes = data.nbytes
        header[name] = {"dtype": dtype_name, "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        blobs.append(data)
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with atomic_write_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for data in blobs:
                f.write(data.tobytes())
