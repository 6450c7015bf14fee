"""Compare two runs (or two step folders) tensor by tensor and name the first one that drifts.

    python -m pipeline.compare RUN_A RUN_B [--atol 1e-3] [--rtol 1e-3] [--min_cosine 0.999]
                               [--json OUT.json | --json -] [--plot OUT.png] [--html OUT.html] [--strict]

For every step folder the two runs share, every .npy file present in both is compared, in pipeline order
(input_ids, attention_mask, position_ids, hidden_block0..N, logits): max abs error, MSE and cosine similarity.
hidden_block*/logits are compared over the step's real rows only (the first q_len of T rows: prefill padding rows
are excluded); input_ids/attention_mask/position_ids must be equal. A tensor exceeds the tolerance when
not np.allclose(a, b, atol, rtol) (B is the reference: |a - b| <= atol + rtol * |b|), or its cosine is below
--min_cosine, or its shapes differ (except prefill logits kept for all T rows against the last real row only,
(1,T,V) vs (1,1,V): row q_len-1 is compared), or a file is unreadable. The sampled tokens are listed side by side.

--html writes the compare view (a step x tensor heat map with the first divergence marked; click a cell for its
error histogram and worst positions) as one self-contained HTML file: data and chart library inlined, no network.

Exit status: 1 when any tensor exceeds (the first one, in time and pipeline order, is named), 0 otherwise,
2 for a usage error (missing run, no step in common). Steps or tensor files present in one run only are reported
and compared no further; --strict counts them as failures too.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.cli_args import ArgumentParser
from pipeline.core.errors import StagepipeError, cli_entry
from pipeline.core.layout import INPUT_FILES, LOGITS, VISION, hidden_index, step_dirs, step_number, tensor_sort_key
from pipeline.core.layout import writer_stage as stage_of
from pipeline.tools.run_reading import classify, load_step_meta, open_npy, run_tokenizer, step_next_token, token_text
from pipeline.tools.drift_plot import require_matplotlib, write_plot
from pipeline.tools.report import emit_report, fmt_num, format_table

EXACT_FILES = set(INPUT_FILES)  # compared for equality
CHUNK = 1 << 21  # elements compared at a time


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-3
    rtol: float = 1e-3
    min_cosine: float = 0.999


def has_token_rows(name: str) -> bool:
    """hidden_block*.npy and logits.npy are (1, T, ...) with one row per token (padding rows at the end)."""
    return hidden_index(name) is not None or name == LOGITS


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def metrics(a: np.ndarray, b: np.ndarray, tol: Tolerance, exact: bool) -> dict:
    """max abs error, MSE, cosine, allclose and the worst element of two same-shape arrays.

    Reduced CHUNK elements at a time in float64, so memory stays flat however large the logits. The worst element
    is the one that most exceeds atol + rtol * |b| (for an exact check: the largest difference), NaN first."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = fa.size
    max_abs, sq, dot, na2, nb2, nan_a, nan_b = 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0
    close, worst_at, worst, has_nan = True, 0, -np.inf, False
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, n, CHUNK):
            ca = np.asarray(fa[start:start + CHUNK], dtype=np.float64)
            cb = np.asarray(fb[start:start + CHUNK], dtype=np.float64)
            diff = np.abs(ca - cb)
            max_abs = max(max_abs, float(diff.max()))  # NaN propagates: max(x, nan) is x, so check below
            if np.isnan(diff).any():
                has_nan = True
            sq += float(np.dot(diff, diff))
            dot += float(np.dot(ca, cb))
            na2 += float(np.dot(ca, ca))
            nb2 += float(np.dot(cb, cb))
            nan_a += int(np.isnan(ca).sum())
            nan_b += int(np.isnan(cb).sum())
            if exact:
                ok = (np.asarray(fa[start:start + CHUNK]) == np.asarray(fb[start:start + CHUNK]))
                excess = diff
            else:
                ok = np.isclose(ca, cb, atol=tol.atol, rtol=tol.rtol)
                excess = diff - (tol.atol + tol.rtol * np.abs(cb))
            excess = np.where(np.isnan(excess) | (~ok & ~np.isfinite(excess)), np.inf, excess)
            if not ok.all():
                close = False
                excess = np.where(ok, -np.inf, excess)  # point at an element that fails
            i = int(np.argmax(excess))
            if excess[i] > worst:
                worst, worst_at = float(excess[i]), start + i
    if na2 == 0.0 and nb2 == 0.0:
        cosine = 1.0
    elif na2 == 0.0 or nb2 == 0.0:
        cosine = 0.0
    else:
        cosine = dot / (np.sqrt(na2) * np.sqrt(nb2))
    index = [int(i) for i in np.unravel_index(worst_at, a.shape)] if n else []
    if has_nan:
        max_abs = float("nan")
    return {"max_abs_err": max_abs, "mse": sq / n if n else 0.0, "cosine": float(cosine), "allclose": close,
            "worst_index": index, "nan_a": nan_a, "nan_b": nan_b}


