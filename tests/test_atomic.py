"""Atomic writes (pipeline.atomic): the swap that replaces an existing file, its fallback, and failure cleanup."""
from __future__ import annotations

import ctypes
import errno
import os
import stat

import numpy as np
import pytest

from pipeline.core import atomic


def temp_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_replacing_a_file_swaps_in_a_new_one(tmp_path):
    path = tmp_path / "meta.json"
    atomic.write_text(path, "old\n")
    old_inode = path.stat().st_ino
    atomic.write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert path.stat().st_ino != old_inode  # a new file took its place: a reader holding the old one keeps it
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~atomic._UMASK
    assert temp_files(tmp_path) == []


@pytest.mark.skipif(atomic._renameat2 is None, reason="no renameat2 on this platform")
def test_existing_files_are_replaced_by_a_swap(tmp_path, monkeypatch):
    calls = []
    real = atomic._renameat2

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(atomic, "_renameat2", spy)
    path = tmp_path / "x.npy"
    atomic.write_npy(path, np.arange(3))
    atomic.write_npy(path, np.arange(5))
    assert np.load(path).tolist() == [0, 1, 2, 3, 4]
    assert calls == [atomic._RENAME_EXCHANGE, atomic._RENAME_EXCHANGE]  # the first finds no file and renames
    assert temp_files(tmp_path) == []


def test_falls_back_to_rename_where_the_swap_is_unsupported(tmp_path, monkeypatch):
    def unsupported(*args):
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(atomic, "_renameat2", unsupported)
    path = tmp_path / "a.txt"
    atomic.write_text(path, "1")
    atomic.write_text(path, "2")
    assert path.read_text() == "2"
    assert atomic._renameat2 is None  # not tried again in this process
    assert temp_files(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "logits.npy"
    atomic.write_npy(path, np.ones(4))
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(path) as f:
            f.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert np.load(path).tolist() == [1.0] * 4
    assert temp_files(tmp_path) == []
    assert os.listdir(tmp_path) == ["logits.npy"]


@pytest.mark.skipif(atomic._renameat2 is None, reason="no renameat2 on this platform")
def test_rewrites_trade_places_with_a_spare_and_create_no_files(tmp_path):
    path = tmp_path / "meta.json"
    atomic.rewrite_text(path, "v1")  # no file yet: a plain atomic write
    atomic.rewrite_text(path, "v2")  # creates the spare, swaps it in; v1's file becomes the spare
    spare = atomic.spare_of(path)
    inodes = {path.stat().st_ino, spare.stat().st_ino}
    for text in ("v3 is longer than the others", "v4"):
        atomic.rewrite_text(path, text)
        assert {path.stat().st_ino, spare.stat().st_ino} == inodes  # the same two files, trading places
    assert path.read_text() == "v4" and spare.read_text() == "v3 is longer than the others"
    atomic.rewrite_text(path, "last", keep_spare=False)
    assert path.read_text() == "last"
    assert os.listdir(tmp_path) == ["meta.json"]


def test_rewrite_falls_back_to_plain_atomic_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", None)
    path = tmp_path / "meta.json"
    for text in ("a", "b", "c"):
        atomic.rewrite_text(path, text)
    assert path.read_text() == "c"
    assert os.listdir(tmp_path) == ["meta.json"]
