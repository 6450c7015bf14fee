"""Conformance suite: the cases static-shape ports get wrong, each checked against the golden fp32 graphs.

    python -m pipeline.conformance (--onnx_dir CANDIDATE | --backend NAME) [--golden FP32_ONNX_DIR]
                                   [--only window,cache] [--max_rel_err 0.01] [--baseline_factor 4] [--json]

Cases, from the candidate's T (max_input_len), C (max_cache_len) and attention windows W:

    baseline        a T/2-token prompt and 2 decode steps inside the first window: the candidate's usual error
    prompt_T-1 ..   prompts of T-1, T, T+1 and 2T+1 tokens (1, 1, 2 and 3 prefill chunks), then 2 decode steps
    window<W>_W-1   one decode step with W-1, W and W+1 tokens in the cache: the last step inside window W and
      _W, _W+1      the first two past its edge (each window but C)
    cache_C-1       a T-token chunk fills the cache to C-1 slots, then a decode step fills it: stop cache_full
    cache_C         a T-token chunk fills the cache to exactly C slots: stop cache_full, no slot past C
    multiturn       two prompts prefilled back to back over one cache (the second starts mid-chunk), a decode
                    step between them and 2 after
    positions       a (T+1)-token prompt and 2 decode steps at positions ending at C-1 (RoPE far from zero)

Tokens already in the cache when a case starts come from the golden graphs (one teacher-forced pass over a fixed
pseudo-random sequence), copied into both caches; then the golden graphs and the candidate run the case's steps
on the same token ids, each on its own cache, and every stage output is compared: hidden states, the present
K/V rows, the logits of the last real row, and the greedy token. The in-memory loop runs the steps
(pipeline.runtime.generate.forward_step), so nothing is written to disk.

A case fails when a tensor's relative error exceeds its bound, a tensor is NaN/Inf or has the wrong shape, the
candidate raises, or the stop differs. The bound is --max_rel_err, or for a candidate that differs from the
golden graphs everywhere (a quantized one) --baseline_factor times its error in the baseline case, whichever is
larger: a boundary case fails when it is markedly worse than the candidate's usual error. That is all a comparison
with fp32 can tell when the candidate's own error is large (int4 graphs of a random-weight model differ by ~0.6
everywhere): check a port's semantics with its float graphs first. Tokens are shown beside: a token differs
only where the logits do.

Exit status: 1 when a case fails, 0 otherwise, 2 for bad input.
"""
from __future__ import annotations

import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.cli_args import ArgumentParser
from pipeline.core.errors import StagepipeError, cli_entry, stdout_may_close
from pipeline.core.jsonfile import load_manifest
from pipeline.core.layout import PRESENT_KEY, PRESENT_VALUE
from pipeline.runtime.backends import Backend, OnnxBackend
from pipeline.runtime.compat import why_not_interchangeable
from pipeline.runtime.generate import MemoryKVCache, forward_step, prompt_chunks
from pipeline.tools.candidate import add_candidate_arguments, describe, open_candidate
from pipeline.tools.drift import DEFAULT_MAX_REL_ERR, exceeds, tensor_error
from pipeline.tools.report import dump_json, fmt_num

DEFAULT_BASELINE_FACTOR = 2.0
SEED = 0


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    history: int  # cache slots filled (by the golden graphs) before the case's first step
    steps: tuple[int, ...]  # tokens per step
    position_offset: int = 0


def _prompt(n: int, T: int) -> tuple[int, ...]:
    return tuple(len(c) for c in prompt_chunks(list(range(n)), T))


