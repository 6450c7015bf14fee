"""Is an onnx_dir current for a checkpoint and the settings asked for? Auto-conversion asks before converting."""
from __future__ import annotations

from pathlib import Path

from pipeline.convert.graphs import GRAPH_FORMAT
from pipeline.convert.source import source_fingerprint
from pipeline.core.jsonfile import load_manifest
from pipeline.core.layout import MANIFEST


def staleness(onnx_dir: Path, model_path: Path, wanted: dict) -> str | None:
    """Why onnx_dir must be (re)converted from model_path, or None when it is current. wanted: manifest fields
    (max_input_len, precision, ...) the caller needs; None values are not checked."""
    if not (onnx_dir / MANIFEST).exists():
        return "no graphs yet"
    manifest = load_manifest(onnx_dir)
    mismatch = settings_mismatch(manifest, wanted)
    if mismatch:
        return mismatch
    if manifest.graph_format < GRAPH_FORMAT:
        return f"graphs made by an older stagepipe (graph format {manifest.graph_format}, now {GRAPH_FORMAT})"
    if Path(manifest.source_path) != model_path.resolve():
        return f"converted from {manifest.source_path}"
    files = [model_path / name for name in manifest.source_files]
    if not all(p.exists() for p in files):
        return "checkpoint files changed"
    same_stat = all(p.stat().st_size == manifest.source_files[p.name].size and
                    p.stat().st_mtime_ns == manifest.source_files[p.name].mtime_ns for p in files)
    if not same_stat and source_fingerprint(files) != manifest.source_fingerprint:
        return "checkpoint content changed"
    return None


def settings_mismatch(manifest, wanted: dict) -> str | None:
    """Which of the wanted settings the manifest was made without, e.g. "max_cache_len is 64, 128 requested"."""
    for key, value in wanted.items():
        if value is not None and getattr(manifest, key) != value:
            return f"{key} is {getattr(manifest, key)}, {value} requested"
    return None
