"""Find or make the onnx_dir a run uses: the demo checkpoint, and converting when graphs are missing or stale."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.convert.onnx_dir import convert_with
from pipeline.convert.options import ConvertOptions
from pipeline.convert.staleness import settings_mismatch, staleness
from pipeline.core.jsonfile import load_manifest
from pipeline.core.layout import MANIFEST
from pipeline.core.errors import StagepipeError
from pipeline.demo.checkpoint import write_trained_demo

DEMO_MODEL = Path("models/demo-qwen3")
ONNX_ROOT = Path("onnx")


def keyed_onnx_dir(model_path: Path, options: ConvertOptions) -> Path:
    """The onnx_dir auto-conversion uses: named by the model and the settings (onnx/demo-qwen3-t16-c1024-fp32),
    so converting with other settings never replaces graphs other run folders were made with."""
    return ONNX_ROOT / f"{model_path.name}-t{options.max_input_len}-c{options.max_cache_len}-{options.precision}"


def resolve_onnx_dir(model_path: Path | None, onnx_dir: Path | None, max_input_len=None, max_cache_len=None,
                     precision=None, log=print) -> Path:
    """The onnx_dir to run: given as is, or converted from model_path (the demo checkpoint when neither is given).
    Auto-converted folders are keyed by their settings; an --onnx_dir given with --model_path is converted only
    when missing or when the checkpoint changed, never re-made with other settings."""
    if model_path is None and onnx_dir is not None:
        return Path(onnx_dir)
    if model_path is None:
        if write_trained_demo(DEMO_MODEL):
            log(f"wrote the trained demo checkpoint to {DEMO_MODEL}")
        model_path = DEMO_MODEL
    model_path = Path(model_path)
    if not model_path.is_dir():
        raise StagepipeError(f"--model_path {model_path}: not a folder; point it at a HuggingFace checkpoint")
    wanted = {"max_input_len": max_input_len, "max_cache_len": max_cache_len, "precision": precision}
    options = ConvertOptions(model_path=model_path, **{k: v for k, v in wanted.items() if v is not None})
    onnx_dir = Path(onnx_dir) if onnx_dir else keyed_onnx_dir(model_path, options)
    settings = {k: getattr(options, k) for k in wanted}
    if (onnx_dir / MANIFEST).exists() and (mismatch := settings_mismatch(load_manifest(onnx_dir), settings)):
        # re-making it with other settings would break the runs made with it
        raise StagepipeError(f"--onnx_dir {onnx_dir}: {mismatch}; leave out --onnx_dir (each setting gets its "
                             "own folder) or give a new one")
    reason = staleness(onnx_dir, model_path, settings)
    if reason:
        log(f"converting {model_path} -> {onnx_dir} ({reason})")
        convert_with(replace(options, onnx_dir=onnx_dir), log=log)
    return onnx_dir
