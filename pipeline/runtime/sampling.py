"""Choose the next token from one row of logits: greedy, or temperature / top-k / top-p with a seed.

A repetition penalty (as transformers' RepetitionPenaltyLogitsProcessor) is applied first, in both modes.
The random draw depends only on (seed, step), so rerunning a step with the same settings gives the same
token every time, and a resumed or branched run matches an uninterrupted one.
"""
from __future__ import annotations

import numpy as np
from pipeline.core.errors import StagepipeError
from schemas.run import SamplingSettings


def check_sampling(settings: SamplingSettings) -> SamplingSettings:
    if not settings.repetition_penalty > 0:
        raise StagepipeError(f"--repetition_penalty {settings.repetition_penalty}: must be > 0 (1 means no penalty)")
    if not settings.greedy:
        if settings.temperature <= 0:
            raise StagepipeError(f"--temperature {settings.temperature}: must be > 0 (or use --greedy)")
        if not 0 < settings.top_p <= 1:
            raise StagepipeError(f"--top_p {settings.top_p}: must be in (0, 1]")
        if settings.top_k < 0:
            raise StagepipeError(f"--top_k {settings.top_k}: must be >= 0 (0 means no limit)")
    return settings


def with_overrides(base: SamplingSettings, greedy: bool = False, **given) -> SamplingSettings:
    """base with the settings a user gave (None: not given): giving temperature, top_k or top_p turns sampling on,
    greedy=True turns it off (keeping the repetition penalty)."""
    given = {k: v for k, v in given.items() if v is not None}
    settings = base.model_copy(update=given)
    if given.keys() & {"temperature", "top_k", "top_p"}:
        settings.greedy = False
    if greedy:
        settings.greedy = True
    return settings


def apply_repetition_penalty(logits: np.ndarray, seen_ids, penalty: float) -> np.ndarray:
    """A copy of one row of logits in which every distinct token id in seen_ids (prompt and generated so far) is
    penalized as transformers' RepetitionPenaltyLogitsProcessor does: logit / penalty if >= 0, else logit * penalty."""
    out = np.array(logits, copy=True)
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    if penalty != 1.0 and ids.size:
        picked = out[ids]
        out[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return out


def _penalized(logits, settings: SamplingSettings, seen_ids) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if settings.repetition_penalty == 1.0:
        return logits
    if seen_ids is None:
        raise ValueError("repetition_penalty needs seen_ids: the prompt and generated token ids so far")
    return apply_repetition_penalty(logits, seen_ids, settings.repetition_penalty)


def candidates(logits: np.ndarray, settings: SamplingSettings, seen_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities), most likely first: what a sampled step draws from (penalty, temperature, top-k,
    then top-p, in transformers' order)."""
    scaled = _penalized(logits, settings, seen_ids) / settings.temperature
    order = np.argsort(-scaled, kind="stable")
    if settings.top_k:
        order = order[: settings.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if settings.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), settings.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return order, probs


def sample(logits: np.ndarray, settings: SamplingSettings, step: int, seen_ids=None) -> int:
    """The next token id. seen_ids (prompt + generated ids so far) is needed when repetition_penalty != 1."""
    if settings.greedy:
        return int(np.argmax(_penalized(logits, settings, seen_ids)))
    order, probs = candidates(logits, settings, seen_ids)
    rng = np.random.default_rng([settings.seed, step])
    return int(order[rng.choice(len(order), p=probs)])
