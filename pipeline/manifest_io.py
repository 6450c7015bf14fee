"""Load and validate an onnx_dir's manifest.json."""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import StagepipeError
from pipeline.validation import load_model_file
from schemas.manifest import Manifest


def load_manifest(onnx_dir: Path) -> Manifest:
    path = Path(onnx_dir) / "manifest.json"
    if not path.exists():
        raise StagepipeError(f"{path}: not found; convert a model first (doit convert / python -m pipeline.convert)")
    return load_model_file(path, Manifest)
