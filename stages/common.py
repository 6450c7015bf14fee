"""Arguments every stage script shares, and turning them into a backend and step paths."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core.cli_args import ArgumentParser
from pipeline.runtime.backends import make_backend
from pipeline.core.errors import StagepipeError
from pipeline.core.layout import StepPaths
from pipeline.core.jsonfile import load_manifest


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--step_dir", type=Path, required=True, help="the step folder (e.g. runs/demo/step_0000)")
    p.add_argument("--onnx_dir", type=Path, required=True, help="converted model folder (manifest.json)")
    p.add_argument("--backend", default="onnx", help="onnx (default) or reference (numpy, reads the checkpoint)")
    p.add_argument("--model_path", type=Path, default=None, help="checkpoint for --backend reference")
    p.add_argument("--provider", default="cpu", help="onnxruntime provider for --backend onnx: cpu or cuda")
    p.add_argument("--meta", type=Path, default=None, help="meta.json path (default STEP_DIR/meta.json)")
    p.add_argument("--attention_mask", type=Path, default=None, help="default STEP_DIR/attention_mask.npy")
    p.add_argument("--position_ids", type=Path, default=None, help="default STEP_DIR/position_ids.npy")
    p.add_argument("--max_input_len", type=int, default=None, help="checked against the graphs (optional)")
    p.add_argument("--max_cache_len", type=int, default=None, help="checked against the graphs (optional)")
    return p


def open_backend(args):
    manifest = load_manifest(args.onnx_dir)
    for flag, value, expected in (("--max_input_len", args.max_input_len, manifest.max_input_len),
                                  ("--max_cache_len", args.max_cache_len, manifest.max_cache_len)):
        if value is not None and value != expected:
            raise StagepipeError(f"{flag} {value} does not match the graphs in {args.onnx_dir} ({expected}); "
                                 "reconvert with that value or drop the flag")
    kwargs = {"model_path": args.model_path} if args.backend == "reference" else {"provider": args.provider}
    return make_backend(args.backend, args.onnx_dir, manifest, **kwargs)


def step_paths(args, **extra) -> StepPaths:
    return StepPaths(args.step_dir, meta=args.meta, attention_mask=args.attention_mask,
                     position_ids=args.position_ids, **extra)


def step_number(step_dir: Path) -> int:
    """The step number a folder's name gives (step_0003 -> 3); 0 for other names (pass --step)."""
    from pipeline.core.layout import step_number as number_of

    return number_of(Path(step_dir).name) or 0
