"""Inputs of one step: token ids padded to the graph's T, the additive attention mask, and positions.

Mask columns 0..W-1 are cache slots (slots < past_len attend), columns W..W+T-1 the step's own tokens
(causal). W is the step's attention window: the smallest of the graphs' cache windows that holds
past_len + q_len slots (at most C, the cache size); the block graphs see cache slots [0, W) only. Padding
rows (q_len..T-1) attend only to themselves so their softmax stays finite; their outputs are ignored and their
K/V never reach the cache.
"""
from __future__ import annotations

import numpy as np

from pipeline.core.errors import StagepipeError


def step_mode(past_len: int, q_len: int) -> str:
    """Which graphs a step runs: prefill (T = max_input_len) for a first or multi-token step, else decode (T = 1)."""
    return "prefill" if past_len == 0 or q_len > 1 else "decode"


def graph_T(manifest, mode: str) -> int:
    return manifest.max_input_len if mode == "prefill" else 1


def attention_window(manifest, past_len: int, q_len: int) -> int:
    """The smallest cache window with block graphs that holds past_len + q_len slots."""
    need = past_len + q_len
    for w in manifest.windows():
        if need <= w:
            return w
    raise StagepipeError(f"past_len {past_len} + {q_len} new tokens does not fit the {manifest.max_cache_len}-slot "
                         "KV cache")


def graph_set(mode: str, window: int, max_cache_len: int) -> str:
    """Key in manifest.graphs: "prefill"/"decode" for the full cache, "<mode>_c<W>" (block graphs) for a window."""
    return mode if window == max_cache_len else f"{mode}_c{window}"


def graph_set_window(name: str, max_cache_len: int) -> int:
    """The attention window of a graph set named by graph_set."""
    return int(name.split("_c")[1]) if "_c" in name else max_cache_len


def hidden_dtype(manifest) -> np.dtype:
    """dtype of the hidden states passed between stages."""
    return np.dtype(np.float16 if manifest.precision == "fp16" else np.float32)


def step_inputs(token_ids, past_len: int, T: int, C: int, mask_value: float, pad_id: int = 0):
    """-> input_ids int64 (1,T), attention_mask float32 (1,1,T,C+T), position_ids int64 (1,T); C is the
    step's attention window."""
    q_len = len(token_ids)
    if not 1 <= q_len <= T:
        raise StagepipeError(f"a step takes 1..{T} tokens, got {q_len}")
    if past_len < 0 or past_len + q_len > C:
        raise StagepipeError(f"past_len {past_len} + {q_len} new tokens does not fit the {C}-slot attention window")
    input_ids = np.full((1, T), pad_id, dtype=np.int64)
    input_ids[0, :q_len] = token_ids
    mask = np.full((1, 1, T, C + T), mask_value, dtype=np.float32)
    mask[0, 0, :q_len, :past_len] = 0.0
    own = np.tril(np.ones((T, T), dtype=bool))
    own[q_len:] = np.eye(T, dtype=bool)[q_len:]
    mask[0, 0, :, C:][own] = 0.0
    position_ids = (past_len + np.arange(T, dtype=np.int64))[None, :]
    return input_ids, mask, position_ids
