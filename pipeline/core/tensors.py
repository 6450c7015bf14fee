"""Load a step's tensors with one clear error line for a missing, truncated or wrong-shape file."""
from __future__ import annotations

import functools
import hashlib
import io
import re
from pathlib import Path

import numpy as np

from pipeline.core.errors import StagepipeError


# the header np.save writes for a C-order array of a plain dtype, e.g. {'descr': '<f4', 'fortran_order': False,
# 'shape': (1, 1, 1024), } padded with spaces and a newline
_PLAIN_HEADER = re.compile(rb"\{'descr': '([<>|][a-z]\d+)', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \} *\n")


def read_file(path: Path, what: str = "tensor") -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise StagepipeError(f"{path}: {what} not found; run the stage that writes it first") from None
    except OSError as e:
        raise StagepipeError(f"{path}: cannot read {what} ({e})") from None


def parse_npy(raw: bytes) -> np.ndarray:
    """The array in an .npy file's bytes (read-only). np.load spends ~95 us a file parsing the header; headers
    as np.save writes them for plain C-order arrays are matched here directly, anything else goes to np.load."""
    if raw[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(raw[8:10], "little")
        header = _PLAIN_HEADER.fullmatch(raw, 10, end)
        if header:
            dtype = np.dtype(header.group(1).decode())
            shape = tuple(int(n) for n in header.group(2).split(b",") if n.strip())
            count = int(np.prod(shape, dtype=np.int64))
            if len(raw) != end + count * dtype.itemsize:
                raise ValueError(f"{len(raw) - end} data bytes for shape {shape}")
            return np.frombuffer(raw, dtype, count, end).reshape(shape)
    return np.load(io.BytesIO(raw), allow_pickle=False)


def parse_tensor(raw: bytes, path: Path, shape=None, dtype=None, what: str = "tensor") -> np.ndarray:
    """The array in `raw` (the bytes of file `path`), checked against the expected shape and dtype."""
    try:
        arr = parse_npy(raw)
    except (ValueError, OSError, EOFError) as e:
        raise StagepipeError(f"{path}: {what} is not a readable .npy ({e}); rerun the stage that wrote it") from None
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise StagepipeError(f"{path}: {what} has shape {list(arr.shape)}, expected {list(shape)}")
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise StagepipeError(f"{path}: {what} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    return arr


def load_tensor(path: Path, shape=None, dtype=None, what: str = "tensor") -> np.ndarray:
    return parse_tensor(read_file(path, what), path, shape, dtype, what)


def digest(*parts) -> str:
    """md5 over files (by content), file contents already read (bytes) and plain values: what a stage's
    result depends on. A file and its bytes digest alike."""
    h = hashlib.md5()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes() if part.exists() else b"<missing>")
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def file_digest(*chunks) -> str:
    """Digest of a file's bytes (given in chunks): what a stage records for each file it writes, checked before
    its work is trusted again. sha1, not md5: 3x faster here (600 KB of logits: 0.5 ms), and a digest
    against damage, not against an adversary."""
    h = hashlib.sha1()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file's content, read 16 MiB at a time (graphs and weights files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def npy_header(shape, dtype) -> bytes:
    """The header np.save writes before the data of a C-order array of this shape and dtype (made once per
    shape and dtype: a decode step writes the same few shapes every time)."""
    return _npy_header(tuple(int(n) for n in shape), np.dtype(dtype).str)


@functools.lru_cache(maxsize=256)
def _npy_header(shape: tuple, dtype: str) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def parse_token_ids(path: Path) -> list[int]:
    """Token ids from a .npy file or a text file of integers separated by spaces, commas or newlines."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            ids = np.load(path, allow_pickle=False).reshape(-1).tolist()
        else:
            ids = [int(x) for x in path.read_text().replace(",", " ").split()]
    except FileNotFoundError:
        raise StagepipeError(f"{path}: token id file not found") from None
    except (ValueError, OSError) as e:
        raise StagepipeError(f"{path}: expected integer token ids ({e})") from None
    if not ids:
        raise StagepipeError(f"{path}: holds no token ids")
    return [int(i) for i in ids]
