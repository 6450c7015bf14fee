"""The run's persistent KV cache: one fixed-shape (Lk,1,KV,C,D) .npy per block for keys and for values.

Files are memory-mapped: a step reads them in place and writes only its own slots [past_len, past_len+q_len),
so a decode step never loads or rewrites whole files. cache.json binds the files to the graphs that filled
them; a cache from other graphs is refused, never silently replaced.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_write_path, write_text
from pipeline.core.errors import StagepipeError
from pipeline.core.layout import CACHE_JSON, KV_KINDS, kv_file
from pipeline.core.jsonfile import load_model_file
from schemas.manifest import Manifest
from schemas.run import CacheRecord


def block_shape(manifest: Manifest, k: int) -> tuple[int, ...]:
    m, b = manifest.model, manifest.blocks[k]
    return (b.num_layers, 1, m.num_key_value_heads, manifest.max_cache_len, m.head_dim)


class KVCacheDir:
    def __init__(self, kv_dir: Path, manifest: Manifest):
        self.dir = Path(kv_dir)
        self.manifest = manifest
        self.record = CacheRecord(onnx_fingerprint=manifest.graphs_fingerprint, max_cache_len=manifest.max_cache_len,
                                  kv_dtype=manifest.kv_dtype,
                                  block_shapes=[list(block_shape(manifest, k)) for k in range(len(manifest.blocks))])
        self._maps: dict[tuple[str, int], np.memmap] = {}

    def path(self, kind: str, k: int) -> Path:
        return self.dir / kv_file(kind, k)

    def open(self, create: bool = False, reset: bool = False) -> "KVCacheDir":
        """Check (or create) the cache. reset=True throws away a cache made for other graphs."""
        record_path = self.dir / CACHE_JSON
        if reset and self.dir.exists():
            shutil.rmtree(self.dir)
        if record_path.exists():
            found = load_model_file(record_path, CacheRecord)
            if found != self.record:
                what = ("other graphs (onnx fingerprint differs)" if found.onnx_fingerprint != self.record.onnx_fingerprint
                        else f"another shape/dtype (C={found.max_cache_len}, {found.kv_dtype})")
                raise StagepipeError(f"{self.dir}: this KV cache was filled by {what}; use --reset_kv to start a new "
                                     "cache (the run's steps are then recomputed) or another run folder")
        elif create:
            self.dir.mkdir(parents=True, exist_ok=True)
            for k in range(len(self.manifest.blocks)):
                for kind in KV_KINDS:
                    self._create_file(self.path(kind, k), block_shape(self.manifest, k))
            write_text(record_path, self.record.model_dump_json(indent=2) + "\n")
        else:
            raise StagepipeError(f"{self.dir}: no KV cache here (cache.json missing); run step 0 first or pass the "
                                 "run's kv_cache folder")
        return self

    def _create_file(self, path: Path, shape):
        with atomic_write_path(path) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(self.manifest.kv_dtype), shape=shape)
            arr.flush()
            del arr

    def _map(self, kind: str, k: int) -> np.memmap:
        key = (kind, k)
        if key not in self._maps:
            path = self.path(kind, k)
            self._maps[key] = open_cache_file(path, block_shape(self.manifest, k), self.manifest.kv_dtype)
        return self._maps[key]

    def past(self, k: int):
        return self._map("key", k), self._map("value", k)

    def flush(self):
        for arr in self._maps.values():
            arr.flush()


def open_cache_file(path: Path, shape, dtype) -> np.memmap:
    """Memory-map one cache file for reading and writing, checking its shape and dtype."""
    try:
        arr = np.load(path, mmap_mode="r+")
    except FileNotFoundError:
        raise StagepipeError(f"{path}: KV cache file missing; use --reset_kv to start a new cache") from None
    except (ValueError, OSError) as e:
        raise StagepipeError(f"{path}: KV cache file is corrupt ({e}); use --reset_kv to start a new cache") from None
    if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise StagepipeError(f"{path}: KV cache file has shape {list(arr.shape)} {arr.dtype}, the graphs need "
                             f"{list(shape)} {np.dtype(dtype)}; use --reset_kv or the matching onnx_dir")
    return arr


def store_slots(cache: np.ndarray, past_len: int, q_len: int, present: np.ndarray):
    C = cache.shape[3]
    if past_len + q_len > C:
        raise StagepipeError(f"writing slots {past_len}..{past_len + q_len - 1} would pass the {C}-slot KV cache")
    cache[:, :, :, past_len:past_len + q_len] = present[:, :, :, :q_len]
