"""Folders the npu tools write (onnx_dirs, calibration sets): built beside their target and renamed into place
when complete, so a crash never leaves half of one; copies of an onnx_dir's model files."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from pipeline.convert.onnx_dir import replace_dir
from pipeline.core.errors import StagepipeError
from pipeline.core.layout import GENERATION_CONFIG, MODEL_CONFIG


@contextlib.contextmanager
def building(out: Path, marker: str, what: str, subdirs=()):
    """Yield an empty temporary sibling of `out` (with `subdirs`); it replaces `out` when the block ends, and is
    removed when it fails. An `out` that holds files but no `marker` file is refused (it is not ours)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / marker).is_file():
        raise StagepipeError(f"--out {out} exists and is not {what}; choose a new or empty folder")
    tmp = out.parent / f".{out.name}.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for sub in subdirs:
        (tmp / sub).mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_into(src_dir: Path, out: Path, rel: str, link: bool = False):
    """A file of src_dir at the same place in out: a copy, or a hard link (where the filesystem allows) with
    link=True; the onnx package >= 1.21 refuses to load weights from a file with several links."""
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    if (out / rel).exists():
        return
    if link:
        try:
            return os.link(src_dir / rel, out / rel)
        except OSError:
            pass
    shutil.copyfile(src_dir / rel, out / rel)


def copy_model_files(src_dir: Path, out: Path, manifest):
    """config.json, generation_config.json and the tokenizer files of an onnx_dir."""
    for name in set(manifest.tokenizer_files) | {MODEL_CONFIG, GENERATION_CONFIG}:
        if (src_dir / name).is_file():
            copy_into(src_dir, out, name)
