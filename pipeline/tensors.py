"""Load a step's tensors with one clear error line for a missing, truncated or wrong-shape file."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.errors import StagepipeError


def load_tensor(path: Path, shape=None, dtype=None, what: str = "tensor") -> np.ndarray:
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise StagepipeError(f"{path}: {what} not found; run the stage that writes it first") from None
    except (ValueError, OSError, EOFError) as e:
        raise StagepipeError(f"{path}: {what} is not a readable .npy ({e}); rerun the stage that wrote it") from None
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise StagepipeError(f"{path}: {what} has shape {list(arr.shape)}, expected {list(shape)}")
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise StagepipeError(f"{path}: {what} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    return arr


def digest(*parts) -> str:
    """md5 over files (by content) and plain values: what a stage's result depends on."""
    h = hashlib.md5()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes() if part.exists() else b"<missing>")
        else:
            h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


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
