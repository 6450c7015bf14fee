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
from pipeline.core.jsonfile import load_model_file
from pipeline.core.layout import LOGITS, PRESENT_KEY, PRESENT_VALUE, hidden_file, stage_sort_key, step_dirs
from pipeline.core.tensors import load_tensor
from pipeline.runtime.backends import Backend
from pipeline.runtime.kv_cache import block_shape
from pipeline.runtime.plan import hidden_dtype, step_inputs, window_for
from pipeline.tools.candidate import add_candidate_arguments, describe, open_candidate, parse_steps, step_selected
from pipeline.tools.drift import DEFAULT_MAX_REL_ERR, SlotErrors, exceeds, tensor_error, worst
from pipeline.tools.drift_plot import require_matplotlib, write_heatmap
from pipeline.tools.run_reading import find_onnx_dir, read_json
from pipeline.tools.report import emit_report, fmt_num, format_table
from schemas.run import CacheRecord, StepMeta

PAST = {"key": "past_key", "value": "past_value"}


class RunFolder:
    """A run folder's steps (meta.json each) and its KV cache files, read-only."""

    def __init__(self, path: Path, what: str):
        self.dir = Path(path)
        if not layout.looks_like_run_dir(self.dir):
            raise StagepipeError(f"{self.dir}: not a run folder (run.json, step_NNNN/); give the {what} run's folder")
        self.steps: dict[str, tuple[Path, StepMeta | None]] = {}
        for d in step_dirs(self.dir):
            meta = d / layout.META
            self.steps[d.name] = (d, load_model_file(meta, StepMeta) if meta.is_file() else None)
        if not self.steps:
            raise StagepipeError(f"{self.dir}: has no step folders")
        self._cache: dict[tuple[str, int], np.ndarray | None] = {}

    def tensor(self, step: str, name: str) -> np.ndarray:
        return load_tensor(self.steps[step][0] / name, what=name)

    def has(self, step: str, name: str) -> bool:
        return step in self.steps and (self.steps[step][0] / name).is_file()

    def cache(self, kind: str, k: int) -> np.ndarray | None:
        """The final (Lk,1,KV,C,D) cache of block k, memory-mapped; None when the folder has none."""
        if (kind, k) not in self._cache:
            path = self.dir / layout.KV_DIR / layout.kv_file(kind, k)
            try:
                self._cache[kind, k] = np.load(path, mmap_mode="r") if path.is_file() else None
            except (ValueError, OSError) as e:
                raise StagepipeError(f"{path}: not a readable .npy ({e})") from None
        return self._cache[kind, k]

    def cache_record(self) -> CacheRecord:
        return load_model_file(self.dir / layout.KV_DIR / layout.CACHE_JSON, CacheRecord)


def check_fits(gold: RunFolder, candidate: Backend):
    """The candidate's graphs must take the golden run's tensors as they are: same T, C, block split and
    cache shapes, hidden size and vocabulary. Precision, kv_dtype and attention windows may differ."""
    m = candidate.manifest
    meta = next(meta for _, meta in gold.steps.values() if meta is not None)
    where = f"candidate {candidate.onnx_dir}"
    if (meta.max_input_len, meta.max_cache_len) != (m.max_input_len, m.max_cache_len):
        raise StagepipeError(f"{where} has max_input_len/max_cache_len {m.max_input_len}/{m.max_cache_len}, the "
                             f"golden run {meta.max_input_len}/{meta.max_cache_len}; convert it with those")
    shapes = gold.cache_record().block_shapes
    mine = [list(block_shape(m, k)) for k in range(len(m.blocks))]
    if shapes != mine:
        raise StagepipeError(f"{where}: its blocks' caches are {mine}, the golden run's {shapes}; convert it from "
                             "the same model with the same --blocks/--layer_split")
    first = next(iter(gold.steps))
    H, V = gold.tensor(first, hidden_file(0)).shape[2], gold.tensor(first, LOGITS).shape[2]
    if (H, V) != (m.model.hidden_size, m.model.vocab_size):
        raise StagepipeError(f"{where}: hidden size/vocabulary {m.model.hidden_size}/{m.model.vocab_size}, the "
                             f"golden run's {H}/{V}")


