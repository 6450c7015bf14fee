"""Look inside a run folder, one step folder, a kv_cache folder or a single .npy file.

    python -m pipeline.inspect runs/demo                  steps table (tokens, per-stage ms) + summary.json
    python -m pipeline.inspect runs/demo/step_0003        every .npy (shape, dtype, min/max/mean/std, NaN/Inf) + meta.json
    python -m pipeline.inspect runs/demo/kv_cache         cache.json + per-file shape/dtype and filled slots
    python -m pipeline.inspect PATH --json                the same as machine-readable JSON on stdout

Tensors are memory-mapped and reduced in chunks, so a big logits file or cache is never loaded twice over.
Statistics cover the whole file, padding rows included (in a prefill step only the first q_len of the T rows of
hidden_block*/logits are real tokens); min/max/mean/std are over the finite values, NaN and Inf are counted apart.
The helpers here (step folders, pipeline order of tensor files, token text) are shared with pipeline.compare.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.cli_args import ArgumentParser
from pipeline.core.errors import StagepipeError, cli_entry, stdout_may_close
from pipeline.core import layout
from pipeline.core.jsonfile import load_model_file
from pipeline.core.layout import step_dirs, step_number
from pipeline.tools.report import dump_json, fmt_num, format_table
from pipeline.tools.run_reading import (TENSOR_HEADERS, abbreviate_ids, classify, file_stats, is_image_step,
                                         load_step_meta, open_npy,
                                         read_json, run_tokenizer, step_next_token, step_tensor_files, tensor_rows,
                                         token_text)
from schemas.run import CacheRecord, RunSummary, StepMeta, VisionMeta



# -- run ----------------------------------------------------------------------------------------------------------
def stage_order(names) -> list[str]:
    return sorted(set(names), key=layout.stage_sort_key)


def inspect_run(run_dir: Path) -> dict:
    settings = read_json(run_dir / layout.RUN_JSON)
    summary, summary_error = None, None
    if (run_dir / layout.SUMMARY_JSON).is_file():
        try:
            summary = load_model_file(run_dir / layout.SUMMARY_JSON, RunSummary).model_dump()
        except StagepipeError as e:
            summary_error = str(e)
    tokenizer = run_tokenizer(run_dir, settings)
    steps = []
    for d in step_dirs(run_dir):
        try:
            meta, problem = load_step_meta(d), None
        except StagepipeError as e:  # show the other steps; name the broken file
            meta, problem = None, str(e)
        token = step_next_token(d, meta)
        steps.append({
            "step": step_number(d.name), "dir": d.name, "error": problem,
            "mode": meta.mode if meta else None, "past_len": meta.past_len if meta else None,
            "q_len": meta.q_len if meta else None, "input_token_ids": meta.input_token_ids if meta else None,
            "next_token_id": token, "next_token_text": token_text(tokenizer, token),
            "stages_ms": {k: r.seconds * 1000 for k, r in meta.stages.items()} if meta else {},
            "total_ms": sum(r.seconds for r in meta.stages.values()) * 1000 if meta else None,
            "complete": bool(meta) and "output" in meta.stages,
        })
    return {"kind": "run", "path": str(run_dir), "settings": settings, "tokenizer": tokenizer is not None,
            "steps": steps, "summary": summary, "summary_error": summary_error}


def print_run(info: dict):
    s = info["settings"] or {}
    print(f"run {info['path']}")
    if s:
        sampling = s.get("sampling") or {}
        how = "greedy" if sampling.get("greedy", True) else ", ".join(
            f"{k}={sampling[k]}" for k in ("temperature", "top_k", "top_p", "seed") if k in sampling)
        print(f"  onnx_dir {s.get('onnx_dir')}  backend {s.get('backend')}  prompt {len(s.get('prompt_token_ids', []))}"
              f" tokens  max_new_tokens {s.get('max_new_tokens')}  sampling {how}"
              f"{'  chat' if s.get('chat') else ''}{'  ignore_eos' if s.get('ignore_eos') else ''}")
    else:
        print("  (no run.json)")
    if not info["tokenizer"]:
        print("  (no tokenizer found for the run's onnx_dir: token text not shown)")
    stages = stage_order(k for st in info["steps"] for k in st["stages_ms"])
    headers = ["step", "mode", "past_len", "q_len", "input ids", "next id"] + [f"{n} ms" for n in stages] + \
              ["total ms", "next text"]
    rows = []
    for st in info["steps"]:
        ids = st["input_token_ids"]
        text = st["next_token_text"]
        rows.append([st["dir"], st["mode"] or ("(bad meta.json)" if st["error"] else "(no meta.json)"),
                     st["past_len"], st["q_len"],
                     abbreviate_ids(ids) if ids is not None else None, st["next_token_id"]] +
                    [f"{st['stages_ms'][n]:.1f}" if n in st["stages_ms"] else None for n in stages] +
                    [f"{st['total_ms']:.1f}" if st["total_ms"] is not None else None,
                     repr(text) if text is not None else None])
    print()
    if rows:
        right = {2, 3, 5} | set(range(6, 6 + len(stages) + 1))
        print(format_table(headers, rows, right))
    else:
        print("(no step folders yet)")
    for st in info["steps"]:
        if st["error"]:
            print(f"problem: {st['error']}")
    print()
    summary = info["summary"]
    if info.get("summary_error"):
        print(f"summary: {info['summary_error']}")
        return
    if summary is None:
        print("summary: no summary.json (the run has not finished its summary task)")
        return
    print("summary (summary.json):")
    for key, value in summary.items():
        if key == "turns":
            print_turns(value)
            continue
        if isinstance(value, list) and len(value) > 12:
            value = f"{abbreviate_ids(value, keep=8)}"
        elif isinstance(value, str):
            value = repr(value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        print(f"  {key}: {value}")


def print_turns(turns: list[dict]):
    """A conversation's messages, one line each: role, steps, token count, stop reason, text."""
    if len(turns) <= 2:  # a single turn: the fields above say it all
        return
    print("  turns:")
    for t in turns:
        steps = f"steps {t['first_step']}..{t['last_step']}" if t["last_step"] >= 0 else "no step done"
        stop = f", {t['stop_reason']}" if t.get("stop_reason") else ""
        text = t["text"] if len(t["text"]) <= 60 else t["text"][:57] + "..."
        print(f"    {t['role']:<9} {steps:<16} {len(t['token_ids']):>5} ids{stop:<12} {text!r}")


