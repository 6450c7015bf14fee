"""Atomic file writes: write to a temporary sibling, then rename over the target (a killed process never leaves
a half file). A rename replaces a symbolic link at the target instead of writing through it; an OSError names
the file it was about."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from pipeline.core.errors import with_filename
from pipeline.core.tensors import file_digest, npy_header


_UMASK = os.umask(0)
os.umask(_UMASK)


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_renameat2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _swap(a, b) -> int:
    """Exchange two files atomically (renameat2 RENAME_EXCHANGE): 0, or the errno."""
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return 0
    return ctypes.get_errno()


def replace_file(tmp, path):
    """Atomically put file `tmp` in place of `path` (the reader sees the old or the new file, never neither).

    Where the kernel can, an existing `path` is swapped with `tmp` and the old file, now at `tmp`, removed. A
    plain rename over an existing file makes ext4 start writing the new file out at once (its auto_da_alloc
    safeguard); on a 2-core machine that I/O made the next onnxruntime run ~45% slower (an int4 block, 5.8 ->
    8.5 ms: meta.json is rewritten after every stage). The swap does not trigger it."""
    global _renameat2
    if _renameat2 is not None:
        err = _swap(tmp, path)
        if err == 0:
            os.unlink(tmp)
            return
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem without the swap
            _renameat2 = None
        elif err != errno.ENOENT:  # ENOENT: no file at `path` yet, a plain rename below is all it takes
            raise OSError(err, os.strerror(err), str(path))
    os.replace(tmp, path)


def _temp_sibling(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise with_filename(e, path) from None
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
    return fd, tmp


@contextlib.contextmanager
def atomic_open(path):
    """Yield a binary file; when the block ends without error it replaces `path`, else it is removed.

    The file writes through mkstemp's own descriptor: reopening the temp file by name (which truncates it)
    and then swapping it in still slowed the next onnxruntime run as a plain rename does."""
    path = Path(path)
    fd, tmp = _temp_sibling(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        replace_file(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise with_filename(e, path) from None
        raise


@contextlib.contextmanager
def atomic_write_path(path):
    """Yield a temporary path next to `path`, for writers that need a name; on success it replaces `path`, on
    failure it is removed. Prefer atomic_open on hot paths (see there)."""
    path = Path(path)
    fd, tmp = _temp_sibling(path)
    os.close(fd)
    try:
        yield Path(tmp)
        replace_file(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path, data: bytes) -> str:
    """-> the digest of what was written (tensors.file_digest)."""
    with atomic_open(path) as f:
        f.write(data)
    return file_digest(data)


def write_text(path, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def spare_of(path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.spare.tmp")


def rewrite_text(path, text: str, keep_spare: bool = True):
    """write_text for a file written again and again (a step's meta.json, after every stage): the new text
    goes into a spare file beside it, which is then swapped in; the old file becomes the next spare
    (keep_spare=False removes it: the file's last write). No file is created or removed per write, where
    write_text creates one and removes one: on the 2-core test VM's ext4 a create cost 0.15-0.5 ms, the
    spare write 0.04 ms. A crash mid-write leaves only the spare half-written; `path` is always whole."""
    path, data = Path(path), text.encode("utf-8")
    spare = spare_of(path)
    if _renameat2 is None or not path.exists():
        return write_bytes(path, data)
    try:
        fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # no O_TRUNC: see atomic_open
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
    except OSError:
        return write_bytes(path, data)
    if _swap(spare, path) != 0:
        os.replace(spare, path)  # the swap failed (file just removed?): a plain rename keeps the write atomic
    elif not keep_spare:
        os.unlink(spare)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_npy(path, array: np.ndarray) -> str:
    """np.save's bytes, written atomically; -> their digest (tensors.file_digest), for the stage's record."""
    arr = np.ascontiguousarray(array)
    header, data = npy_header(arr.shape, arr.dtype), memoryview(arr).cast("B") if arr.size else b""
    with atomic_open(path) as f:
        f.write(header)
        f.write(data)
    return file_digest(header, data)


def fsync_path(path):
    """Make a file's content (or a folder's entries) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    except OSError as e:
        raise with_filename(e, path) from None
    finally:
        os.close(fd)


def fsync_folder(folder):
    """fsync every regular file in `folder`, then the folder itself (so renames into it are durable too)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                fsync_path(entry.path)
    fsync_path(folder)
