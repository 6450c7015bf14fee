"""How far quantized graphs are from the golden fp32 run, on held-out runs:

  stage errors   teacher-forced: each candidate stage on the golden inputs of every step (the golden cache as the step
                 saw it), its output against the golden one: relative L2 error and cosine over the real rows
  logits quality the candidate's whole pipeline on each held-out run's tokens (prompt and reply), every position's
                 logits against the fp32 graphs': cosine (mean, min) and top-1 agreement
"""
from __future__ import annotations

import numpy as np

from pipeline.core import layout
from pipeline.core.layout import hidden_file, read_token_file
from pipeline.core.tensors import load_tensor
from pipeline.npu.samples import RunFolderView, StageSample, stage_samples
from pipeline.runtime.backends import Backend
from pipeline.runtime.generate import MemoryKVCache, forward_step, prompt_chunks


def errors(candidate: np.ndarray, golden: np.ndarray) -> tuple[float, float]:
    """(|c - g| / |g|, cosine) over the flattened tensors, in float64."""
    c, g = candidate.astype(np.float64).ravel(), golden.astype(np.float64).ravel()
    norm = np.linalg.norm(g) * np.linalg.norm(c)
    return float(np.linalg.norm(c - g) / max(np.linalg.norm(g), 1e-30)), float(c @ g / norm) if norm else 1.0


def stage_output(candidate: Backend, sample: StageSample) -> tuple[np.ndarray, np.ndarray] | None:
    """(candidate output, golden output) over the sample's real rows; None where the run kept no golden output
    for these rows (a prefill step's head ran on its last row only)."""
    m, q = candidate.manifest, sample.meta.q_len
    rows = q if sample.rows > 1 else 1
    if sample.stage == "embed":
        ids = load_tensor(sample.step_dir / layout.INPUT_IDS)
        return candidate.embed(ids)[:, :rows], load_tensor(sample.step_dir / hidden_file(0))[:, :rows]
    if sample.stage == "output":
        golden = load_tensor(sample.step_dir / layout.LOGITS)
        if golden.shape[1] != sample.rows:
            return None
        hidden = load_tensor(sample.step_dir / hidden_file(len(m.blocks)))
        hidden = hidden[:, q - 1:q] if sample.rows < hidden.shape[1] else hidden
        return candidate.output(hidden)[:, :rows], golden[:, :rows]
    k = int(sample.stage[5:])
    out = candidate.block(k, *sample.block_args(m))[0]
    return out[:, :rows], load_tensor(sample.step_dir / hidden_file(k + 1))[:, :rows]


def stage_errors(runs: list[RunFolderView], candidate: Backend, stages: list[str]) -> dict[str, dict]:
    """stage -> worst and mean relative error, lowest cosine, over every step of the runs."""
    report = {}
    for stage in stages:
        found = [stage_output(candidate, s) for s in stage_samples(runs, stage, len(candidate.manifest.blocks))]
        pairs = [errors(c, g) for c, g in (f for f in found if f is not None)]
        if pairs:
            rel, cos = np.array(pairs).T
            report[stage] = {"rel_err_max": float(rel.max()), "rel_err_mean": float(rel.mean()),
                             "cosine_min": float(cos.min()), "steps": len(pairs)}
    return report


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
