"""How far quantized graphs are from the golden fp32 run, on held-out runs:

  stage errors   teacher-forced (pipeline.replay): each candidate stage on the golden inputs of every step (the golden
                 cache as the step saw it), its outputs against the golden ones: relative L2 error and cosine
  logits quality the candidate's whole pipeline on each held-out run's tokens (prompt and reply), every position's
                 logits against the fp32 graphs': cosine (mean, min) and top-1 agreement
"""
from __future__ import annotations

import numpy as np

from pipeline.core import layout
from pipeline.core.layout import read_token_file
from pipeline.npu.samples import RunFolderView
from pipeline.runtime.backends import Backend
from pipeline.runtime.generate import MemoryKVCache, forward_step, prompt_chunks


def stage_errors(runs: list[RunFolderView], candidate: Backend, stages: list[str]) -> dict[str, dict]:
    """stage -> the error it introduces, teacher-forced (pipeline.replay) over every step of the runs: the worst
    relative error of its outputs (hidden states, new K/V, logits) and where, their mean over steps, the lowest
    cosine."""
    from pipeline.tools.drift import worst
    from pipeline.tools.replay import replay

    reports = [replay(run.dir, candidate, stages=",".join(stages)) for run in runs]
    out = {}
    for stage in stages:
        per_step = [worst(r["stages"][stage]["introduced"]) for rep in reports for r in rep["steps"]
                    if r["stages"][stage]["introduced"]]
        summaries = [s for rep in reports for s in rep["stages"] if s["stage"] == stage and s["introduced"]]
        if not per_step:
            continue
        top = max(summaries, key=lambda s: s["introduced"]["rel_err"])["introduced"]
        out[stage] = {"rel_err_max": top["rel_err"], "at": f"{top['step']} {top['tensor']}",
                      "rel_err_mean": float(np.mean([v for v, _ in per_step])),
                      "cosine_min": min(s["introduced_cosine_min"] for s in summaries), "steps": len(per_step)}
    return out


def run_tokens(run: RunFolderView) -> list[int]:
    """The token sequence a run went through: its prompt, then every token it sampled that a later step fed."""
    tokens = list(run.settings.prompt_token_ids)
    for d, meta in run.steps():
        if meta.mode == "decode":
            tokens.append(meta.input_token_ids[0])
    token_file = layout.step_dirs(run.dir)[-1] / layout.NEXT_TOKEN_ID
    return tokens + ([read_token_file(token_file)] if token_file.exists() else [])


def sequence_logits(backend: Backend, tokens: list[int]) -> np.ndarray:
    """(n, V) logits of every position, teacher-forced in prefill chunks (n <= max_cache_len)."""
    m = backend.manifest
    tokens = tokens[:m.max_cache_len]
    cache, past_len, rows = MemoryKVCache(m), 0, []
    for chunk in prompt_chunks(tokens, m.max_input_len):
        rows.append(forward_step(backend, cache, chunk, past_len, all_rows=True))
        past_len += len(chunk)
    return np.concatenate(rows)


class LogitsQuality:
    """Logits agreement of candidates with the fp32 graphs on held-out runs (the fp32 logits computed once)."""

    def __init__(self, runs: list[RunFolderView], reference: Backend):
        self.tokens = [run_tokens(r) for r in runs]
        self.reference = [sequence_logits(reference, t) for t in self.tokens]

    def measure(self, candidate: Backend) -> dict:
        cos, top1 = [], []
        for tokens, ref in zip(self.tokens, self.reference):
            got = sequence_logits(candidate, tokens).astype(np.float64)
            ref = ref.astype(np.float64)
            cos.append((got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1)))
            top1.append(got.argmax(-1) == ref.argmax(-1))
        cos, top1 = np.concatenate(cos), np.concatenate(top1)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "top1": float(top1.mean()),
                "positions": int(len(cos))}
