"""Choose the next token from one row of logits: greedy, or temperature / top-k / top-p with a seed.

The random draw depends only on (seed, step), so rerunning a step with the same settings gives the same
token every time, and a resumed or branched run matches an uninterrupted one.
"""
from __future__ import annotations

import numpy as np
from pipeline.core.errors import StagepipeError
from schemas.run import SamplingSettings


def check_sampling(settings: SamplingSettings) -> SamplingSettings:
    if not settings.greedy:
        if settings.temperature <= 0:
            raise StagepipeError(f"--temperature {settings.temperature}: must be > 0 (or use --greedy)")
        if not 0 < settings.top_p <= 1:
            raise StagepipeError(f"--top_p {settings.top_p}: must be in (0, 1]")
        if settings.top_k < 0:
            raise StagepipeError(f"--top_k {settings.top_k}: must be >= 0 (0 means no limit)")
    return settings


def sample(logits: np.ndarray, settings: SamplingSettings, step: int) -> int:
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if settings.greedy:
        return int(np.argmax(logits))
    scaled = logits / settings.temperature
    order = np.argsort(-scaled, kind="stable")
    if settings.top_k:
        order = order[: settings.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if settings.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), settings.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    rng = np.random.default_rng([settings.seed, step])
    return int(order[rng.choice(len(order), p=probs)])
