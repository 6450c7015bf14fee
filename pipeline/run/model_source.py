"""Find or make the onnx_dir a run uses: the demo checkpoint, and converting when graphs are missing or stale."""
from __future__ import annotations

from pathlib import Path

from pipeline.convert.onnx_dir import convert_with
from pipeline.convert.options import ConvertOptions
from pipeline.convert.staleness import staleness
from pipeline.core.errors import StagepipeError
from pipeline.demo.checkpoint import write_demo_checkpoint

DEMO_MODEL = Path("models/demo-qwen3")
DEMO_ONNX = Path("onnx/demo-qwen3")


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
        given = {k: v for k, v in wanted.items() if v is not None}
        convert_with(ConvertOptions(model_path=model_path, onnx_dir=onnx_dir, **given), log=log)
    return onnx_dir
