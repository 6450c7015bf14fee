"""Calibration data for vendor toolchains, from a run set's dumps: one stage's inputs across steps and runs.

    python -m pipeline.calibration RUN_SET --stage block2 --out DIR [--format npz|npy-list] [--max_samples 64]
                                   [--max_mb 1024] [--onnx_dir DIR] [--seed 0]

RUN_SET is a run set (python -m pipeline.run_set) or one run folder. Samples are grouped by the graph they feed: a
graph set of the onnx_dir (prefill, decode, decode_c128, ...), by default the onnx_dir the runs were made with;
--onnx_dir gives other graphs of the same model, e.g. converted with --cache_input window, whose block graphs take
only their window's cache slots (much smaller samples). Where a graph has more than --max_samples samples, or all
of them would pass --max_mb (each graph gets an equal share, and one sample at least), they are drawn at random
(--seed). Formats:

  npz       DIR/<graph set>/sample_0000.npz, one file per sample with the graph's input names as keys
  npy-list  DIR/<graph set>/<input name>/0000.npy, and DIR/<graph set>/dataset.txt with one line per sample: its
            files in the graph's input order, separated by spaces (the multi-input dataset file of RKNN-Toolkit)

DIR/calibration.json names the graph each folder feeds, its inputs (name, shape, dtype) and where each sample came
from (run, step, past_len, q_len). The folder is written beside DIR and renamed into place when complete.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.core import layout
from pipeline.core.atomic import write_json
from pipeline.core.errors import StagepipeError, cli_entry
from pipeline.core.jsonfile import load_manifest
from pipeline.npu.folders import building
from pipeline.npu.samples import StageSample, check_same_model, open_run_set, pick, spec_bytes, stage_samples
from schemas.manifest import Manifest

FORMATS = ("npz", "npy-list")


def by_graph_set(samples: list[StageSample], m: Manifest) -> dict[str, list[StageSample]]:
    groups: dict[str, list[StageSample]] = {}
    for s in samples:
        groups.setdefault(s.graph_set(m), []).append(s)
    return groups


def bounded(groups: dict[str, list[StageSample]], m: Manifest, stage: str, max_samples: int, max_mb: float,
            seed: int) -> dict[str, list[StageSample]]:
    """At most max_samples per graph, and max_mb in all (an equal share per graph, but one sample at least)."""
    share = max_mb * (1 << 20) / max(1, len(groups))
    out = {}
    for name, samples in groups.items():
        per_sample = spec_bytes(m.graphs[name][stage])
        limit = min(max_samples or len(samples), max(1, int(share // per_sample)))
        out[name] = pick(samples, limit, seed)
    return out


def write_samples(out: Path, name: str, samples: list[StageSample], m: Manifest, stage: str, fmt: str) -> dict:
    spec = m.graphs[name][stage]
    folder = out / name
    folder.mkdir(parents=True)
    lines, listed = [], []
    for i, sample in enumerate(samples):
        feeds = sample.feeds(spec, m)
        if fmt == "npz":
            file = layout.calibration_sample(i)
            np.savez(folder / file, **feeds)
            files = [file]
        else:
            files = [layout.calibration_npy(t.name, i) for t in spec.inputs]
            for file, t in zip(files, spec.inputs):
                (folder / file).parent.mkdir(exist_ok=True)
                np.save(folder / file, feeds[t.name])
            lines.append(" ".join(files))
        listed.append({"files": files, "run": sample.run.dir.name, "step": sample.step_dir.name,
                       "mode": sample.mode, "past_len": sample.meta.past_len, "q_len": sample.meta.q_len})
    if fmt == "npy-list":
        (folder / layout.CALIBRATION_LIST).write_text("\n".join(lines) + "\n")
    return {"graph": spec.file, "inputs": [t.model_dump() for t in spec.inputs], "samples": listed}


def write_calibration(run_set: Path, stage: str, out: Path, fmt: str = "npz", max_samples: int = 64,
                      max_mb: float = 1024, onnx_dir: Path | None = None, seed: int = 0) -> dict:
    if fmt not in FORMATS:
        raise StagepipeError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    runs = open_run_set(run_set)
    onnx_dir = Path(onnx_dir or runs[0].settings.onnx_dir)
    m = load_manifest(onnx_dir)
    check_same_model(runs, m, onnx_dir)
    samples = stage_samples(runs, stage, len(m.blocks))
    if not samples:
        raise StagepipeError(f"{run_set}: no step where {stage} ran; finish the runs first")
    chosen = bounded(by_graph_set(samples, m), m, stage, max_samples, max_mb, seed)
    with building(out, layout.CALIBRATION_JSON, "a calibration folder") as tmp:
        record = {"stage": stage, "format": fmt, "run_set": str(Path(run_set).resolve()),
                  "onnx_dir": str(onnx_dir.resolve()), "onnx_fingerprint": m.graphs_fingerprint,
                  "steps_available": len(samples), "seed": seed,
                  "graph_sets": {name: write_samples(tmp, name, group, m, stage, fmt)
                                 for name, group in sorted(chosen.items())}}
        write_json(tmp / layout.CALIBRATION_JSON, record)
    return record


@cli_entry
def main(argv=None):
    from pipeline.core.cli_args import ArgumentParser

    p = ArgumentParser(prog="python -m pipeline.calibration", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("run_set", type=Path, help="a run set folder (python -m pipeline.run_set) or a run folder")
    p.add_argument("--stage", required=True, help="embed, block0, ..., output")
    p.add_argument("--out", type=Path, required=True, help="the calibration folder to write")
    p.add_argument("--format", default="npz", choices=FORMATS, help="npz (default) or npy-list")
    p.add_argument("--max_samples", type=int, default=64, help="at most this many samples per graph (default 64)")
    p.add_argument("--max_mb", type=float, default=1024, help="at most this many MiB in all (default 1024)")
    p.add_argument("--onnx_dir", type=Path, default=None, help="the graphs to feed (default: the runs' onnx_dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draw (default 0)")
    a = p.parse_args(argv)
    r = write_calibration(a.run_set, a.stage, a.out, a.format, a.max_samples, a.max_mb, a.onnx_dir, a.seed)
    total = sum(len(g["samples"]) for g in r["graph_sets"].values())
    sets = ", ".join(f"{name} {len(g['samples'])}" for name, g in r["graph_sets"].items())
    print(f"{a.out}: {total} {a.stage} samples of {r['steps_available']} ({sets}), {a.format}")
    return 0
