"""Teacher-forced stage replay: the error each stage of a candidate introduces, apart from the error it inherits.

    python -m pipeline.replay GOLDEN_RUN (--onnx_dir CANDIDATE_DIR | --backend NAME) [--candidate_run RUN]
                              [--stages embed,block0,...] [--steps 0-40] [--max_rel_err 0.01]
                              [--json R.json | --json -] [--plot heat.png] [--per_step]
    python -m pipeline.replay GOLDEN_RUN --candidate_run BOARD_DUMPS          (dumps only: nothing is run)

Introduced: for every (step, stage) of the golden run, the candidate stage gets exactly the golden inputs (input
ids; hidden states, attention mask, positions; the golden KV cache as it was before that step) and its outputs
(hidden states, the present K/V rows it would write, logits) are compared with the golden ones. The golden
kv_cache holds the final cache; a step writes only its slots [past_len, next_past_len) and attends only to slots
below past_len, so the final cache with slots >= past_len zeroed is exactly the cache before the step.

Received / produced (--candidate_run, a free-running run of the candidate: run_auto, or dumps a board wrote in
the same file layout): each stage's inputs in that run (hidden states in; the cache slots it attends to) and its
outputs (hidden states out, the cache slots it wrote, logits) against the golden run's. Steps after the runs'
input tokens part are not compared.

error = |candidate - golden| / |golden| (L2, real rows only). A stage INTRODUCES error when its teacher-forced
error exceeds --max_rel_err; it inherits when only its inputs in the candidate run do. With dumps only, a stage
introduces where its outputs exceed the tolerance while its inputs did not.

Exit status: 1 when a stage introduces error over the tolerance (the worst one is named), 0 otherwise, 2 for
bad input (a candidate that does not fit the golden run: other dimensions, split, T or C).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from pipeline.core import layout
from pipeline.core.cli_args import ArgumentParser
from pipeline.core.errors import StagepipeError, cli_entry
from pipeline.core.layout import stage_sort_key
from pipeline.runtime.backends import Backend
from pipeline.tools.candidate import add_candidate_arguments, describe, open_candidate, parse_steps, step_selected
from pipeline.tools.drift import DEFAULT_MAX_REL_ERR, exceeds, worst
from pipeline.tools.drift_plot import require_matplotlib, write_heatmap
from pipeline.tools.report import emit_report, fmt_num, format_table
from pipeline.tools.run_reading import find_onnx_dir, read_json
from pipeline.tools.teacher_forcing import FreeRunning, RunFolder, TeacherForcing, check_fits

def parse_stages(text: str | None, all_stages: list[str]) -> list[str]:
    if not text:
        return all_stages
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in chosen if s not in all_stages]
    if bad:
        raise StagepipeError(f"--stages {bad[0]}: the stages are {', '.join(all_stages)}")
    return sorted(set(chosen), key=stage_sort_key)


def replay(golden: Path, candidate: Backend | None = None, candidate_run: Path | None = None,
           stages: str | None = None, steps: str | None = None, max_rel_err: float = DEFAULT_MAX_REL_ERR) -> dict:
    started = time.perf_counter()
    if candidate is None and candidate_run is None:
        raise StagepipeError("give a candidate: --onnx_dir DIR or --backend NAME (run teacher-forced), and/or "
                             "--candidate_run RUN (a free-running run or a board's dumps)")
    gold = RunFolder(golden, "golden")
    chosen = parse_steps(steps)
    picked = [(name, d, meta) for name, (d, meta) in gold.steps.items()
              if meta is not None and step_selected(chosen, meta.step)]
    if not picked:
        raise StagepipeError(f"{gold.dir}: no step with a meta.json" + (f" in --steps {steps}" if steps else ""))
    blocks = len(gold.cache_record().block_shapes) if (gold.dir / layout.KV_DIR / layout.CACHE_JSON).is_file() \
        else sum(1 for n in gold.steps[picked[0][0]][0].glob("hidden_block*.npy")) - 1
    all_stages = ["embed"] + [f"block{k}" for k in range(blocks)] + ["output"]
    chosen_stages = parse_stages(stages, all_stages)
    forced = None
    if candidate is not None:
        check_fits(gold, candidate)
        forced = TeacherForcing(gold, candidate)
    free = FreeRunning(gold, RunFolder(candidate_run, "candidate"), blocks,
                       max(meta.next_past_len for _, _, meta in picked)) if candidate_run else None
    records = []
    for name, _, meta in picked:
        introduced = forced.step(name, meta, chosen_stages) if forced else {}
        received, produced, note = free.step(name, meta, chosen_stages) if free else ({}, {}, None)
        records.append({"step": name, "mode": meta.mode, "past_len": meta.past_len, "q_len": meta.q_len,
                        "note": note, "stages": {s: {"introduced": introduced.get(s), "received": received.get(s),
                                                     "produced": produced.get(s)} for s in chosen_stages}})
    summary = [stage_summary(s, records, max_rel_err, forced is not None) for s in chosen_stages]
    report = {"golden_run": str(gold.dir), "candidate": describe(candidate) if candidate else None,
              "candidate_run": str(candidate_run) if candidate_run else None, "max_rel_err": max_rel_err,
              "teacher_forced": forced is not None, "stages": summary, "steps": records,
              "diverged_at": free.diverged_at if free else None}
    report.update(verdict(summary, records, max_rel_err, forced is not None))
    report["seconds"] = time.perf_counter() - started
    report["golden_stage_seconds"] = sum(r.seconds for _, _, meta in picked for r in meta.stages.values())
    return report


def step_verdict(cell: dict, max_rel_err: float, forced: bool) -> str:
    """introduces / inherits / ok for one (step, stage); "" when nothing was measured."""
    intro, _ = worst(cell["introduced"])
    recv, _ = worst(cell["received"])
    prod, _ = worst(cell["produced"])
    if forced:
        if intro is None:
            return ""
        return "introduces" if exceeds(intro, max_rel_err) else "inherits" if exceeds(recv, max_rel_err) else "ok"
    if prod is None and recv is None:
        return ""
    if exceeds(prod, max_rel_err) and not exceeds(recv, max_rel_err):
        return "introduces"
    return "inherits" if exceeds(recv, max_rel_err) else "ok"


def _worst_over_steps(stage: str, records: list[dict], kind: str) -> dict | None:
    best = None
    for r in records:
        errs = r["stages"][stage][kind]
        value, tensor = worst(errs)
        if value is None:
            continue
        if best is None or not value <= best["rel_err"]:
            best = {"rel_err": value, "tensor": tensor, "step": r["step"], "cosine": errs[tensor]["cosine"],
                    "max_abs": errs[tensor]["max_abs"]}
    return best


def stage_summary(stage: str, records: list[dict], max_rel_err: float, forced: bool) -> dict:
    verdicts = [step_verdict(r["stages"][stage], max_rel_err, forced) for r in records]
    for r, v in zip(records, verdicts):
        r["stages"][stage]["verdict"] = v
    cosines = [e["cosine"] for r in records for e in (r["stages"][stage]["introduced"] or {}).values()
               if e["cosine"] is not None]
    first = next((r["step"] for r, v in zip(records, verdicts) if v == "introduces"), None)
    verdict_text = "INTRODUCES" if first else "inherits" if "inherits" in verdicts else \
        "ok" if "ok" in verdicts else "-"
    return {"stage": stage, "verdict": verdict_text, "first_introduced_at": first,
            "introduced": _worst_over_steps(stage, records, "introduced"),
            "introduced_cosine_min": min(cosines) if cosines else None,
            "received": _worst_over_steps(stage, records, "received"),
            "produced": _worst_over_steps(stage, records, "produced")}


def verdict(summary: list[dict], records: list[dict], max_rel_err: float, forced: bool) -> dict:
    """ok, and the stage to blame: the worst teacher-forced error over the tolerance, or (dumps only) the first
    stage whose outputs drift while its inputs did not."""
    culprits = [s for s in summary if s["verdict"] == "INTRODUCES"]
    if not culprits:
        return {"ok": True, "worst_stage": None}
    if forced:
        s = max(culprits, key=lambda s: float("inf") if s["introduced"]["rel_err"] != s["introduced"]["rel_err"]
                else s["introduced"]["rel_err"])
        w = s["introduced"]
        return {"ok": False, "worst_stage": {"stage": s["stage"], "step": w["step"], "tensor": w["tensor"],
                                             "rel_err": w["rel_err"], "how": "teacher-forced"}}
    for r in records:  # time order, then pipeline order
        for stage, cell in r["stages"].items():
            if cell.get("verdict") == "introduces":
                value, tensor = worst(cell["produced"])
                return {"ok": False, "worst_stage": {"stage": stage, "step": r["step"], "tensor": tensor,
                                                     "rel_err": value, "how": "candidate run (dumps)"}}
    return {"ok": True, "worst_stage": None}


# -- output -------------------------------------------------------------------------------------------------------
def _err(e: dict | None, with_step: bool = True) -> list:
    if e is None:
        return ["-", "", ""] if with_step else ["-", ""]
    cells = [fmt_num(e["rel_err"]), (e["tensor"] or "").removesuffix(".npy")]
    return cells + [e["step"]] if with_step else cells


def print_report(r: dict, per_step: bool = False):
    print(f"golden:    {r['golden_run']}  ({len(r['steps'])} steps)")
    if r["candidate"]:
        print(f"candidate: {r['candidate']}, teacher-forced on the golden inputs")
    if r["candidate_run"]:
        print(f"candidate run: {r['candidate_run']} (free-running: the errors each stage received and produced)")
    print(f"error: |candidate - golden| / |golden| over real rows; tolerance --max_rel_err {r['max_rel_err']:g}")
    print()
    headers = ["stage", "introduced", "tensor", "at", "cos min", "received", "tensor", "at", "produced", "tensor",
               "verdict"]
    rows = []
    for s in r["stages"]:
        cos = s["introduced_cosine_min"]
        rows.append([s["stage"], *_err(s["introduced"]), "-" if cos is None else f"{cos:.6f}",
                     *_err(s["received"]), *_err(s["produced"], with_step=False), s["verdict"]])
    print(format_table(headers, rows, right={1, 4, 5, 8}))
    if r["diverged_at"]:
        print(f"\nthe candidate run's tokens differ from {r['diverged_at']} on: later steps are not compared")
    if per_step:
        print_per_step(r)
    print()
    w = r["worst_stage"]
    if w:
        bar = "=" * 78
        print(bar)
        print(f"FAIL: {w['stage']} introduces the largest error: rel err {fmt_num(w['rel_err'])} > "
              f"{r['max_rel_err']:g} ({w['tensor']}, {w['step']}; {w['how']})")
        print(bar)
    else:
        print(f"OK: no stage introduces an error over {r['max_rel_err']:g}")


def _matrix(r: dict, kind: str) -> np.ndarray:
    stages = [s["stage"] for s in r["stages"]]
    m = np.full((len(r["steps"]), len(stages)), np.nan)
    for i, rec in enumerate(r["steps"]):
        for j, st in enumerate(stages):
            value, _ = worst(rec["stages"][st][kind])
            if value is not None:
                m[i, j] = value
    return m


def _panels(r: dict) -> list[tuple[str, np.ndarray]]:
    kinds = ([("introduced", "introduced (teacher-forced)")] if r["teacher_forced"] else []) + \
        ([("received", "received (candidate run)"), ("produced", "produced (candidate run)")]
         if r["candidate_run"] else [])
    return [(title, _matrix(r, kind)) for kind, title in kinds]


def print_per_step(r: dict):
    stages = [s["stage"] for s in r["stages"]]
    for title, m in _panels(r):
        print(f"\n{title}, per step:")
        rows = [[rec["step"], rec["mode"], rec["past_len"]] + ["-" if np.isnan(v) else f"{v:.1e}" for v in m[i]]
                for i, rec in enumerate(r["steps"])]
        print(format_table(["step", "mode", "past"] + stages, rows, right=set(range(2, 3 + len(stages)))))


def plot(r: dict, out: Path):
    write_heatmap(out, _panels(r), [rec["step"] for rec in r["steps"]], [s["stage"] for s in r["stages"]],
                  r["max_rel_err"], f"{r['candidate'] or r['candidate_run']} vs golden {r['golden_run']}")


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="python -m pipeline.replay", description=__doc__.split("\n")[0])
    p.add_argument("golden_run", type=Path, help="the golden run folder (run_auto on the fp32 graphs)")
    add_candidate_arguments(p, "the golden run's onnx_dir")
    p.add_argument("--candidate_run", type=Path, default=None,
                   help="a free-running run of the candidate (or a board's dumps in the same layout)")
    p.add_argument("--stages", default=None, help="only these stages, e.g. block0,block1 (default: all)")
    p.add_argument("--steps", default=None, help="only these steps, e.g. 0-40 or 0-3,7 (default: all)")
    p.add_argument("--max_rel_err", type=float, default=DEFAULT_MAX_REL_ERR,
                   help=f"tolerance on the relative error a stage introduces (default {DEFAULT_MAX_REL_ERR:g})")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the report as JSON ('-': print it)")
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help="heat map of the errors, step x stage")
    p.add_argument("--per_step", action="store_true", help="also print the step x stage error tables")
    a = p.parse_args(argv)
    if a.max_rel_err < 0:
        raise StagepipeError("--max_rel_err must be >= 0")
    if a.plot is not None:
        require_matplotlib()
    default_dir = find_onnx_dir(a.golden_run, read_json(a.golden_run / layout.RUN_JSON)) \
        if a.golden_run.is_dir() else None
    candidate = open_candidate(a, default_dir)
    report = replay(a.golden_run, candidate, a.candidate_run, a.stages, a.steps, a.max_rel_err)
    def text(r):
        print_report(r, a.per_step)
        print(f"replayed {len(r['steps'])} steps in {r['seconds']:.2f}s (the golden run's stages took "
              f"{r['golden_stage_seconds']:.2f}s)")

    emit_report(report, a.json, text, a.plot, plot, what="heat map")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
