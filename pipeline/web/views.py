"""What the pages show, as JSON-ready dicts: the runs under the runs folder, a run's steps, a step's tensors, a
tensor's histogram, the KV cache fill and the compare view. Built on the tools' own readers (inspect, compare)."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.core import layout
from pipeline.core.errors import StagepipeError
from pipeline.tools.compare import Tolerance, compare
from pipeline.tools.compare_view import cell_detail, compare_view
from pipeline.tools.histograms import value_histogram
from pipeline.tools.inspect import inspect_kv, inspect_run, inspect_step, stage_order
from pipeline.tools.report import json_safe
from pipeline.tools.run_reading import file_stats, open_npy, read_json, run_tokenizer
from pipeline.web.folder import RequestError, RunsFolder


def run_is_live(run_dir: Path) -> bool:
    """A run_auto process holds the folder now: the pid in its lock file is a running (not zombie) process."""
    try:
        pid = int((run_dir / layout.LOCK_FILE).read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _decode(tokenizer, ids) -> str | None:
    if tokenizer is None or ids is None:
        return None
    try:
        return tokenizer.decode(ids)
    except StagepipeError:
        return None


def rates(steps: list[dict], summary: dict | None) -> dict:
    """TTFT and decode tokens/s: summary.json's when written, else from the step timings so far."""
    if summary and summary.get("stop_reason") != "running":
        return {"ttft_s": summary["time_to_first_token_s"], "decode_tokens_per_s": summary["decode_tokens_per_s"],
                "source": layout.SUMMARY_JSON}
    done = [s for s in steps if s["complete"]]
    prefill = [s["total_ms"] for s in done if s["mode"] == "prefill"]
    decode = [s["total_ms"] for s in done if s["mode"] == "decode"]
    sampled = any(s["next_token_id"] is not None for s in done)
    return {"ttft_s": sum(prefill) / 1000 if sampled else None,
            "decode_tokens_per_s": len(decode) / (sum(decode) / 1000) if decode and sum(decode) > 0 else None,
            "source": "steps so far"}


def run_entry(folder: RunsFolder, name: str) -> dict:
    """One line of the runs list (run.json and summary.json only: cheap for many runs)."""
    path = folder.root / name
    entry = {"name": name, "steps": len(layout.step_dirs(path)), "live": run_is_live(path),
             "modified": max((p.stat().st_mtime for p in [path, *layout.step_dirs(path)[-1:]]), default=None),
             "chat": folder.is_chat_folder(name), "prompt": None, "onnx_dir": None, "stop_reason": None,
             "generated": None, "ttft_s": None, "decode_tokens_per_s": None, "problem": None}
    try:
        settings = read_json(path / layout.RUN_JSON) or {}
        summary = read_json(path / layout.SUMMARY_JSON) or {}
    except StagepipeError as e:
        return {**entry, "problem": str(e)}
    entry.update(prompt=settings.get("prompt"), onnx_dir=settings.get("onnx_dir"),
                 chat=entry["chat"] or bool(settings.get("chat")), stop_reason=summary.get("stop_reason"),
                 generated=len(summary["generated_token_ids"]) if "generated_token_ids" in summary else None,
                 ttft_s=summary.get("time_to_first_token_s"), decode_tokens_per_s=summary.get("decode_tokens_per_s"))
    return entry


def runs_list(folder: RunsFolder) -> dict:
    return json_safe({"root": str(folder.root), "runs": [run_entry(folder, n) for n in folder.run_names()]})


def run_view(folder: RunsFolder, name: str) -> dict:
    path = folder.run(name)
    info = inspect_run(path)
    tokenizer = run_tokenizer(path, info["settings"])
    for st in info["steps"]:
        st["input_text"] = _decode(tokenizer, st["input_token_ids"])
    info.update(name=folder.name_of(path), live=run_is_live(path), rates=rates(info["steps"], info["summary"]),
                stages=stage_order(k for st in info["steps"] for k in st["stages_ms"]),
                has_kv=(path / layout.KV_DIR).is_dir(), chat=folder.is_chat_folder(folder.name_of(path)))
    return json_safe(info)


def step_view(folder: RunsFolder, run: str, step: str) -> dict:
    run_dir = folder.run(run)
    step_dir = folder.step(run_dir, step)
    info = inspect_step(step_dir)
    tokenizer = run_tokenizer(run_dir)
    meta = info["meta"]
    info.update(run=folder.name_of(run_dir), step=step_dir.name,
                input_text=_decode(tokenizer, meta["input_token_ids"]) if meta else None,
                stages=[{"stage": k, "ms": meta["stages"][k]["seconds"] * 1000} for k in stage_order(meta["stages"])]
                if meta else [])
    return json_safe(info)


def tensor_view(folder: RunsFolder, run: str, step: str, file: str) -> dict:
    path = folder.tensor(folder.step(folder.run(run), step), file)
    stats = file_stats(path)
    if "error" in stats:
        raise RequestError(422, stats["error"])
    return json_safe({**stats, "histogram": value_histogram(open_npy(path))})


def kv_view(folder: RunsFolder, run: str) -> dict:
    run_dir = folder.run(run)
    kv_dir = run_dir / layout.KV_DIR
    if not kv_dir.is_dir():
        raise RequestError(404, f"{folder.name_of(run_dir)}: no {layout.KV_DIR} folder yet")
    info = inspect_kv(folder.inside(kv_dir))
    steps = layout.step_dirs(run_dir)
    last = read_json(steps[-1] / layout.META) if steps else None
    info["expected_filled"] = last.get("next_past_len") if last else 0  # what the last step's meta says
    return json_safe(info)


def tolerance(params) -> Tolerance:
    """atol, rtol, min_cosine from query parameters (the CLI's defaults when absent)."""
    values = {}
    for key in ("atol", "rtol", "min_cosine"):
        if params.get(key) not in (None, ""):
            try:
                values[key] = float(params[key])
            except ValueError:
                raise RequestError(400, f"{key}={params[key]!r}: not a number") from None
            if key != "min_cosine" and values[key] < 0:
                raise RequestError(400, f"{key} must be >= 0")
    return Tolerance(**values)


def compare_runs(folder: RunsFolder, a: str, b: str, tol: Tolerance) -> dict:
    view = compare_view(compare(folder.run(a), folder.run(b), tol))
    return {**view, "name_a": a, "name_b": b}


def compare_cell(folder: RunsFolder, a: str, b: str, step: str, file: str) -> dict:
    run_a, run_b = folder.run(a), folder.run(b)
    step_a, step_b = folder.step(run_a, step), folder.step(run_b, step)
    folder.tensor(step_a, file), folder.tensor(step_b, file)
    return cell_detail(step_a, step_b, file)
