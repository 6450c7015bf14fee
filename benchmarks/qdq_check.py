"""Check a QDQ onnx_dir the way an NPU toolchain would meet it: onnx's full checker on every quantized graph, and
OpenVINO (its CPU plugin, float32 inference precision) running them against onnxruntime and the fp32 graphs.

    python -m benchmarks.qdq_check QDQ_DIR --fp32 FP32_DIR --calibration RUN_SET [--samples 8] [--out R.json]

For each quantized stage and mode, on the steps of the runs the QDQ graphs were not calibrated on: the cosine of
each backend's first output (hidden states, logits) against the fp32 graph's and against each other (min, mean).
onnxruntime computes exactly what onnx's reference evaluator does on these graphs; OpenVINO executes the Q/DQ pairs
its own way, so its figures say how far that moves the results, next to the quantization error itself.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.core.atomic import write_json  # noqa: E402
from pipeline.core.errors import StagepipeError, cli_entry  # noqa: E402


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def heldout_samples(qdq_dir: Path, run_set: Path, stage: str, mode: str) -> list:
    from pipeline.core.jsonfile import load_manifest
    from pipeline.npu.samples import open_run_set, stage_samples

    m = load_manifest(qdq_dir)
    calibrated = set(m.quantization.calibration_runs if m.quantization else [])
    runs = [r for r in open_run_set(run_set) if str(r.dir.resolve()) not in calibrated] or open_run_set(run_set)
    return [s for s in stage_samples(runs, stage, len(m.blocks)) if s.mode == mode]


def compare_backends(qdq_dir: Path, fp32_dir: Path, run_set: Path, stage: str, mode: str, samples: int = 8) -> dict:
    """Cosines of onnxruntime and OpenVINO on the stage's whole-cache graph of this mode, over held-out steps."""
    import openvino as ov

    from pipeline.core.jsonfile import load_manifest

    m, m32 = load_manifest(qdq_dir), load_manifest(fp32_dir)
    spec = m.graphs[mode][stage]
    chosen = heldout_samples(qdq_dir, run_set, stage, mode)
    chosen = [chosen[i] for i in np.linspace(0, len(chosen) - 1, min(samples, len(chosen))).astype(int)]
    ort_q, ort_32 = _session(qdq_dir / spec.file), _session(fp32_dir / m32.graphs[mode][stage].file)
    compiled = ov.Core().compile_model(str(qdq_dir / spec.file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    pairs = {"onnxruntime_vs_fp32": [], "openvino_vs_fp32": [], "openvino_vs_onnxruntime": []}
    for sample in chosen:
        feeds = sample.feeds(spec, m)
        rows = sample.meta.q_len if sample.rows > 1 else 1
        a = ort_q.run(None, feeds)[0][:, :rows]
        b = compiled(feeds)[compiled.outputs[0]][:, :rows]
        ref = ort_32.run(None, feeds)[0][:, :rows]
        for key, (x, y) in zip(pairs, ((a, ref), (b, ref), (b, a))):
            pairs[key].append(_cosine(x, y))
    return {"stage": stage, "mode": mode, "graph": spec.file, "samples": len(chosen),
            **{k: {"min": min(v), "mean": float(np.mean(v))} for k, v in pairs.items() if v}}


def full_check(qdq_dir: Path, rel: str) -> str:
    import onnx

    try:
        onnx.checker.check_model(str(qdq_dir / rel), full_check=True)
        return "ok"
    except Exception as e:  # the checker's own error types; the message is the finding
        return f"FAIL: {str(e).splitlines()[0]}"


@cli_entry
def main(argv=None):
    from pipeline.core.cli_args import ArgumentParser
    from pipeline.core.jsonfile import load_manifest
    from pipeline.core.table import format_table

    p = ArgumentParser(prog="python -m benchmarks.qdq_check", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("qdq_dir", type=Path)
    p.add_argument("--fp32", type=Path, required=True, help="the fp32 onnx_dir the QDQ graphs were made from")
    p.add_argument("--calibration", type=Path, required=True, help="the run set they were calibrated on")
    p.add_argument("--samples", type=int, default=8, help="held-out steps per graph (default 8)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    a = p.parse_args(argv)
    try:
        import openvino  # noqa: F401  (compare_backends imports it; say so before any work)
    except ImportError:
        raise StagepipeError("openvino is not installed: pip install openvino") from None
    m = load_manifest(a.qdq_dir)
    if not m.quantization:
        raise StagepipeError(f"{a.qdq_dir}: not a QDQ onnx_dir (python -m pipeline.quantize writes them)")
    stages = [s for s, how in m.quantization.stages.items() if how == m.quantization.scheme]
    checks = {spec.file: full_check(a.qdq_dir, spec.file) for graphs in m.graphs.values()
              for s, spec in graphs.items() if s in stages}
    results = [compare_backends(a.qdq_dir, a.fp32, a.calibration, s, mode, a.samples)
               for s in stages for mode in ("prefill", "decode")]
    bad = {f: c for f, c in checks.items() if c != "ok"}
    print(f"{a.qdq_dir} ({m.precision}): onnx full check: {len(checks) - len(bad)} of {len(checks)} graphs ok")
    for f, c in bad.items():
        print(f"  {f}: {c}")
    rows = [[r["graph"], r["samples"]] + [f"{r[k]['min']:.6f} / {r[k]['mean']:.6f}" for k in
                                           ("onnxruntime_vs_fp32", "openvino_vs_fp32", "openvino_vs_onnxruntime")]
            for r in results]
    print(format_table(["graph", "steps", "ORT vs fp32 (min/mean)", "OpenVINO vs fp32", "OpenVINO vs ORT"], rows,
                       right={1}))
    if a.out:
        write_json(a.out, {"qdq_dir": str(a.qdq_dir), "full_check": checks, "backends": results})
    return 1 if bad else 0


if __name__ == "__main__":
    main()
