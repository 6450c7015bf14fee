"""Report formatting shared by the tools: numbers, plain-text tables, strict JSON."""
from __future__ import annotations

import json
import math

import numpy as np

from pipeline.core.table import fmt_num, format_table  # noqa: F401  (the tools import them from here)


def json_safe(obj):
    """NaN/Inf floats become None so the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def dump_json(obj) -> str:
    return json.dumps(json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False)


def emit_report(report: dict, json_out, print_text, plot_out=None, write_plot=None, what: str = "plot"):
    """A tool's output: the text report (or the JSON on stdout for --json -), the JSON file, the plot."""
    import sys

    from pipeline.core.atomic import write_text
    from pipeline.core.errors import stdout_may_close

    to_stdout = json_out is not None and str(json_out) == "-"
    with stdout_may_close():
        if to_stdout:
            print(dump_json(report))
        else:
            print_text(report)
        if json_out is not None and not to_stdout:
            write_text(json_out, dump_json(report) + "\n")
            print(f"report written to {json_out}")
        if plot_out is not None:
            write_plot(report, plot_out)
            print(f"{what} written to {plot_out}", file=sys.stderr if to_stdout else sys.stdout)
