"""Generation in memory: the whole prefill/decode loop over the split stages on one screen.

This is what the file pipeline does step by step with .npy files; tests and benchmarks use it directly.
"""
from __future__ import annotations

import numpy as np

from pipeline.core.layout import LOGITS, PRESENT_KEY, PRESENT_VALUE, hidden_file
from pipeline.runtime.backends import Backend
from pipeline.runtime.kv_cache import block_shape, store_slots
from pipeline.runtime.mrope import MropeStep
from pipeline.runtime.plan import plan_inputs, plan_step
from pipeline.runtime.sampling import SamplingSettings, sample


def prompt_chunks(token_ids: list[int], T: int) -> list[list[int]]:
    """A prompt longer than T is prefilled in chunks of T tokens, one step per chunk."""
    return [token_ids[i:i + T] for i in range(0, len(token_ids), T)]


def generation_steps(manifest, prompt_len: int, max_new_tokens: int) -> list[tuple[int, int]]:
    """(past_len, q_len) of each step generate() runs when no stop token comes: the prompt's chunks, then one
    decode step per new token after the first while the cache has room."""
    T, C = manifest.max_input_len, manifest.max_cache_len
    chunks = [(i, min(T, prompt_len - i)) for i in range(0, prompt_len, T)]
    return chunks + [(past_len, 1) for past_len in range(prompt_len, min(prompt_len + max_new_tokens - 1, C))]


class MemoryKVCache:
    """Per-block (Lk,1,KV,C,D) arrays; a step writes only its new slots [past_len, past_len+q_len)."""

    def __init__(self, manifest):
        dtype, blocks = np.dtype(manifest.kv_dtype), range(len(manifest.blocks))
        self.keys = [np.zeros(block_shape(manifest, k), dtype) for k in blocks]
        self.values = [np.zeros(block_shape(manifest, k), dtype) for k in blocks]

    def past(self, k: int):
        return self.keys[k], self.values[k]

    def store(self, k: int, past_len: int, q_len: int, present_key, present_value):
        store_slots(self.keys[k], past_len, q_len, present_key)
        store_slots(self.values[k], past_len, q_len, present_value)


def forward_step(backend: Backend, cache, token_ids: list[int], past_len: int, all_rows: bool = False,
                 trace=None, position_offset: int = 0, mrope: MropeStep | None = None) -> np.ndarray:
    """Run embed -> blocks -> output for one step; returns the logits row of the last real token, or with
    all_rows=True the (q_len, V) logits of every real token (teacher forcing: perplexity, quality).

    trace(stage, name, array), when given, sees every stage output as it is made: hidden_block{k}, the blocks'
    present_key/present_value (all T rows) and logits. position_offset shifts the positions fed to RoPE.
    mrope: a VL model's positions and image rows (pipeline/runtime/mrope.py)."""
    m = backend.manifest
    plan = plan_step(m, past_len, len(token_ids))
    input_ids, mask, positions = plan_inputs(plan, token_ids, m.mask_value)
    trace = trace or (lambda stage, name, array: None)
    hidden = backend.embed(input_ids)
    if mrope is not None:
        positions, hidden = mrope.apply(plan, token_ids, hidden)
    positions = positions + position_offset
    trace("embed", hidden_file(0), hidden)
    for k in range(len(m.blocks)):
        hidden, present_key, present_value = backend.block(k, hidden, mask, positions, *cache.past(k))
        cache.store(k, past_len, len(token_ids), present_key, present_value)
        for name, array in ((hidden_file(k + 1), hidden), (PRESENT_KEY, present_key), (PRESENT_VALUE, present_value)):
            trace(f"block{k}", name, array)
    if all_rows:
        logits = backend.output(hidden)
    else:  # the head runs on the last real row only (T=1 graph)
        logits = backend.output(hidden[:, len(token_ids) - 1:len(token_ids)])
    trace("output", LOGITS, logits)
    return logits[0, :len(token_ids)] if all_rows else logits[0, 0]


def generate(backend: Backend, prompt_ids: list[int], max_new_tokens: int,
             settings: SamplingSettings = SamplingSettings(), stop_ids: set[int] = frozenset(),
             mrope: MropeStep | None = None) -> list[int]:
    """mrope: a VL prompt with an image (MropeStep.for_prompt); a VL model's text prompt needs none."""
    m = backend.manifest
    if m.model.mrope_section and mrope is None:
        mrope = MropeStep()
    cache = MemoryKVCache(m)
    past_len, step, new = 0, 0, []
    for chunk in prompt_chunks(prompt_ids, m.max_input_len):
        logits = forward_step(backend, cache, chunk, past_len, mrope=mrope)
        past_len += len(chunk)
        step += 1
    while True:
        token = sample(logits, settings, step - 1)
        new.append(token)
        if len(new) >= max_new_tokens or token in stop_ids or past_len + 1 > m.max_cache_len:
            return new
        logits = forward_step(backend, cache, [token], past_len, mrope=mrope and MropeStep(mrope.delta))
        past_len += 1
        step += 1
