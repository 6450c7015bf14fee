"""Find or make the onnx_dir a run uses: the demo checkpoint, and converting when graphs are missing or stale."""
from __future__ import annotations

from pathlib import Path

from pipeline.convert.onnx_dir import convert, source_fingerprint
from pipeline.demo.checkpoint import write_demo_checkpoint
from pipeline.core.errors import StagepipeError
from pipeline.convert.graphs import GRAPH_FORMAT
from pipeline.core.jsonfile import load_manifest

DEMO_MODEL = Path("models/demo-qwen3")
DEMO_ONNX = Path("onnx/demo-qwen3")


def staleness(onnx_dir: Path, model_path: Path, wanted: dict) -> str | None:
    """Why onnx_dir must be (re)converted from model_path, or None when it is current."""
    if not (onnx_dir / "manifest.json").exists():
        return "no graphs yet"
    manifest = load_manifest(onnx_dir)
    for key, value in wanted.items():
        if value is not None and getattr(manifest, key) != value:
            return f"{key} is {getattr(manifest, key)}, {value} requested"
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


def resolve_onnx_dir(model_path: Path | None, onnx_dir: Path | None, max_input_len=None, max_cache_len=None,
                     precision=None, log=print) -> Path:
    """The onnx_dir to run: given as is, or converted from model_path (the demo checkpoint when neither is given)."""
    if model_path is None and onnx_dir is not None:
        return Path(onnx_dir)
    if model_path is None:
        if write_demo_checkpoint(DEMO_MODEL):
            log(f"wrote the random-weight demo checkpoint to {DEMO_MODEL}")
        model_path = DEMO_MODEL
    model_path = Path(model_path)
    if not model_path.is_dir():
        raise StagepipeError(f"--model_path {model_path}: not a folder; point it at a HuggingFace checkpoint")
    onnx_dir = Path(onnx_dir) if onnx_dir else (DEMO_ONNX if model_path == DEMO_MODEL else Path("onnx") / model_path.name)
    wanted = {"max_input_len": max_input_len, "max_cache_len": max_cache_len, "precision": precision}
    reason = staleness(onnx_dir, model_path, wanted)
    if reason:
        log(f"converting {model_path} -> {onnx_dir} ({reason})")
        defaults = {"max_input_len": 16, "max_cache_len": 1024, "precision": "fp32"}
        args = {k: v if v is not None else defaults[k] for k, v in wanted.items()}
        convert(model_path, onnx_dir, **args, log=log)
    return onnx_dir
