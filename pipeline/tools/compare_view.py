"""The compare view: a compare() report as a step x tensor heat map with the first divergence marked, each cell's
error histogram and worst positions, and the whole view as one self-contained HTML file (`pipeline.compare
--html`). The web app (pipeline.web) shows the same view from the same data and the same script."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.atomic import write_text
from pipeline.core.errors import StagepipeError
from pipeline.core.layout import step_dirs, tensor_sort_key, writer_stage
from pipeline.tools.compare import align_pair
from pipeline.tools.histograms import error_histogram
from pipeline.tools.report import json_safe
from pipeline.tools.run_reading import load_step_meta, open_npy

ASSETS = Path(__file__).with_name("assets")
CELL_KEYS = ("max_abs_err", "cosine", "mse", "exceeds", "reason", "check", "note", "real_rows")
SUMMARY_KEYS = ("run_a", "run_b", "kind", "tolerance", "steps_a", "steps_b", "common_steps", "steps_only_in_one",
                "tensors_compared", "tensors_exceeding", "token_mismatches", "first_failure", "ok", "tokens")


def heat_map(report: dict) -> dict:
    """Rows are steps, columns the tensor files in pipeline order (with the stage that writes each); a cell holds
    that tensor's metrics, None where the step or file is in one run only."""
    files = sorted({e["file"] for s in report["steps"] for e in s["tensors"]}, key=tensor_sort_key)
    rows = []
    for s in report["steps"]:
        by_file = {e["file"]: {k: e[k] for k in CELL_KEYS} for e in s["tensors"]}
        rows.append({"step": s["step"], "mode": s.get("mode"), "past_len": s.get("past_len"), "q_len": s.get("q_len"),
                     "only_in": s["only_in"], "cells": [by_file.get(f) for f in files]})
    first = report["first_failure"]
    return {"columns": [{"file": f, "stage": writer_stage(f) or "input"} for f in files], "rows": rows,
            "first": {"step": first["step"], "file": first["file"]} if first else None}


def compare_view(report: dict) -> dict:
    """What the page draws: the report's summary, tokens and heat map (not the per-step tensor lists again)."""
    return json_safe({**{k: report[k] for k in SUMMARY_KEYS}, "heat": heat_map(report)})


def step_pair(report: dict, step: str) -> tuple[Path, Path]:
    """The two step folders of one step of a report (a StagepipeError for a step the runs do not share)."""
    if report["kind"] == "step":
        return Path(report["run_a"]), Path(report["run_b"])
    a = {d.name: d for d in step_dirs(Path(report["run_a"]))}.get(step)
    b = {d.name: d for d in step_dirs(Path(report["run_b"]))}.get(step)
    if a is None or b is None:
        raise StagepipeError(f"{step}: not a step both runs have")
    return a, b


def cell_detail(step_a: Path, step_b: Path, file: str, top: int = 10) -> dict:
    """One cell: the element errors of a tensor pair (over the rows compare compares) and its worst positions."""
    names = {p.name for p in step_a.glob("*.npy")} & {p.name for p in step_b.glob("*.npy")}
    if file not in names:
        raise StagepipeError(f"{file}: not a tensor both {step_a} and {step_b} hold")
    metas = [load_step_meta(d) for d in (step_a, step_b)]
    q_lens = [m.q_len for m in metas if m is not None]
    a, b = open_npy(step_a / file), open_npy(step_b / file)
    a, b, note, real_rows = align_pair(file, a, b, min(q_lens) if q_lens else None)
    detail = {"step": step_a.name, "file": file, "stage": writer_stage(file) or "input", "note": note,
              "real_rows": real_rows, "shape_a": list(a.shape), "shape_b": list(b.shape)}
    if a.shape != b.shape:
        return json_safe({**detail, "error": "the shapes differ: no element errors"})
    return json_safe({**detail, **error_histogram(a, b, top=top)})


def all_cell_details(report: dict) -> dict:
    """Every compared cell's detail, keyed "step/file" (what the HTML file carries, having no server to ask)."""
    details = {}
    for s in report["steps"]:
        if s["only_in"] or not s["tensors"]:
            continue
        a, b = step_pair(report, s["step"])
        for e in s["tensors"]:
            try:
                details[f"{s['step']}/{e['file']}"] = cell_detail(a, b, e["file"])
            except StagepipeError as err:  # an unreadable file: the cell says so
                details[f"{s['step']}/{e['file']}"] = {"step": s["step"], "file": e["file"], "error": str(err)}
    return details


def asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def script_json(obj) -> str:
    """JSON to sit inside <script type="application/json">: '</' cannot end the element early."""
    return json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False).replace("</", "<\\/")


def render_html_report(report: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ASSETS), autoescape=True)
    view = compare_view(report)
    return env.get_template("compare_report.html").render(
        view=view, data=script_json({"view": view, "details": all_cell_details(report)}),
        chart_js=asset("chart.umd.min.js"), charts_js=asset("charts.js"), compare_js=asset("compare.js"),
        css=asset("stagepipe.css"))


def write_html_report(report: dict, out: Path):
    write_text(Path(out), render_html_report(report))
