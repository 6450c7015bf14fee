"""pipeline.tensors: the fast .npy reader agrees with np.load, and a bad file is one clear error."""
from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline.core.errors import StagepipeError
from pipeline.core.tensors import digest, load_tensor, parse_npy

ARRAYS = [np.random.default_rng(0).standard_normal((1, 1, 1024)).astype(np.float32),
          np.arange(16, dtype=np.int64).reshape(1, 16), np.full((1, 1, 4, 12), -65504, np.float16),
          np.float32(3.5), np.zeros((0, 3)), np.asfortranarray(np.arange(12.0).reshape(3, 4)),
          np.array([True, False]), np.arange(6, dtype=">i4")]


def npy_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("a", ARRAYS, ids=lambda a: f"{np.asarray(a).dtype.str}{np.shape(a)}")
def test_parse_npy_matches_np_load(a):
    raw = npy_bytes(a)
    got, want = parse_npy(raw), np.load(io.BytesIO(raw))
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.array_equal(got, want)


def test_truncated_and_padded_files_are_errors(tmp_path):
    raw = npy_bytes(np.zeros((1, 8), np.float32))
    for name, data in (("short.npy", raw[:-4]), ("long.npy", raw + b"\0" * 4), ("text.npy", b"not an npy")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(StagepipeError, match=f"{name}: hidden states is not a readable .npy"):
            load_tensor(tmp_path / name, what="hidden states")
    with pytest.raises(StagepipeError, match="not found; run the stage that writes it first"):
        load_tensor(tmp_path / "missing.npy")


def test_shape_and_dtype_are_checked(tmp_path):
    path = tmp_path / "mask.npy"
    np.save(path, np.zeros((1, 1, 2, 5), np.float32))
    with pytest.raises(StagepipeError, match=r"has shape \[1, 1, 2, 5\], expected \[1, 1, 2, 6\]"):
        load_tensor(path, (1, 1, 2, 6), np.float32)
    with pytest.raises(StagepipeError, match="has dtype float32, expected float16"):
        load_tensor(path, (1, 1, 2, 5), np.float16)


def test_a_file_and_its_bytes_digest_alike(tmp_path):
    path = tmp_path / "h.npy"
    np.save(path, np.ones(3))
    assert digest(path, "x") == digest(path.read_bytes(), "x") != digest(path, "y")
