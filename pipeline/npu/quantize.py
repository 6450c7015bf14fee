"""Static QDQ graphs from an fp32 onnx_dir, calibrated on a run set's own dumps, with the error they introduce.

    python -m pipeline.quantize --onnx_dir FP32_DIR --calibration RUN_SET --scheme w8a8|w8a16|w4a16 --out DIR
                                [--keep_float mask,rope,norms] [--stages blocks,output] [--heldout N]
                                [--max_samples 64] [--seed 0] [--link_weights]

The last --heldout runs of the set (default: a quarter, at least one) are not calibrated on; on them the report
gives each quantized stage's error teacher-forced against the golden run (relative L2 error, cosine) and the whole
pipeline's logits against the fp32 graphs' (cosine, top-1 agreement). --keep_float names the graph parts left in
float (pipeline/npu/graph_parts.py: mask, rope, norms; 'none' quantizes everything onnxruntime can, its defaults).
--stages: the stages to quantize (default blocks,output; the embedding lookup stays as it is, as on boards where it
is a table read on the CPU); the others are copied. DIR is a complete onnx_dir: run_auto, compare, ops take it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core import layout
from pipeline.core.atomic import write_json
from pipeline.core.errors import StagepipeError, cli_entry
from pipeline.core.jsonfile import load_manifest
from pipeline.core.table import format_table
from pipeline.npu.graph_parts import GROUPS
from pipeline.npu.samples import RunFolderView, check_same_model, open_run_set
from pipeline.npu.qdq import SCHEMES
from pipeline.npu.qdq_dir import onnx_dir_bytes, write_qdq_dir

DEFAULT_KEEP_FLOAT = ",".join(GROUPS)


def parse_keep_float(text: str) -> list[str]:
    chosen = [] if text.strip() == "none" else [g.strip() for g in text.split(",") if g.strip()]
    bad = [g for g in chosen if g not in GROUPS]
    if bad:
        raise StagepipeError(f"--keep_float {bad[0]}: choose from {', '.join(GROUPS)} (comma-separated), or none")
    return chosen


def parse_stages(text: str, all_stages: list[str]) -> list[str]:
    blocks = [s for s in all_stages if s.startswith("block")]
    chosen = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        names = all_stages if part == "all" else blocks if part == "blocks" else [part]
        if any(n not in all_stages for n in names):
            raise StagepipeError(f"--stages {part}: the stages are {', '.join(all_stages)} (or blocks, all)")
        chosen += names
    return [s for s in all_stages if s in chosen]


def split_runs(runs: list[RunFolderView], heldout: int | None) -> tuple[list, list]:
    """(calibration runs, held-out runs): the last `heldout` runs are held out (default a quarter, at least 1)."""
    n = len(runs)
    if heldout is None:
        heldout = max(1, n // 4) if n > 1 else 0
    if not 0 <= heldout < n:
        raise StagepipeError(f"--heldout {heldout}: the set has {n} run(s); at least one must be left to calibrate on")
    return runs[:n - heldout], runs[n - heldout:]


def evaluate(fp32_dir: Path, out: Path, heldout: list[RunFolderView], stages: list[str]) -> dict:
    from pipeline.npu.evaluate import LogitsQuality, stage_errors
    from pipeline.runtime.backends import OnnxBackend

    candidate = OnnxBackend(out)
    return {"stage_errors": stage_errors(heldout, candidate, stages),
            "logits": LogitsQuality(heldout, OnnxBackend(fp32_dir)).measure(candidate)}


def quantize(fp32_dir: Path, run_set: Path, scheme: str, out: Path, keep_float: str = DEFAULT_KEEP_FLOAT,
             stages: str = "blocks,output", heldout: int | None = None, max_samples: int = 64, seed: int = 0,
             link: bool = False, log=print) -> dict:
    m = load_manifest(fp32_dir)
    runs = open_run_set(run_set)
    check_same_model(runs, m, fp32_dir)
    calibration, held = split_runs(runs, heldout)
    chosen = parse_stages(stages, m.stage_names())
    manifest = write_qdq_dir(fp32_dir, calibration, scheme, out, chosen, parse_keep_float(keep_float),
                             max_samples, seed, link, log)
    report = {"onnx_dir": str(out), "source": str(fp32_dir), "scheme": scheme, "precision": manifest.precision,
              "keep_float": manifest.quantization.keep_float, "stages": chosen,
              "calibration_runs": [r.dir.name for r in calibration], "heldout_runs": [r.dir.name for r in held],
              "bytes": onnx_dir_bytes(out), "fp32_bytes": onnx_dir_bytes(fp32_dir)}
    if held:
        log(f"measuring on the held-out run(s) {', '.join(r.dir.name for r in held)} ...")
        report.update(evaluate(fp32_dir, out, held, chosen))
    write_json(out / layout.QUANTIZE_REPORT, report)
    return report


def print_report(r: dict):
    print(f"{r['onnx_dir']}: {r['precision']}, {r['bytes'] / 2**20:.1f} MiB (fp32 {r['fp32_bytes'] / 2**20:.1f} MiB); "
          f"kept in float: {', '.join(r['keep_float']) or 'nothing'}")
    print(f"calibrated on {', '.join(r['calibration_runs'])}; held out {', '.join(r['heldout_runs']) or 'none'}")
    if "stage_errors" not in r:
        print("no held-out run: nothing measured (--heldout 1 or more)")
        return
    rows = [[stage, f"{e['rel_err_max']:.4g}", e["at"], f"{e['rel_err_mean']:.4g}", f"{e['cosine_min']:.6f}",
             e["steps"]] for stage, e in r["stage_errors"].items()]
    print("\nerror each stage introduces on the held-out steps (pipeline.replay: teacher-forced on the golden inputs):")
    print(format_table(["stage", "rel err max", "at", "rel err mean", "cosine min", "steps"], rows,
                       right={1, 3, 4, 5}))
    q = r["logits"]
    print(f"\nlogits vs fp32 over {q['positions']} held-out positions: cosine mean {q['cosine_mean']:.6f}, min "
          f"{q['cosine_min']:.6f}; top-1 agreement {q['top1']:.1%}")


@cli_entry
def main(argv=None):
    from pipeline.core.cli_args import ArgumentParser

    p = ArgumentParser(prog="python -m pipeline.quantize", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--onnx_dir", type=Path, required=True, help="the fp32 onnx_dir to quantize")
    p.add_argument("--calibration", type=Path, required=True, help="a run set (python -m pipeline.run_set) or run")
    p.add_argument("--scheme", required=True, choices=list(SCHEMES))
    p.add_argument("--out", type=Path, required=True, help="the QDQ onnx_dir to write")
    p.add_argument("--keep_float", default=DEFAULT_KEEP_FLOAT, help=f"default {DEFAULT_KEEP_FLOAT}; or none")
    p.add_argument("--stages", default="blocks,output", help="stages to quantize (default blocks,output)")
    p.add_argument("--heldout", type=int, default=None, help="runs held out of calibration (default: a quarter)")
    p.add_argument("--max_samples", type=int, default=64, help="calibration samples per mode and stage (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--link_weights", action="store_true",
                   help="hard-link weight files instead of copying them (less disk; onnx >= 1.21 then refuses to "
                        "load the weights, onnxruntime does not mind)")
    a = p.parse_args(argv)
    report = quantize(a.onnx_dir, a.calibration, a.scheme, a.out, a.keep_float, a.stages, a.heldout, a.max_samples,
                      a.seed, a.link_weights, log=lambda msg: print(msg, file=sys.stderr))
    print_report(report)
    return 0