def compare_tensor(path_a: Path, path_b: Path, rows: int | None, tol: Tolerance) -> dict:
    name = path_a.name
    exact = name in EXACT_FILES
    entry = {"file": name, "stage": stage_of(name), "shape_a": None, "shape_b": None, "dtype_a": None,
             "dtype_b": None, "check": "equal" if exact else "close", "real_rows": None, "max_abs_err": None,
             "mse": None, "cosine": None, "allclose": None, "worst_index": None, "exceeds": False, "reason": None,
             "note": None}
    try:
        a, b = open_npy(path_a), open_npy(path_b)
    except StagepipeError as e:  # a damaged tensor file fails that tensor, not the whole comparison
        entry.update(exceeds=True, reason=f"unreadable: {e}")
        return entry
    entry.update(shape_a=list(a.shape), shape_b=list(b.shape), dtype_a=str(a.dtype), dtype_b=str(b.dtype))
    notes = [f"dtype {a.dtype} vs {b.dtype}"] if a.dtype != b.dtype else []
    a, b, row_note, real_rows = align_pair(name, a, b, rows)
    entry["note"] = "; ".join(notes + [row_note] if row_note else notes) or None
    if a.shape != b.shape:
        entry.update(exceeds=True, reason=f"shape {_shape(a.shape)} vs {_shape(b.shape)}")
        return entry
    entry["real_rows"] = real_rows
    entry.update(metrics(a, b, tol, exact))
    reasons = []
    if not entry["allclose"]:
        where = f" at {entry['worst_index']}" if entry["worst_index"] else ""
        reasons.append("not equal" + where if exact else
                       f"not allclose: max abs err {fmt_num(entry['max_abs_err'])}{where} "
                       f"(atol {tol.atol:g}, rtol {tol.rtol:g})")
    if not exact and not entry["cosine"] >= tol.min_cosine:  # a NaN cosine fails too
        reasons.append(f"cosine {entry['cosine']:.6f} < {tol.min_cosine:g}")
    if entry["nan_a"] or entry["nan_b"]:
        reasons.append(f"NaN in {'A' if entry['nan_a'] else ''}{'B' if entry['nan_b'] else ''}")
    entry.update(exceeds=bool(reasons), reason="; ".join(reasons) or None)
    return entry


def align_pair(name: str, a: np.ndarray, b: np.ndarray, rows: int | None):
    """(a, b, note, real_rows): the parts of two tensors that are compared. Token-row tensors keep their first
    `rows` real rows; prefill logits of all T rows against the last real row only line up row rows-1. Shapes may
    still differ afterwards (a failure for the caller to report)."""
    note = None
    if a.shape != b.shape and _last_row_only(name, a, b, rows):
        # one run kept all T prefill logits rows (run_auto --full_logits), the other the last real row only
        if a.shape[1] > 1:
            a, note = a[:, rows - 1:rows], f"B has the last real row only: compared A's row {rows - 1}"
        else:
            b, note = b[:, rows - 1:rows], f"A has the last real row only: compared B's row {rows - 1}"
    if a.shape == b.shape and has_token_rows(name) and rows is not None and a.ndim >= 2 and rows < a.shape[1]:
        return a[:, :rows], b[:, :rows], note, rows
    return a, b, note, None


def _last_row_only(name: str, a: np.ndarray, b: np.ndarray, rows: int | None) -> bool:
    """logits (1,T,V) against (1,1,V): a full-logits prefill step against a last-row-only one."""
    if name != LOGITS or rows is None or a.ndim != 3 or b.ndim != 3:
        return False
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return False
    return sorted((a.shape[1], b.shape[1]))[0] == 1 and rows <= max(a.shape[1], b.shape[1])


def _sides(path_a: Path, path_b: Path):
    """(kind, {name: (dir_a or None, dir_b or None)}) for two runs or two step folders."""
    kinds = [classify(p) for p in (path_a, path_b)]
    for p, k in zip((path_a, path_b), kinds):
        if k not in ("run", "step"):
            raise StagepipeError(f"{p}: is a {k.replace('_', ' ')}; give two run folders or two step folders")
    if kinds[0] != kinds[1]:
        raise StagepipeError(f"{path_a} is a {kinds[0]} folder but {path_b} is a {kinds[1]} folder; give two of a kind")
    if kinds[0] == "step":
        return "step", {path_a.name: (path_a, path_b)}
    a, b = ({d.name: d for d in step_dirs(p) + [p / VISION] if d.is_dir()} for p in (path_a, path_b))
    names = sorted(set(a) | set(b), key=lambda n: -1 if n == VISION else step_number(n))  # a VL run's image step first
    return "run", {n: (a.get(n), b.get(n)) for n in names}


