"""Mixed precision: the cheapest per-stage choice among several onnx_dirs of one model that meets a quality target.

    python -m pipeline.mixed --onnx_dirs fp32=onnx/fp32,int8=onnx/int8,int4=onnx/int4 --calibration RUN_SET
                             --target "top1>=0.98,cosine>=0.995" [--out DIR] [--heldout N] [--max_checks 12]

Quality is measured on the held-out runs of the set (the last --heldout, by default a quarter, as
python -m pipeline.quantize holds them out): the whole pipeline teacher-forced on each run's tokens, hybrid (each
stage on its own onnx_dir's graphs), every position's logits against the fp32 graphs': cosine (mean), cosine_min,
top1 (agreement of the argmax). The fp32 dir (label fp32, or the one whose precision is fp32) is the reference.

1. Sensitivity: each stage alone on each other dir, everything else fp32, measured.
2. Search: every assignment (stage -> dir) is costed by its stages' weight bytes and its quality predicted by
   adding up the single-stage losses (1 - cosine, 1 - top1; small independent errors add); the cheapest predicted
   to meet the target is measured, then the next, until one measures up (at most --max_checks).
Writes DIR/assignment.json (the choice, every measurement) and, with --out, an onnx_dir made of those stages.
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

import onnx

from pipeline.core import layout
from pipeline.core.atomic import write_json
from pipeline.core.errors import StagepipeError, cli_entry
from pipeline.core.jsonfile import load_manifest
from pipeline.core.table import format_table
from pipeline.npu.evaluate import LogitsQuality
from pipeline.npu.mixed_dir import check_sources, write_mixed_dir
from pipeline.npu.qdq_dir import onnx_dir_bytes
from pipeline.npu.quantize import split_runs
from pipeline.npu.samples import open_run_set
from pipeline.runtime.backends import OnnxBackend
from pipeline.runtime.hybrid import HybridBackend
from schemas.manifest import Manifest

METRICS = ("top1", "cosine", "cosine_min")
LOSS = {"top1": "top1", "cosine": "cosine_mean", "cosine_min": "cosine_min"}  # target name -> measured key


def parse_onnx_dirs(text: str) -> dict[str, tuple[Path, Manifest]]:
    sources = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        label, _, path = item.partition("=")
        if not label or not path or not re.fullmatch(r"[A-Za-z0-9_.+-]+", label):
            raise StagepipeError(f"--onnx_dirs {item!r}: expected LABEL=DIR (LABEL of letters, digits, _ . + -)")
        if label in sources:
            raise StagepipeError(f"--onnx_dirs: {label} is given twice")
        sources[label] = (Path(path), load_manifest(Path(path)))
    if len(sources) < 2:
        raise StagepipeError("--onnx_dirs: give at least two, e.g. fp32=onnx/fp32,int4=onnx/int4")
    return sources


def reference_label(sources: dict[str, tuple[Path, Manifest]]) -> str:
    fp32 = [label for label, (_, m) in sources.items() if m.precision == "fp32"]
    if "fp32" in sources and sources["fp32"][1].precision == "fp32":
        return "fp32"
    if not fp32:
        raise StagepipeError("--onnx_dirs: one of them must hold fp32 graphs (the reference)")
    return fp32[0]


def parse_target(text: str) -> dict[str, float]:
    target = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        m = re.fullmatch(r"(\w+)\s*>=\s*([0-9.]+)", item)
        if not m or m.group(1) not in METRICS:
            raise StagepipeError(f"--target {item!r}: expected METRIC>=VALUE with METRIC one of {', '.join(METRICS)}")
        target[m.group(1)] = float(m.group(2))
    if not target:
        raise StagepipeError("--target: give at least one, e.g. \"top1>=0.98,cosine>=0.995\"")
    return target


def meets(quality: dict, target: dict[str, float]) -> bool:
    return all(quality[LOSS[k]] >= v for k, v in target.items())


def stage_tensors(src: Path, m: Manifest, stage: str) -> dict[tuple, int]:
    """(weights file, offset) -> bytes of each weight tensor a stage's graphs read."""
    found = {}
    for graphs in m.graphs.values():
        if stage in graphs:
            model = onnx.load(str(src / graphs[stage].file), load_external_data=False)
            for t in model.graph.initializer:
                info = {e.key: e.value for e in t.external_data}
                if info:
                    found[(info["location"], info.get("offset", "0"))] = int(info["length"])
    return found


