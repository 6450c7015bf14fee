"""Report formatting shared by the tools: numbers, plain-text tables, strict JSON."""
from __future__ import annotations

import json
import math

import numpy as np


def fmt_num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x)


def format_table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values):
        out = [v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


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