def compare(path_a: Path, path_b: Path, tol: Tolerance = Tolerance(), strict: bool = False) -> dict:
    path_a, path_b = Path(path_a), Path(path_b)
    kind, pairs = _sides(path_a, path_b)
    common = [n for n, (a, b) in pairs.items() if a is not None and b is not None]
    if not common:
        raise StagepipeError(f"{path_a} and {path_b} have no step folder in common "
                             f"({len(step_dirs(path_a))} and {len(step_dirs(path_b))} steps)")
    runs = (path_a, path_b) if kind == "run" else (path_a.parent, path_b.parent)
    tokenizer = run_tokenizer(runs[0]) or run_tokenizer(runs[1])
    steps, tokens, first, failures = [], [], None, 0
    for name, (da, db) in pairs.items():
        meta_a = load_step_meta(da) if da else None
        meta_b = load_step_meta(db) if db else None
        tok_a = step_next_token(da, meta_a) if da else None
        tok_b = step_next_token(db, meta_b) if db else None
        if tok_a is not None or tok_b is not None:
            # a step only one run has is reported apart (--strict fails on it), not as a mismatch
            both = tok_a is not None and tok_b is not None
            tokens.append({"step": name, "token_a": tok_a, "token_b": tok_b, "match": tok_a == tok_b if both else None,
                           "text_a": token_text(tokenizer, tok_a), "text_b": token_text(tokenizer, tok_b)})
        if da is None or db is None:
            steps.append({"step": name, "only_in": "A" if db is None else "B", "tensors": []})
            continue
        q_lens = [m.q_len for m in (meta_a, meta_b) if m is not None]
        rows = min(q_lens) if q_lens else None
        files_a = {p.name for p in da.glob("*.npy")}
        files_b = {p.name for p in db.glob("*.npy")}
        entries = []
        for f in sorted(files_a & files_b, key=tensor_sort_key):
            entry = compare_tensor(da / f, db / f, rows, tol)
            entries.append(entry)
            if entry["exceeds"]:
                failures += 1
                if first is None:
                    first = {"step": name, "file": f, "path": f"{name}/{f}", "reason": entry["reason"]}
        meta_diff = {}
        if meta_a and meta_b:
            for key in ("mode", "past_len", "q_len", "input_token_ids"):
                if getattr(meta_a, key) != getattr(meta_b, key):
                    meta_diff[key] = [getattr(meta_a, key), getattr(meta_b, key)]
        steps.append({"step": name, "only_in": None, "mode": meta_a.mode if meta_a else None,
                      "past_len": meta_a.past_len if meta_a else None, "q_len": rows,
                      "meta_differs": meta_diff, "tensors": entries,
                      "only_in_a": sorted(files_a - files_b, key=tensor_sort_key),
                      "only_in_b": sorted(files_b - files_a, key=tensor_sort_key)})
    missing_steps = [s["step"] for s in steps if s["only_in"]]
    missing_files = sum(len(s.get("only_in_a", [])) + len(s.get("only_in_b", [])) for s in steps)
    mismatches = sum(1 for t in tokens if t["match"] is False)
    ok = failures == 0 and mismatches == 0 and not (strict and (missing_steps or missing_files))
    return {"run_a": str(path_a), "run_b": str(path_b), "kind": kind,
            "tolerance": {"atol": tol.atol, "rtol": tol.rtol, "min_cosine": tol.min_cosine}, "strict": strict,
            "steps_a": sum(1 for a, _ in pairs.values() if a), "steps_b": sum(1 for _, b in pairs.values() if b),
            "common_steps": len(common), "steps_only_in_one": missing_steps, "files_only_in_one": missing_files,
            "tensors_compared": sum(len(s["tensors"]) for s in steps), "tensors_exceeding": failures,
            "token_mismatches": mismatches,
            "first_failure": first, "ok": ok, "steps": steps, "tokens": tokens}