def cases_for(m) -> list[Case]:
    T, C = m.max_input_len, m.max_cache_len
    half = max(1, T // 2)
    cases = [Case("baseline", f"{half}-token prompt + 2 decode steps inside the first window", 0,
                  _prompt(half, T) + (1, 1))]
    for label, n in (("T-1", T - 1), ("T", T), ("T+1", T + 1), ("2T+1", 2 * T + 1)):
        if n >= 1 and n + 2 <= C:
            chunks = _prompt(n, T)
            cases.append(Case(f"prompt_{label}", f"{n}-token prompt ({len(chunks)} prefill chunk"
                              f"{'s' if len(chunks) > 1 else ''}) + 2 decode steps", 0, chunks + (1, 1)))
    for W in m.windows()[:-1]:
        for label, p in (("W-1", W - 1), ("W", W), ("W+1", W + 1)):
            where = "the last step inside window" if p < W else "past the edge of window"
            cases.append(Case(f"window{W}_{label}", f"decode step with {p} tokens in the cache ({where} {W})",
                              p, (1,)))
    if C - 1 - T >= 0:
        cases.append(Case("cache_C-1", f"{T}-token chunk fills the cache to C-1={C - 1}, a decode step to C",
                          C - 1 - T, (T, 1)))
    cases.append(Case("cache_C", f"{T}-token chunk fills the cache to exactly C={C}", C - T, (T,)))
    first, second = T + 3, T + 2
    if first + 1 + second + 2 <= C:
        cases.append(Case("multiturn", f"{first}-token prompt, decode, {second}-token prompt from slot {first + 1} "
                          "(mid-chunk), 2 decodes", 0,
                          _prompt(first, T) + (1,) + _prompt(second, T) + (1, 1)))
    n = T + 1
    if n + 2 <= C:
        cases.append(Case("positions", f"{n}-token prompt + 2 decode steps at positions {C - n - 2}..{C - 1}", 0,
                          _prompt(n, T) + (1, 1), position_offset=C - n - 2))
    return cases


def select_cases(cases: list[Case], only: str | None) -> list[Case]:
    """--only a,b: the cases whose name contains any of the words (the baseline always runs)."""
    if not only:
        return cases
    words = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [c for c in cases if c.name == "baseline" or any(w in c.name for w in words)]
    if len(chosen) == 1 and words:
        raise StagepipeError(f"--only {only}: no case matches; the cases are {', '.join(c.name for c in cases)}")
    return chosen


def golden_history(golden: Backend, slots: int) -> MemoryKVCache:
    """The golden cache after prefilling `slots` pseudo-random tokens (a case's "before" cache is any prefix)."""
    cache = MemoryKVCache(golden.manifest)
    tokens = np.random.default_rng(SEED).integers(0, golden.manifest.model.vocab_size, slots).tolist()
    past = 0
    for chunk in prompt_chunks(tokens, golden.manifest.max_input_len):
        forward_step(golden, cache, chunk, past)
        past += len(chunk)
    return cache


def _start_cache(backend: Backend, history: MemoryKVCache | None, slots: int) -> MemoryKVCache:
    cache = MemoryKVCache(backend.manifest)
    if slots:
        for mine, theirs in ((cache.keys, history.keys), (cache.values, history.values)):
            for k, arr in enumerate(mine):
                arr[:, :, :, :slots] = theirs[k][:, :, :, :slots]
    return cache


def _real_rows(name: str, array: np.ndarray, q: int) -> np.ndarray:
    """The rows of a traced tensor that hold real tokens (logits come for the last real row only)."""
    if name in (PRESENT_KEY, PRESENT_VALUE):
        return array[:, :, :, :q]
    return array if name.startswith("logits") else array[:, :q]


def run_case(case: Case, golden: Backend, candidate: Backend, history: MemoryKVCache | None) -> dict:
    """The case's steps on both backends; every traced tensor's error, the tokens and the stop."""
    C = candidate.manifest.max_cache_len
    vocab = golden.manifest.model.vocab_size
    tokens = np.random.default_rng(zlib.crc32(case.name.encode())).integers(0, vocab, sum(case.steps)).tolist()
    gcache, ccache = _start_cache(golden, history, case.history), _start_cache(candidate, history, case.history)
    steps, past, used, error = [], case.history, 0, None
    for i, q in enumerate(case.steps):
        chunk, used = tokens[used:used + q], used + q
        seen: dict[tuple[str, str], np.ndarray] = {}
        errors: list[dict] = []

        def record(stage, name, array):
            seen[stage, name] = _real_rows(name, array, q).copy()

        def check(stage, name, array):
            err = tensor_error(_real_rows(name, array, q), seen[stage, name])
            errors.append({"stage": stage, "tensor": name, **err})

        glogits = forward_step(golden, gcache, chunk, past, trace=record, position_offset=case.position_offset)
        try:
            clogits = forward_step(candidate, ccache, chunk, past, trace=check, position_offset=case.position_offset)
        except Exception as e:  # a port that breaks at a boundary fails the case, whatever it raises
            message = (str(e).splitlines() or [""])[0]
            error = f"step {i} (past {past}, {q} tokens): the candidate raised {type(e).__name__}: " + \
                (message[:200] + " ..." if len(message) > 200 else message)
            break
        steps.append({"step": i, "past_len": past, "q_len": q, "tensors": errors,
                      "token": int(np.argmax(clogits)), "golden_token": int(np.argmax(glogits))})
        past += q
    stop = "cache_full" if past >= C else "max_steps"
    return {"case": case.name, "what": case.what, "history": case.history, "steps": steps, "error": error,
            "stop": stop, "golden_stop": "cache_full" if past >= golden.manifest.max_cache_len else "max_steps",
            "slots_filled": past}


def worst_error(result: dict) -> float:
    values = [t["rel_err"] for s in result["steps"] for t in s["tensors"]]
    return max(values, default=0.0)


def judge(result: dict, bound: float):
    """Sets pass, bound and the first failing tensor (in step, then pipeline order)."""
    first = None
    for s in result["steps"]:
        for t in s["tensors"]:
            why = t["reason"] or (f"{t['nonfinite']} NaN/Inf values" if t["nonfinite"] else None) or \
                (f"rel err {fmt_num(t['rel_err'])} > {bound:.3g}" if exceeds(t["rel_err"], bound) else None)
            if why and first is None:
                first = {"step": s["step"], "past_len": s["past_len"], "stage": t["stage"], "tensor": t["tensor"],
                         "reason": why}
    if first is None and result["error"]:
        first = {"step": None, "stage": None, "tensor": None, "reason": result["error"]}
    if first is None and result["stop"] != result["golden_stop"]:
        first = {"step": None, "stage": None, "tensor": None,
                 "reason": f"stop {result['stop']}, golden {result['golden_stop']}"}
    tokens = [(s["token"], s["golden_token"]) for s in result["steps"]]
    result.update(bound=bound, worst_rel_err=worst_error(result), first_failure=first, passed=first is None,
                  tokens_equal=sum(a == b for a, b in tokens), tokens=len(tokens))


def conformance(golden: Backend, candidate: Backend, only: str | None = None,
                max_rel_err: float = DEFAULT_MAX_REL_ERR, baseline_factor: float = DEFAULT_BASELINE_FACTOR,
                log=None) -> dict:
    started = time.perf_counter()
    why = why_not_interchangeable(golden.manifest, candidate.manifest, windows=False)
    if why:
        raise StagepipeError(f"candidate {candidate.onnx_dir} {why}")
    cases = select_cases(cases_for(candidate.manifest), only)
    slots = max(c.history for c in cases)
    history = golden_history(golden, slots) if slots else None
    history_s = time.perf_counter() - started
    results, baseline = [], None
    for case in cases:
        result = run_case(case, golden, candidate, history)
        if case.name == "baseline":
            judge(result, max_rel_err)
            baseline = result["worst_rel_err"]
        else:
            judge(result, max(max_rel_err, baseline_factor * baseline))
        results.append(result)
        if log:
            log(case_line(result))
    return {"golden": describe(golden), "candidate": describe(candidate), "max_rel_err": max_rel_err,
            "baseline_factor": baseline_factor, "baseline_rel_err": baseline, "history_slots": slots,
            "history_seconds": history_s, "seconds": time.perf_counter() - started, "cases": results,
            "failed": [r["case"] for r in results if not r["passed"]],
            "ok": all(r["passed"] for r in results)}


def case_line(r: dict) -> str:
    status = "PASS" if r["passed"] else "FAIL"
    f = r["first_failure"]
    if f is None:
        detail = f"worst rel err {fmt_num(r['worst_rel_err'])} (bound {r['bound']:.3g})"
    elif f["tensor"]:
        detail = f"step {f['step']} (past {f['past_len']}) {f['stage']} {f['tensor']}: {f['reason']}"
    else:
        detail = f["reason"]
    return f"{status}  {r['case']:<14} {r['what']:<78} tokens {r['tokens_equal']}/{r['tokens']}  {detail}"


def golden_dir_for(golden: Path | None, candidate_dir: Path | None) -> Path:
    if golden is not None:
        return golden
    if candidate_dir is not None and load_manifest(candidate_dir).precision == "fp32":
        return candidate_dir
    raise StagepipeError("give --golden FP32_ONNX_DIR: the fp32 graphs of the same model to check against")


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="python -m pipeline.conformance", description=__doc__.split("\n")[0])
    add_candidate_arguments(p, "--golden")
    p.add_argument("--golden", type=Path, default=None,
                   help="the golden fp32 onnx_dir of the same model (default: --onnx_dir when it is fp32)")
    p.add_argument("--only", default=None, help="only the cases whose name contains one of these words, "
                                                "e.g. window,cache (the baseline always runs)")
    p.add_argument("--max_rel_err", type=float, default=DEFAULT_MAX_REL_ERR,
                   help=f"tolerance on any tensor's relative error (default {DEFAULT_MAX_REL_ERR:g})")
    p.add_argument("--baseline_factor", type=float, default=DEFAULT_BASELINE_FACTOR,
                   help="a case may also reach this many times the baseline case's error "
                        f"(default {DEFAULT_BASELINE_FACTOR:g}; 0: --max_rel_err only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    if a.onnx_dir is None and a.backend is None:
        raise StagepipeError("give the candidate: --onnx_dir DIR and/or --backend NAME")
    golden_dir = golden_dir_for(a.golden, a.onnx_dir)
    golden = OnnxBackend(golden_dir, process_pool=True)
    if golden.manifest.precision != "fp32":
        raise StagepipeError(f"--golden {golden_dir}: holds {golden.manifest.precision} graphs; give fp32 ones")
    candidate = open_candidate(a, golden_dir)
    with stdout_may_close():
        if not a.json:
            print(f"golden:    {describe(golden)}")
            print(f"candidate: {describe(candidate)}")
        report = conformance(golden, candidate, a.only, a.max_rel_err, a.baseline_factor,
                             log=None if a.json else lambda line: print(line, flush=True))
        if a.json:
            print(dump_json(report))
        else:
            base = report["baseline_rel_err"]
            print(f"{len(report['cases'])} cases in {report['seconds']:.1f}s (golden history of "
                  f"{report['history_slots']} tokens: {report['history_seconds']:.1f}s); baseline rel err "
                  f"{fmt_num(base)}, bound max({a.max_rel_err:g}, {a.baseline_factor:g} x baseline)")
            print(f"FAIL: {len(report['failed'])} case(s): {', '.join(report['failed'])}" if report["failed"]
                  else "OK: every case conforms")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
