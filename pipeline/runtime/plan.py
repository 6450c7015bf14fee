"""What one step runs, decided in one place: its mode, the graphs' T and its attention window W.

Letters: T tokens a graph takes (max_input_len for prefill, 1 for decode), C the whole KV cache (max_cache_len
slots), W the step's attention window: the smallest of the graphs' windows that holds past_len + q_len slots.
The block graphs see cache slots [0, W) only.

A step's inputs: token ids padded to T, the additive attention mask and positions. Mask columns 0..W-1 are
cache slots (slots < past_len attend), columns W..W+T-1 the step's own tokens (causal). Padding rows
(q_len..T-1) attend only to themselves so their softmax stays finite; their outputs are ignored and their K/V
never reach the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import StagepipeError
from pipeline.core.layout import graph_set


@dataclass(frozen=True)
class StepPlan:
    mode: str  # "prefill" or "decode"
    T: int  # tokens the step's graphs take
    W: int  # attention window: cache slots [0, W) the block graphs see
    C: int  # the whole cache
    past_len: int  # cache slots filled before the step
    q_len: int  # real tokens in the step (the rest of T is padding)

    @property
    def next_past_len(self) -> int:
        return self.past_len + self.q_len

    @property
    def block_graphs(self) -> str:
        """The manifest graph set of the step's block graphs."""
        return graph_set(self.mode, self.W, self.C)


def plan_step(manifest, past_len: int, q_len: int) -> StepPlan:
    """Prefill (T = max_input_len) for a first or multi-token step, else decode (T = 1); W the smallest window
    with block graphs that holds past_len + q_len slots."""
    mode = "prefill" if past_len == 0 or q_len > 1 else "decode"
    T = manifest.max_input_len if mode == "prefill" else 1
    if past_len < 0 or not 1 <= q_len <= T:
        raise StagepipeError(f"a {mode} step takes 1..{T} tokens at past_len >= 0, got {q_len} at {past_len}")
    return StepPlan(mode, T, window_for(manifest, past_len + q_len), manifest.max_cache_len, past_len, q_len)


def window_for(manifest, slots: int) -> int:
    """The smallest attention window with block graphs that holds `slots` cache slots."""
    fitting = [w for w in manifest.windows() if slots <= w]
    if not fitting:
        raise StagepipeError(f"{slots} cache slots do not fit the {manifest.max_cache_len}-slot KV cache")
    return fitting[0]


def position_ids_shape(manifest, T: int) -> tuple[int, ...]:
    """(1,T), or (3,1,T) for a VL model's M-RoPE (pipeline/runtime/mrope.py)."""
    return (3, 1, T) if manifest.model.mrope_section else (1, T)


def hidden_dtype(manifest) -> np.dtype:
    """dtype of the hidden states passed between stages."""
    return np.dtype(np.float16 if manifest.precision == "fp16" else np.float32)


def step_inputs(token_ids, past_len: int, T: int, W: int, mask_value: float, pad_id: int = 0):
    """-> input_ids int64 (1,T), attention_mask float32 (1,1,T,W+T), position_ids int64 (1,T)."""
    q_len = len(token_ids)
    if not 1 <= q_len <= T:
        raise StagepipeError(f"a step takes 1..{T} tokens, got {q_len}")
    if past_len < 0 or past_len + q_len > W:
        raise StagepipeError(f"past_len {past_len} + {q_len} new tokens does not fit the {W}-slot attention window")
    input_ids = np.full((1, T), pad_id, dtype=np.int64)
    input_ids[0, :q_len] = token_ids
    mask = np.full((1, 1, T, W + T), mask_value, dtype=np.float32)
    mask[0, 0, :q_len, :past_len] = 0.0
    own = np.tril(np.ones((T, T), dtype=bool))
    own[q_len:] = np.eye(T, dtype=bool)[q_len:]
    mask[0, 0, :, W:][own] = 0.0
    position_ids = (past_len + np.arange(T, dtype=np.int64))[None, :]
    return input_ids, mask, position_ids


def plan_inputs(plan: StepPlan, token_ids, mask_value: float):
    """step_inputs for a planned step."""
    return step_inputs(token_ids, plan.past_len, plan.T, plan.W, mask_value)


def rope_tables(manifest, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, D) float32 of a step's positions (1, T) (M-RoPE: (3, 1, T)), as transformers computes them:
    what block graphs converted with --rope_input take in place of position_ids (token_embed writes them as cos.npy,
    sin.npy)."""
    from pipeline.runtime.reference import mrope_cos_sin, rope_cos_sin

    c = manifest.model
    if c.mrope_section:
        return mrope_cos_sin(position_ids[:, 0], c.head_dim, c.rope_theta, c.mrope_section)
    return rope_cos_sin(position_ids[0], c.head_dim, c.rope_theta)