# -- output -------------------------------------------------------------------------------------------------------
def print_report(r: dict):
    tol = r["tolerance"]
    print(f"A: {r['run_a']}  ({r['steps_a']} steps)")
    print(f"B: {r['run_b']}  ({r['steps_b']} steps, the reference)")
    print(f"tolerance: atol {tol['atol']:g}  rtol {tol['rtol']:g}  min_cosine {tol['min_cosine']:g}  "
          "(hidden/logits over real rows; input_ids/attention_mask/position_ids must be equal)")
    if r["steps_a"] != r["steps_b"]:
        print(f"NOTE: the runs have {r['steps_a']} and {r['steps_b']} steps; comparing the {r['common_steps']} "
              f"in common (only in one run: {', '.join(r['steps_only_in_one'])})")
    headers = ["tensor", "shape", "rows", "max abs err", "mse", "cosine", "status"]
    for s in r["steps"]:
        print()
        if s["only_in"]:
            print(f"{s['step']}: only in run {s['only_in']}")
            continue
        where = f"{s['mode']}  past_len {s['past_len']}  q_len {s['q_len']}" if s["mode"] else \
            "image step" if s["step"] == VISION else "(no meta.json)"
        print(f"{s['step']}  {where}")
        for key, (va, vb) in s["meta_differs"].items():
            print(f"  meta.json {key} differs: A {va}  B {vb}")
        rows = []
        for e in s["tensors"]:
            if e["shape_a"] is None:
                shape = "?"
            elif e["shape_a"] == e["shape_b"]:
                shape = _shape(e["shape_a"])
            else:
                shape = f"{_shape(e['shape_a'])} vs {_shape(e['shape_b'])}"
            status = ("FAIL: " + e["reason"]) if e["exceeds"] else ("ok (equal)" if e["check"] == "equal" else "ok")
            if e.get("note"):
                status += f" ({e['note']})"
            cosine = None if e["cosine"] is None else f"{e['cosine']:.6f}"
            rows.append([e["file"], shape, e["real_rows"] if e["real_rows"] is not None else "all",
                         fmt_num(e["max_abs_err"]), fmt_num(e["mse"]), cosine, status])
        for f in s["only_in_a"]:
            rows.append([f, "", "", "", "", "", "only in A"])
        for f in s["only_in_b"]:
            rows.append([f, "", "", "", "", "", "only in B"])
        print("  " + format_table(headers, rows, right={3, 4, 5}).replace("\n", "\n  "))
    print()
    if r["tokens"]:
        rows = []
        for t in r["tokens"]:
            text = repr(t["text_a"]) if t["text_a"] is not None else "-"
            if not t["match"]:
                text = f"{text} | {repr(t['text_b']) if t['text_b'] is not None else '-'}"
            mark = {True: "", False: "MISMATCH", None: "one run only"}[t["match"]]
            rows.append([t["step"], t["token_a"], t["token_b"], mark, text])
        print("tokens:")
        print("  " + format_table(["step", "token A", "token B", "", "text (A | B)"], rows, right={1, 2})
              .replace("\n", "\n  "))
        print()
    bar = "=" * 78
    f = r["first_failure"]
    if f:
        print(bar)
        print(f"FIRST FAILURE: {f['path']}")
        print(f"  {f['reason']}")
        print(f"  ({r['tensors_exceeding']} of {r['tensors_compared']} tensors in {r['common_steps']} common steps "
              f"exceed the tolerance; {r['token_mismatches']} token mismatch(es))")
        print(bar)
    elif r["token_mismatches"]:
        print(bar)
        print(f"FAIL: {r['token_mismatches']} token mismatch(es) in common steps, though every tensor is within "
              "tolerance (the runs sampled differently: other settings, or an edited token)")
        print(bar)
    elif not r["ok"]:
        print(bar)
        print(f"FAIL (--strict): {len(r['steps_only_in_one'])} steps and {r['files_only_in_one']} tensor files are "
              "present in one run only")
        print(bar)
    else:
        print(f"OK: all {r['tensors_compared']} tensors in {r['common_steps']} common steps are within tolerance")


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n")[0])
    p.add_argument("run_a", type=Path, help="run folder (or step folder) to check")
    p.add_argument("run_b", type=Path, help="run folder (or step folder) to check against (the reference)")
    p.add_argument("--atol", type=float, default=1e-3, help="absolute tolerance (default 1e-3)")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance, of |B| (default 1e-3)")
    p.add_argument("--min_cosine", type=float, default=0.999, help="lowest cosine similarity allowed (default 0.999)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT",
                   help="write the full report as JSON to OUT ('-': print it instead of the text report)")
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help="plot max abs error per step and stage")
    p.add_argument("--html", type=Path, default=None, metavar="OUT.html",
                   help="write the compare view as one self-contained HTML file (heat map, error histograms)")
    p.add_argument("--strict", action="store_true", help="steps or tensor files present in one run only also fail")
    a = p.parse_args(argv)
    if a.atol < 0 or a.rtol < 0:
        raise StagepipeError("--atol and --rtol must be >= 0")
    if a.plot is not None:
        require_matplotlib()  # fail before the work, not after
    report = compare(a.run_a, a.run_b, Tolerance(a.atol, a.rtol, a.min_cosine), strict=a.strict)
    emit_report(report, a.json, print_report, a.plot, write_plot)
    if a.html is not None:
        from pipeline.tools.compare_view import write_html_report

        write_html_report(report, a.html)
        print(f"HTML report written to {a.html}", file=sys.stderr if str(a.json) == "-" else sys.stdout)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