class TeacherForcing:
    """Runs each candidate stage on the golden inputs of a step, the golden cache as it was before the step."""

    def __init__(self, gold: RunFolder, candidate: Backend):
        self.gold, self.candidate = gold, candidate
        m = candidate.manifest
        self.blocks = len(m.blocks)
        self.hidden_dtype, kv = hidden_dtype(m), np.dtype(m.kv_dtype)
        for k in range(self.blocks):
            for kind in layout.KV_KINDS:
                if gold.cache(kind, k) is None:
                    raise StagepipeError(f"{gold.dir / layout.KV_DIR}: golden cache file {layout.kv_file(kind, k)} "
                                         "is missing; replay needs the golden run's kv_cache")
        # the cache before the current step: golden slots [0, filled), zeros above (a fresh cache's content)
        self.work = {(kind, k): np.zeros(block_shape(m, k), kv) for k in range(self.blocks) for kind in layout.KV_KINDS}
        self.filled = 0

    def advance(self, past_len: int):
        for (kind, k), work in self.work.items():
            if past_len > self.filled:
                work[:, :, :, self.filled:past_len] = self.gold.cache(kind, k)[:, :, :, self.filled:past_len]
            else:
                work[:, :, :, past_len:self.filled] = 0
        self.filled = past_len

    def mask(self, step: str, meta: StepMeta) -> np.ndarray:
        """The golden mask, or the same one laid out for the candidate's window when its windows differ."""
        m = self.candidate.manifest
        golden = self.gold.tensor(step, layout.ATTENTION_MASK)
        W = window_for(m, meta.next_past_len)
        if W == golden.shape[3] - golden.shape[2]:
            return golden
        return step_inputs(meta.input_token_ids, meta.past_len, golden.shape[2], W, m.mask_value)[1]

    def step(self, step: str, meta: StepMeta, stages: list[str]) -> dict[str, dict]:
        """{stage: {tensor: error}} for one golden step."""
        g, c = self.gold, self.candidate
        p, q = meta.past_len, meta.q_len
        self.advance(p)
        ids, positions = g.tensor(step, layout.INPUT_IDS), g.tensor(step, layout.POSITION_IDS)
        mask = self.mask(step, meta) if any(s.startswith("block") for s in stages) else None
        hidden = lambda k: g.tensor(step, hidden_file(k))  # noqa: E731
        out = {}
        if "embed" in stages:
            out["embed"] = {hidden_file(0): tensor_error(c.embed(ids)[:, :q], hidden(0)[:, :q])}
        for k in range(self.blocks):
            if f"block{k}" not in stages:
                continue
            h, present_key, present_value = c.block(k, hidden(k).astype(self.hidden_dtype), mask, positions,
                                                    self.work["key", k], self.work["value", k])
            out[f"block{k}"] = {
                hidden_file(k + 1): tensor_error(h[:, :q], hidden(k + 1)[:, :q]),
                PRESENT_KEY: tensor_error(present_key[:, :, :, :q], g.cache("key", k)[:, :, :, p:p + q]),
                PRESENT_VALUE: tensor_error(present_value[:, :, :, :q], g.cache("value", k)[:, :, :, p:p + q])}
        if "output" in stages:
            golden_logits, h = g.tensor(step, LOGITS), hidden(self.blocks)
            last_row = golden_logits.shape[1] == 1 and h.shape[1] > 1  # the head ran on the last real row only
            logits = c.output((h[:, q - 1:q] if last_row else h).astype(self.hidden_dtype))
            rows = 1 if last_row else q
            out["output"] = {LOGITS: tensor_error(logits[:, :rows], golden_logits[:, :rows])}
        return out


