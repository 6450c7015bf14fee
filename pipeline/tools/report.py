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