# -- step ---------------------------------------------------------------------------------------------------------
def inspect_step(step_dir: Path) -> dict:
    meta_path = step_dir / layout.META
    kind = VisionMeta if is_image_step(step_dir) else StepMeta
    meta = load_model_file(meta_path, kind).model_dump() if meta_path.is_file() else None
    text_path = step_dir / layout.NEXT_TOKEN_TEXT
    return {"kind": "step", "path": str(step_dir), "meta": meta,
            "next_token_text": text_path.read_text(encoding="utf-8", errors="replace") if text_path.is_file() else None,
            "tensors": [file_stats(p) for p in step_tensor_files(step_dir)]}


def print_step(info: dict):
    print(f"step {info['path']}")
    meta = info["meta"]
    if meta and meta.get("mode") == "prefill" and meta["q_len"] < meta["max_input_len"]:
        print(f"  (prefill: rows {meta['q_len']}..{meta['max_input_len'] - 1} of the (1,T,...) hidden_block*/logits "
              "are padding; statistics include them)")
    print()
    if info["tensors"]:
        print(format_table(TENSOR_HEADERS, tensor_rows(info["tensors"]), right={3, 4, 5, 6, 7, 8}))
    else:
        print("(no .npy files)")
    print()
    if meta is None:
        print("meta.json: missing")
        return
    print("meta.json:")
    for key, value in meta.items():
        if key == "stages":
            value = "  ".join(f"{k} {v['seconds'] * 1000:.1f}ms" for k, v in
                              sorted(value.items(), key=lambda kv: stage_order(value).index(kv[0])))
        elif key == "sampling":
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif key == "input_token_ids":
            value = " ".join(map(str, value))
        print(f"  {key}: {value}")
    if info["next_token_text"] is not None:
        print(f"next_token.txt: {info['next_token_text']!r}")


