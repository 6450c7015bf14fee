"""How far a candidate's tensor is from the golden one, in numbers that compare across stages (pipeline.replay,
pipeline.conformance).

The relative error |candidate - golden| / |golden| (L2 norms, over real rows) is scale-free: hidden states,
K/V and logits of very different sizes read alike, and 1 - cosine ~ rel_err**2 / 2 for small errors."""
from __future__ import annotations

import numpy as np

DEFAULT_MAX_REL_ERR = 1e-2  # the tools' default tolerance on the relative error


def tensor_error(candidate: np.ndarray, golden: np.ndarray) -> dict:
    """rel_err, max_abs, cosine and non-finite count (candidate) of two arrays; a shape mismatch is an
    infinite error with the reason."""
    if tuple(candidate.shape) != tuple(golden.shape):
        return {"rel_err": float("inf"), "max_abs": None, "cosine": None, "nonfinite": None,
                "reason": f"shape {list(candidate.shape)} vs golden {list(golden.shape)}"}
    a = np.asarray(candidate, dtype=np.float64).reshape(-1)
    b = np.asarray(golden, dtype=np.float64).reshape(-1)
    nonfinite = int(a.size - np.isfinite(a).sum())
    diff = a - b
    d2, a2, b2, ab = (_dot(diff, diff), _dot(a, a), _dot(b, b), _dot(a, b))
    return {"rel_err": relative(d2, b2), "max_abs": float(np.abs(diff).max()) if a.size else 0.0,
            "cosine": cosine(ab, a2, b2), "nonfinite": nonfinite, "reason": None}


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    # einsum, not BLAS: on a busy machine BLAS's threads made one 150k-element dot take milliseconds
    return float(np.einsum("i,i->", x, y))


def relative(diff_sq: float, ref_sq: float) -> float:
    """sqrt(diff_sq / ref_sq), NaN-safe: 0 for an exact match, inf against an all-zero reference."""
    if not np.isfinite(diff_sq):
        return float("inf")
    if diff_sq == 0.0:
        return 0.0
    return float(np.sqrt(diff_sq / ref_sq)) if ref_sq > 0 else float("inf")


def cosine(dot: float, a2: float, b2: float) -> float:
    if a2 == 0.0 and b2 == 0.0:
        return 1.0
    if a2 == 0.0 or b2 == 0.0 or not np.isfinite(dot):
        return 0.0
    return float(dot / np.sqrt(a2 * b2))


class SlotErrors:
    """Per-slot error sums between two (Lk,1,KV,C,D) caches, reduced once so that the error over any prefix
    of slots [0, p) (what a step attends to) costs O(1)."""

    def __init__(self, candidate: np.ndarray, golden: np.ndarray, slots: int):
        a = np.asarray(candidate[:, :, :, :slots], dtype=np.float64)
        b = np.asarray(golden[:, :, :, :slots], dtype=np.float64)
        axes = (0, 1, 2, 4)
        diff = a - b
        self.d2 = np.concatenate([[0.0], np.cumsum((diff * diff).sum(axes))])
        self.b2 = np.concatenate([[0.0], np.cumsum((b * b).sum(axes))])
        self.ab = np.concatenate([[0.0], np.cumsum((a * b).sum(axes))])
        self.a2 = np.concatenate([[0.0], np.cumsum((a * a).sum(axes))])
        self.max_abs = np.concatenate([[0.0], np.maximum.accumulate(np.abs(diff).max(axis=axes))]) if slots else \
            np.zeros(1)

    def prefix(self, p: int) -> dict:
        """The error over slots [0, p)."""
        return {"rel_err": relative(self.d2[p], self.b2[p]), "max_abs": float(self.max_abs[p]),
                "cosine": cosine(self.ab[p], self.a2[p], self.b2[p]), "nonfinite": None, "reason": None}


def worst(errors: dict[str, dict] | None) -> tuple[float | None, str | None]:
    """(largest rel_err, its tensor) of a {tensor: error} dict; (None, None) when not measured."""
    if not errors:
        return None, None
    name = max(errors, key=lambda n: _sortable(errors[n]["rel_err"]))
    return errors[name]["rel_err"], name


def _sortable(x) -> float:
    return float("inf") if x is None or x != x else x


def exceeds(value: float | None, max_rel_err: float) -> bool:
    return value is not None and not value <= max_rel_err  # NaN exceeds