class Search:
    def __init__(self, sources: dict, reference: str, quality: LogitsQuality, stages: list[str], log):
        self.sources, self.reference, self.quality, self.stages, self.log = sources, reference, quality, stages, log
        self.backends = {label: OnnxBackend(path, m) for label, (path, m) in sources.items()}
        self.tensors = {(s, label): stage_tensors(path, m, s) for label, (path, m) in sources.items() for s in stages}
        self.measured: list[dict] = []

    def measure(self, assignment: dict[str, str]) -> dict:
        ref = self.backends[self.reference]
        routed = {s: label for s, label in assignment.items() if label != self.reference}
        name = ",".join(f"{s}={label}" for s, label in routed.items()) or self.reference
        backends = {s: self.backends[label] for s, label in routed.items()}
        q = self.quality.measure(HybridBackend(ref, backends, ref.manifest, name))
        record = {"assignment": dict(assignment), "bytes": self.bytes(assignment), **q}
        self.measured.append(record)
        self.log(f"  {name}: cosine {q['cosine_mean']:.6f} (min {q['cosine_min']:.6f}), top-1 {q['top1']:.1%}")
        return record

    def bytes(self, assignment: dict[str, str]) -> int:
        """Weight bytes of an assignment, a tensor two stages of one dir share (a tied embedding) once."""
        unique = {(label, key): n for s, label in assignment.items() for key, n in self.tensors[s, label].items()}
        return sum(unique.values())

    def sensitivity(self) -> dict[str, dict[str, dict]]:
        base = {s: self.reference for s in self.stages}
        return {s: {label: self.measure({**base, s: label}) for label in self.sources if label != self.reference}
                for s in self.stages}

    def choose(self, target: dict[str, float], sensitivity: dict, max_checks: int) -> dict | None:
        """The cheapest measured assignment meeting the target, trying them cheapest first by prediction."""
        labels = list(self.sources)

        def predicted(assignment) -> dict:
            loss = {key: sum(1 - sensitivity[s][label][key] for s, label in assignment.items()
                             if label != self.reference) for key in LOSS.values()}
            return {key: 1 - v for key, v in loss.items()}

        candidates = []
        for choice in itertools.product(labels, repeat=len(self.stages)):
            assignment = dict(zip(self.stages, choice))
            if meets(predicted(assignment), target):
                candidates.append((self.bytes(assignment), choice, assignment))
        for _, _, assignment in sorted(candidates)[:max_checks]:
            record = self.measure(assignment)
            if meets(record, target):
                return record
        return None


def mixed(onnx_dirs: str, run_set: Path, target_text: str, out: Path | None = None, heldout: int | None = None,
          max_checks: int = 12, report: Path | None = None, link: bool = False, log=print) -> dict:
    sources = parse_onnx_dirs(onnx_dirs)
    target = parse_target(target_text)
    reference = reference_label(sources)
    ref_dir, ref_manifest = sources[reference]
    check_sources(ref_manifest, sources)
    _, held = split_runs(open_run_set(run_set), heldout)
    stages = ref_manifest.stage_names()
    log(f"measuring on the held-out run(s) {', '.join(r.dir.name for r in held)} against {reference} ...")
    search = Search(sources, reference, LogitsQuality(held, OnnxBackend(ref_dir, ref_manifest)), stages, log)
    log("sensitivity: one stage at a time")
    sensitivity = search.sensitivity()
    log("search: the cheapest assignments predicted to meet the target, measured")
    chosen = search.choose(target, sensitivity, max_checks)
    if chosen is None:
        chosen = search.measure({s: reference for s in stages})
        log(f"  nothing cheaper measured up to the target: {reference} everywhere")
    result = {"target": target, "reference": reference, "sources": {k: str(p) for k, (p, _) in sources.items()},
              "heldout_runs": [r.dir.name for r in held], "assignment": chosen["assignment"], "measured": chosen,
              "reference_bytes": search.bytes({s: reference for s in stages}),
              "sensitivity": sensitivity, "tried": search.measured}
    if out is not None:
        write_mixed_dir(ref_dir, sources, chosen["assignment"], out, link)
        result.update(onnx_dir=str(out), onnx_dir_bytes=onnx_dir_bytes(out))
    report = report or (out / layout.MIXED_ASSIGNMENT if out else None)
    if report is not None:
        write_json(report, result)
        result["report"] = str(report)
    return result


def print_result(r: dict):
    labels = [label for label in r["sources"] if label != r["reference"]]
    rows = [[stage] + [f"{per[label]['cosine_mean']:.6f} / {per[label]['top1']:.1%}" for label in labels]
            for stage, per in r["sensitivity"].items()]
    print("\nsensitivity on the held-out runs (logits cosine / top-1 with only that stage on that dir):")
    print(format_table(["stage"] + labels, rows))
    m = r["measured"]
    print(f"\nchosen: {', '.join(f'{s}={label}' for s, label in r['assignment'].items())}")
    print(f"  weights {m['bytes'] / 2**20:.1f} MiB (all {r['reference']}: {r['reference_bytes'] / 2**20:.1f} MiB); "
          f"logits cosine {m['cosine_mean']:.6f} (min {m['cosine_min']:.6f}), top-1 {m['top1']:.1%} over "
          f"{m['positions']} held-out positions; target {', '.join(f'{k}>={v:g}' for k, v in r['target'].items())}")
    if "onnx_dir" in r:
        print(f"  onnx_dir {r['onnx_dir']}: {r['onnx_dir_bytes'] / 2**20:.1f} MiB on disk")
    if "report" in r:
        print(f"  assignment and every measurement: {r['report']}")


@cli_entry
def main(argv=None):
    from pipeline.core.cli_args import ArgumentParser

    p = ArgumentParser(prog="python -m pipeline.mixed", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--onnx_dirs", required=True, help="LABEL=DIR,... (one of them fp32: the reference)")
    p.add_argument("--calibration", type=Path, required=True, help="the run set to measure on (its held-out runs)")
    p.add_argument("--target", required=True, help='e.g. "top1>=0.98,cosine>=0.995" (also cosine_min)')
    p.add_argument("--out", type=Path, default=None, help="write the chosen mixed onnx_dir here")
    p.add_argument("--heldout", type=int, default=None, help="runs measured on: the last N (default: a quarter)")
    p.add_argument("--max_checks", type=int, default=12, help="assignments measured in the search at most")
    p.add_argument("--report", type=Path, default=None, help=f"assignment JSON (default OUT/{layout.MIXED_ASSIGNMENT})")
    p.add_argument("--link_weights", action="store_true", help="hard-link weight files instead of copying them")
    a = p.parse_args(argv)
    r = mixed(a.onnx_dirs, a.calibration, a.target, a.out, a.heldout, a.max_checks, a.report, a.link_weights,
              log=lambda msg: print(msg, file=sys.stderr))
    print_result(r)
    return 0
