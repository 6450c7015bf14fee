"""The candidate a workbench tool checks against the golden graphs (pipeline.replay, pipeline.conformance,
pipeline.pack): another onnx_dir of the same model (fp16, int8/int4, a QDQ or vendor-modified graph), another
backend (a registered name or package.module:ClassName: your NPU runtime), or both."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import load_manifest
from pipeline.runtime.backends import Backend, make_backend, stage_process_kwargs


def add_candidate_arguments(p: argparse.ArgumentParser, default_dir: str):
    p.add_argument("--onnx_dir", type=Path, default=None,
                   help=f"the candidate's onnx_dir (default with --backend: {default_dir})")
    p.add_argument("--backend", default=None,
                   help="the candidate's backend: onnx (default), reference, a name registered in "
                        "pipeline.runtime.backends.BACKENDS, or package.module:ClassName")
    p.add_argument("--provider", default="cpu", help="onnxruntime provider for the onnx backend: cpu or cuda")


def open_candidate(args, default_dir: Path | None) -> Backend | None:
    """The candidate backend the arguments name (None when neither --onnx_dir nor --backend is given)."""
    if args.onnx_dir is None and args.backend is None:
        return None
    onnx_dir = args.onnx_dir or default_dir
    if onnx_dir is None:
        raise StagepipeError(f"--backend {args.backend}: also give --onnx_dir (the graphs it runs)")
    name = args.backend or "onnx"
    return make_backend(name, Path(onnx_dir), load_manifest(onnx_dir), **stage_process_kwargs(name, args.provider))


def describe(backend: Backend) -> str:
    m = backend.manifest
    return f"{backend.onnx_dir} ({backend.name} backend, {m.precision}, kv {m.kv_dtype})"


def parse_steps(text: str | None) -> set[tuple[int, int]] | None:
    """"0-40", "3", "0-3,7,10-" -> inclusive (first, last) ranges (an open end: every later step); None: all."""
    if not text:
        return None
    chosen: set[tuple[int, int]] = set()
    for part in filter(None, (x.strip() for x in text.split(","))):
        lo, dash, hi = part.partition("-")
        try:
            start = int(lo)
            end = (int(hi) if hi else 1 << 30) if dash else start
        except ValueError:
            raise StagepipeError(f"--steps {text}: expected step numbers and ranges like 0-40 or 0-3,7,10-") from None
        if start < 0 or end < start:
            raise StagepipeError(f"--steps {part}: a range runs from a low step number to a higher one")
        chosen.add((start, end))
    return chosen


def step_selected(chosen, n: int) -> bool:
    return chosen is None or any(lo <= n <= hi for lo, hi in chosen)