class FreeRunning:
    """A free-running candidate run against the golden one: what each stage received and produced."""

    def __init__(self, gold: RunFolder, cand: RunFolder, blocks: int, slots: int):
        self.gold, self.cand, self.blocks, self.slots = gold, cand, blocks, slots
        self._slot_errors: dict[tuple[str, int], SlotErrors | None] = {}
        self.diverged_at: str | None = None

    def slot_errors(self, kind: str, k: int) -> SlotErrors | None:
        if (kind, k) not in self._slot_errors:
            a, b = self.cand.cache(kind, k), self.gold.cache(kind, k)
            fits = a is not None and b is not None and a.shape == b.shape
            self._slot_errors[kind, k] = SlotErrors(a, b, self.slots) if fits else None
        return self._slot_errors[kind, k]

    def same_inputs(self, step: str, meta: StepMeta) -> bool:
        _, cmeta = self.cand.steps[step]
        if cmeta is not None:
            return (cmeta.past_len, cmeta.input_token_ids) == (meta.past_len, meta.input_token_ids)
        if self.cand.has(step, layout.INPUT_IDS):  # dumps without meta.json: the ids tell
            return bool(np.array_equal(self.cand.tensor(step, layout.INPUT_IDS)[:, :meta.q_len],
                                       self.gold.tensor(step, layout.INPUT_IDS)[:, :meta.q_len]))
        return True

    def step(self, step: str, meta: StepMeta, stages: list[str]) -> tuple[dict, dict, str | None]:
        """({stage: received errors}, {stage: produced errors}, note) for one step."""
        if step not in self.cand.steps:
            return {}, {}, "not in the candidate run"
        if self.diverged_at is None and not self.same_inputs(step, meta):
            self.diverged_at = step
        if self.diverged_at is not None:
            return {}, {}, f"the candidate run's tokens differ from {self.diverged_at} on"
        p, q = meta.past_len, meta.q_len

        def hidden(k):
            name = hidden_file(k)
            if not self.cand.has(step, name):
                return {}
            return {name: tensor_error(self.cand.tensor(step, name)[:, :q], self.gold.tensor(step, name)[:, :q])}

        def cache(k, lo, hi, named):
            errs = {}
            for kind in layout.KV_KINDS:
                if hi <= lo:
                    continue
                se = self.slot_errors(kind, k)
                if se is None:
                    continue
                if lo == 0:
                    errs[named[kind]] = se.prefix(hi)
                else:
                    errs[named[kind]] = tensor_error(self.cand.cache(kind, k)[:, :, :, lo:hi],
                                                     self.gold.cache(kind, k)[:, :, :, lo:hi])
            return errs

        received, produced = {}, {}
        for stage in stages:
            if stage == "embed":
                received[stage] = {layout.INPUT_IDS: tensor_error(np.zeros(1), np.zeros(1))}  # same ids (checked)
                produced[stage] = hidden(0)
            elif stage == "output":
                received[stage] = hidden(self.blocks)
                produced[stage] = self._logits(step, q)
            else:
                k = int(stage[5:])
                received[stage] = {**hidden(k), **cache(k, 0, p, PAST)}
                produced[stage] = {**hidden(k + 1), **cache(k, p, p + q, {"key": PRESENT_KEY, "value": PRESENT_VALUE})}
        return received, produced, None

    def _logits(self, step: str, q: int) -> dict:
        if not self.cand.has(step, LOGITS):
            return {}
        a, b = self.cand.tensor(step, LOGITS), self.gold.tensor(step, LOGITS)
        if a.shape[1] != b.shape[1] and min(a.shape[1], b.shape[1]) == 1:  # --full_logits on one side only
            a, b = (a[:, q - 1:q], b) if a.shape[1] > 1 else (a, b[:, q - 1:q])
        rows = min(q, a.shape[1])
        return {LOGITS: tensor_error(a[:, :rows], b[:, :rows])}


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