# -- kv cache -----------------------------------------------------------------------------------------------------
def slot_usage(arr: np.ndarray, slot_axis: int = 3) -> dict:
    """How many cache slots (axis 3 of (Lk,1,KV,C,D)) hold any non-zero value, read one layer at a time."""
    if arr.ndim != 5:
        return {"slots": None, "nonzero_slots": None, "last_nonzero_slot": None}
    used = np.zeros(arr.shape[slot_axis], dtype=bool)
    for layer in range(arr.shape[0]):
        part = np.asarray(arr[layer])  # (1, KV, C, D)
        used |= np.any(part != 0, axis=(0, 1, 3))
    idx = np.flatnonzero(used)
    return {"slots": int(arr.shape[slot_axis]), "nonzero_slots": int(idx.size),
            "last_nonzero_slot": int(idx[-1]) if idx.size else None}


def inspect_kv(kv_dir: Path) -> dict:
    record_path = kv_dir / layout.CACHE_JSON
    record = load_model_file(record_path, CacheRecord).model_dump() if record_path.is_file() else None
    files = []
    for p in layout.kv_files(kv_dir):
        try:
            arr = open_npy(p)
            files.append({"file": p.name, "shape": list(arr.shape), "dtype": str(arr.dtype), **slot_usage(arr)})
        except StagepipeError as e:
            files.append({"file": p.name, "error": str(e)})
    return {"kind": "kv_cache", "path": str(kv_dir), "cache": record, "files": files}


def print_kv(info: dict):
    print(f"kv_cache {info['path']}")
    rec = info["cache"]
    if rec:
        print(f"  cache.json: max_cache_len {rec['max_cache_len']}  kv_dtype {rec['kv_dtype']}  "
              f"onnx_fingerprint {rec['onnx_fingerprint'][:12]}…  block_shapes {rec['block_shapes']}")
    else:
        print("  cache.json: missing")
    print()
    rows = []
    for f in info["files"]:
        if "error" in f:
            rows.append([f["file"], "error: " + f["error"], "", "", ""])
            continue
        used = "-" if f["slots"] is None else f"{f['nonzero_slots']}/{f['slots']}"
        gap = ""
        if f["nonzero_slots"] and f["last_nonzero_slot"] + 1 != f["nonzero_slots"]:
            gap = " (has all-zero slots below the last used one)"
        rows.append([f["file"], "x".join(map(str, f["shape"])), f["dtype"], used,
                     fmt_num(f["last_nonzero_slot"]) + gap])
    print(format_table(["file", "shape", "dtype", "non-zero slots", "last non-zero slot"], rows, right={3}))


def inspect_path(path: Path) -> dict:
    kind = classify(path)
    if kind == "run":
        return inspect_run(path)
    if kind == "step":
        return inspect_step(path)
    if kind == "kv_cache":
        return inspect_kv(path)
    stats = file_stats(path)
    if "error" in stats:
        raise StagepipeError(stats["error"])
    return {"kind": "npy", "path": str(path), "tensor": stats}


def print_info(info: dict):
    if info["kind"] == "run":
        print_run(info)
    elif info["kind"] == "step":
        print_step(info)
    elif info["kind"] == "kv_cache":
        print_kv(info)
    else:
        print(format_table(TENSOR_HEADERS, tensor_rows([info["tensor"]]), right={3, 4, 5, 6, 7, 8}))


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="python -m pipeline.inspect", description=__doc__.split("\n")[0])
    p.add_argument("path", type=Path, help="a run folder, a step folder (RUN/step_0003), RUN/kv_cache or a .npy file")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    a = p.parse_args(argv)
    info = inspect_path(a.path)
    with stdout_may_close():
        if a.json:
            print(dump_json(info))
        else:
            print_info(info)
    return 0


if __name__ == "__main__":
    main()
