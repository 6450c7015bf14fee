"""The run's persistent KV cache: one fixed-shape (Lk,1,KV,C,D) .npy per block for keys and for values.

Files are memory-mapped: a step reads them in place and writes only its own slots [past_len, past_len+q_len),
so a decode step never loads or rewrites whole files. cache.json binds the files to the graphs that filled
them; a cache from other graphs is refused, never silently replaced. Files are sparse; the blocks behind the
slots a step writes are allocated before it writes them (reserve_slots: a full disk is one error line naming the
file, never a SIGBUS mid-step; allocating every block up front slowed steps ~10% on an ext4 VM disk), a
file of another size than
its header says is refused (never resized), and a symbolic link in place of a file is refused (writes never
leave the folder). Each block stage records a digest of the slots it wrote (slots_digest), so a damaged cache
is found before it is trusted.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_open, fsync_path, write_text
from pipeline.core.errors import StagepipeError, with_filename
from pipeline.core.jsonfile import load_model_file
from pipeline.core.layout import CACHE_JSON, KV_KINDS, kv_file
from pipeline.core.tensors import file_digest, npy_header
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
        """Check (or create) the cache. reset=True throws away a cache made for other graphs.

        Without a readable cache.json (a new cache, or the record lost) files that are missing or unusable are
        created zeroed; files that open with the right shape and dtype are kept: the steps' slot digests tell
        whether they still hold the run (pipeline.run.verify)."""
        record_path = self.dir / CACHE_JSON
        if reset and self.dir.exists():
            shutil.rmtree(self.dir)
        try:
            found = load_model_file(record_path, CacheRecord)
        except StagepipeError:  # missing or unreadable: written anew below, the files kept if they fit
            found = None
        if found is not None:
            if found != self.record:
                what = ("other graphs (onnx fingerprint differs)" if found.onnx_fingerprint != self.record.onnx_fingerprint
                        else f"another shape/dtype (C={found.max_cache_len}, {found.kv_dtype})")
                raise StagepipeError(f"{self.dir}: this KV cache was filled by {what}; use --reset_kv to start a new "
                                     "cache (the run's steps are then recomputed) or another run folder")
            for k in range(len(self.manifest.blocks)):
                for kind in KV_KINDS:
                    if not os.path.lexists(self.path(kind, k)):  # lost: a zeroed file, the steps recomputed
                        create_cache_file(self.path(kind, k), block_shape(self.manifest, k), self.manifest.kv_dtype)
                    self._map(kind, k)
        elif create:
            self.dir.mkdir(parents=True, exist_ok=True)
            for k in range(len(self.manifest.blocks)):
                for kind in KV_KINDS:
                    path, shape = self.path(kind, k), block_shape(self.manifest, k)
                    try:
                        self._maps[kind, k] = open_cache_file(path, shape, self.manifest.kv_dtype)
                    except StagepipeError:
                        if os.path.islink(path):
                            raise
                        create_cache_file(path, shape, self.manifest.kv_dtype)
            write_text(record_path, self.record.model_dump_json(indent=2) + "\n")
        else:
            raise StagepipeError(f"{self.dir}: no KV cache here (cache.json missing); run step 0 first or pass the "
                                 "run's kv_cache folder")
        return self

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

    def sync(self):
        """Make the cache durable: the mapped pages written back (msync), the files and the folder fsynced."""
        for (kind, k), arr in self._maps.items():
            arr.flush()
            fsync_path(self.path(kind, k))
        fsync_path(self.dir)


def create_cache_file(path: Path, shape, dtype):
    """A zeroed cache file. Sparse: the blocks behind the slots a step writes are allocated before it writes
    them (reserve_slots), not the whole file up front."""
    header = npy_header(shape, dtype)
    with atomic_open(path) as f:
        f.write(header)
        f.truncate(len(header) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)


def open_cache_file(path: Path, shape, dtype, follow_symlinks: bool = False) -> np.memmap:
    """Memory-map one cache file for reading and writing, checking its shape, dtype and size (a truncated or
    extended file is refused, never resized). follow_symlinks=False refuses a link in place of the file."""
    path = Path(path)
    fix = "delete it (the steps that filled it are then recomputed) or use --reset_kv"
    nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
    try:  # through open() so the map knows its file's name
        f = open(path, "r+b", opener=lambda name, flags: os.open(name, flags | nofollow))
    except FileNotFoundError:
        raise StagepipeError(f"{path}: KV cache file missing; use --reset_kv to start a new cache") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StagepipeError(f"{path}: is a symbolic link; KV cache files must be regular files in the cache "
                                 "folder: remove the link") from None
        raise with_filename(e, path) from None
    with f:
        fd = f.fileno()
        try:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            found_shape, fortran, found_dtype = read_header(f)
        except (ValueError, OSError, EOFError) as e:
            raise StagepipeError(f"{path}: KV cache file is not a readable .npy ({e}); {fix}") from None
        if tuple(found_shape) != tuple(shape) or found_dtype != np.dtype(dtype) or fortran:
            raise StagepipeError(f"{path}: KV cache file has shape {list(found_shape)} {found_dtype}, the graphs need "
                                 f"{list(shape)} {np.dtype(dtype)}; use --reset_kv or the matching onnx_dir")
        offset = f.tell()
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        st = os.fstat(fd)
        if st.st_size != offset + nbytes:
            raise StagepipeError(f"{path}: KV cache file has {st.st_size} bytes, its header says {offset + nbytes} "
                                 f"(truncated or damaged); {fix}")
        return np.memmap(f, dtype=np.dtype(dtype), mode="r+", offset=offset, shape=tuple(shape))


def store_slots(cache: np.ndarray, past_len: int, q_len: int, present: np.ndarray):
    C = cache.shape[3]
    if past_len + q_len > C:
        raise StagepipeError(f"writing slots {past_len}..{past_len + q_len - 1} would pass the {C}-slot KV cache")
    reserve_slots(cache, past_len + q_len)
    cache[:, :, :, past_len:past_len + q_len] = present[:, :, :, :q_len]


RESERVE_AHEAD = 128  # slots: a decode step allocates nothing, one in RESERVE_AHEAD allocates for those that follow
_reserved: dict[tuple[int, int], int] = {}  # (device, inode) of a cache file -> slots [0, n) allocated


def reserve_slots(cache: np.ndarray, stop: int):
    """Allocate the file blocks behind slots [0, stop) (and RESERVE_AHEAD more) of every layer and head of a
    memory-mapped cache file before a step writes into them: on a full disk a write into a hole of the sparse
    file is a SIGBUS; here it is an error naming the file. Allocating keeps the content (zeros) and the mtime."""
    path = getattr(cache, "filename", None)
    if path is None:
        return  # an array in memory
    st = os.stat(path)
    if _reserved.get((st.st_dev, st.st_ino), 0) >= stop:
        return
    Lk, _, KV, C, D = cache.shape
    slot = D * cache.dtype.itemsize
    upto = min(C, stop + RESERVE_AHEAD)
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        for row in range(Lk * KV):
            os.posix_fallocate(fd, cache.offset + row * C * slot, upto * slot)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    except OSError as e:
        raise with_filename(e, path) from None
    finally:
        os.close(fd)
    _reserved[st.st_dev, st.st_ino] = upto


def slots_digest(past_key: np.ndarray, past_value: np.ndarray, past_len: int, q_len: int) -> str:
    """Digest of the K and V cache slots [past_len, past_len + q_len): what a block stage wrote."""
    window = slice(past_len, past_len + q_len)
    return file_digest(np.ascontiguousarray(past_key[:, :, :, window]),
                       np.ascontiguousarray(past_value[:, :, :, window]))
