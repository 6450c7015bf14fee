"""Histograms for the pages and the HTML compare report: a tensor's values, and two tensors' element errors with
their worst positions. Read in chunks like the other tools, so a big logits file is never copied whole."""
from __future__ import annotations

import math

import numpy as np

CHUNK = 1 << 21  # elements at a time


def _chunks(flat: np.ndarray):
    for start in range(0, flat.size, CHUNK):
        yield start, np.asarray(flat[start:start + CHUNK], dtype=np.float64)


def value_histogram(arr: np.ndarray, bins: int = 40) -> dict:
    """Counts of the finite values in `bins` equal-width bins between their min and max; NaN/Inf counted apart."""
    flat = arr.reshape(-1)
    lo, hi, nan, inf = math.inf, -math.inf, 0, 0
    for _, c in _chunks(flat):
        finite = np.isfinite(c)
        nan += int(np.isnan(c).sum())
        inf += int((~finite).sum()) - int(np.isnan(c).sum())
        if finite.any():
            lo, hi = min(lo, float(c[finite].min())), max(hi, float(c[finite].max()))
    if lo > hi:
        return {"edges": [], "counts": [], "nan": nan, "inf": inf}
    if lo == hi:  # one value: one bin around it
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    for _, c in _chunks(flat):
        counts += np.histogram(c[np.isfinite(c)], bins=edges)[0]
    return {"edges": edges.tolist(), "counts": counts.tolist(), "nan": nan, "inf": inf}


def error_histogram(a: np.ndarray, b: np.ndarray, bins_per_decade: int = 2, top: int = 10) -> dict:
    """|a - b| of two same-shape arrays: counts per bin of log10 error (errors span decades), exact matches and
    NaN counted apart, and the `top` worst elements (index, a, b, error), NaN first."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    exact, nan, lo, hi = 0, 0, math.inf, -math.inf
    worst_at, worst_err = np.empty(0, dtype=np.int64), np.empty(0)
    with np.errstate(invalid="ignore", over="ignore"):
        for start, ca in _chunks(fa):
            err = np.abs(ca - np.asarray(fb[start:start + CHUNK], dtype=np.float64))
            bad = np.isnan(err)
            nan += int(bad.sum())
            exact += int((err == 0).sum())
            positive = err[(err > 0) & ~bad]
            if positive.size:
                lo, hi = min(lo, float(positive.min())), max(hi, float(positive.max()))
            ranked = np.where(bad, np.inf, err)  # NaN ranks first
            keep = min(top, ranked.size)
            idx = np.argpartition(-ranked, keep - 1)[:keep] if keep else np.empty(0, dtype=np.int64)
            worst_at = np.concatenate([worst_at, idx + start])
            worst_err = np.concatenate([worst_err, ranked[idx]])
            order = np.argsort(-worst_err, kind="stable")[:top]
            worst_at, worst_err = worst_at[order], worst_err[order]
        edges, counts = [], []
        if lo <= hi:
            first, last = math.floor(math.log10(lo) * bins_per_decade), math.ceil(math.log10(hi) * bins_per_decade)
            last = max(last, first + 1)
            edges = [10 ** (k / bins_per_decade) for k in range(first, last + 1)]
            hist = np.zeros(len(edges) - 1, dtype=np.int64)
            for start, ca in _chunks(fa):
                err = np.abs(ca - np.asarray(fb[start:start + CHUNK], dtype=np.float64))
                hist += np.histogram(err[err > 0], bins=edges)[0]
            counts = hist.tolist()
    worst = []
    for flat_index, err in zip(worst_at.tolist(), worst_err.tolist()):
        index = [int(i) for i in np.unravel_index(flat_index, a.shape)]
        va, vb = float(fa[flat_index]), float(fb[flat_index])
        if err == 0 and worst:
            break
        worst.append({"index": index, "a": va, "b": vb, "abs_err": abs(va - vb)})
    return {"size": int(fa.size), "exact": exact, "nan": nan, "edges": edges, "counts": counts, "worst": worst}
