"""The trained demo model's text: this Python's own standard library sources (PSF license), split by file.

Every machine with Python has them, so training can be rerun anywhere. Tests, bundled third-party packages, the
pydoc topic dump (prose) and files that are mostly data tables (codecs, HTML entities, build settings) are left out. One file in HELD_OUT_EVERY (by sorted path) is held out: the
training script never sees it, and held-out loss / perplexity are measured on those files.
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data", "lib2to3",
              "encodings"}  # 122 codec files that are mostly character tables
SKIP_FILES = {"html/entities.py"}  # a 2,000-entry dict; like _sysconfigdata_*.py, data rather than code
HELD_OUT_EVERY = 16


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The corpus files, sorted by their path relative to the standard library root."""
    root = stdlib_root()
    files = [p for p in root.rglob("*.py") if not SKIP_PARTS.intersection(p.relative_to(root).parts)
             and p.relative_to(root).as_posix() not in SKIP_FILES and not p.name.startswith("_sysconfigdata")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): every HELD_OUT_EVERY-th file, starting at the 8th, is held out."""
    train, held_out = [], []
    for i, path in enumerate(stdlib_files()):
        (held_out if i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2 else train).append(path)
    return train, held_out


def describe() -> dict:
    """Where the corpus came from, for the training record."""
    train, held_out = split_files()
    return {"source": f"Python {sys.version.split()[0]} standard library ({stdlib_root()})",
            "train_files": len(train), "held_out_files": len(held_out),
            "held_out_names": [p.relative_to(stdlib_root()).as_posix() for p in held_out]}


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")
