"""What replay measures, step by step: a run folder read back (RunFolder), each candidate stage run on a golden
step's inputs and the golden cache as it was before the step (TeacherForcing), and a free-running candidate run's
inputs and outputs against the golden ones (FreeRunning). pipeline.tools.replay turns these into the report."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core import layout
from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import load_model_file
from pipeline.core.layout import LOGITS, PRESENT_KEY, PRESENT_VALUE, hidden_file, step_dirs
from pipeline.core.tensors import load_tensor
from pipeline.runtime.backends import Backend
from pipeline.runtime.kv_cache import block_shape
from pipeline.runtime.plan import hidden_dtype, step_inputs, window_for
from pipeline.tools.drift import SlotErrors, tensor_error
from schemas.run import CacheRecord, StepMeta

PAST = {"key": "past_key", "value": "past_value"}


class RunFolder:
    """A run folder's steps (meta.json each) and its KV cache files, read-only."""

    def __init__(self, path: Path, what: str):
        self.dir = Path(path)
        if not layout.looks_like_run_dir(self.dir):
            raise StagepipeError(f"{self.dir}: not a run folder (run.json, step_NNNN/); give the {what} run's folder")
        self.steps: dict[str, tuple[Path, StepMeta | None]] = {}
        for d in step_dirs(self.dir):
            meta = d / layout.META
            self.steps[d.name] = (d, load_model_file(meta, StepMeta) if meta.is_file() else None)
        if not self.steps:
            raise StagepipeError(f"{self.dir}: has no step folders")
        self._cache: dict[tuple[str, int], np.ndarray | None] = {}

    def tensor(self, step: str, name: str) -> np.ndarray:
        return load_tensor(self.steps[step][0] / name, what=name)

    def has(self, step: str, name: str) -> bool:
        return step in self.steps and (self.steps[step][0] / name).is_file()

    def cache(self, kind: str, k: int) -> np.ndarray | None:
        """The final (Lk,1,KV,C,D) cache of block k, memory-mapped; None when the folder has none."""
        if (kind, k) not in self._cache:
            path = self.dir / layout.KV_DIR / layout.kv_file(kind, k)
            try:
                self._cache[kind, k] = np.load(path, mmap_mode="r") if path.is_file() else None
            except (ValueError, OSError) as e:
                raise StagepipeError(f"{path}: not a readable .npy ({e})") from None
        return self._cache[kind, k]

    def cache_record(self) -> CacheRecord:
        return load_model_file(self.dir / layout.KV_DIR / layout.CACHE_JSON, CacheRecord)


def check_fits(gold: RunFolder, candidate: Backend):
    """The candidate's graphs must take the golden run's tensors as they are: same T, C, block split and
    cache shapes, hidden size and vocabulary. Precision, kv_dtype and attention windows may differ."""
    m = candidate.manifest
    meta = next(meta for _, meta in gold.steps.values() if meta is not None)
    where = f"candidate {candidate.onnx_dir}"
    if (meta.max_input_len, meta.max_cache_len) != (m.max_input_len, m.max_cache_len):
        raise StagepipeError(f"{where} has max_input_len/max_cache_len {m.max_input_len}/{m.max_cache_len}, the "
                             f"golden run {meta.max_input_len}/{meta.max_cache_len}; convert it with those")
    shapes = gold.cache_record().block_shapes
    mine = [list(block_shape(m, k)) for k in range(len(m.blocks))]
    if shapes != mine:
        raise StagepipeError(f"{where}: its blocks' caches are {mine}, the golden run's {shapes}; convert it from "
                             "the same model with the same --blocks/--layer_split")
    first = next(iter(gold.steps))
    H, V = gold.tensor(first, hidden_file(0)).shape[2], gold.tensor(first, LOGITS).shape[2]
    if (H, V) != (m.model.hidden_size, m.model.vocab_size):
        raise StagepipeError(f"{where}: hidden size/vocabulary {m.model.hidden_size}/{m.model.vocab_size}, the "
                             f"golden run's {H}/{V}")


class TeacherForcing:
    """Runs each candidate stage on the golden inputs of a step, the golden cache as it was before the step."""

    def __init__(self, gold: RunFolder, candidate: Backend):
        self.gold, self.candidate = gold, candidate
        m = candidate.manifest
        self.blocks = len(m.blocks)
        self.hidden_dtype, kv = hidden_dtype(m), np.dtype(m.kv_dtype)
        for k in range(self.blocks):
            for kind in layout.KV_KINDS:
                if gold.cache(kind, k) is None:
                    raise StagepipeError(f"{gold.dir / layout.KV_DIR}: golden cache file {layout.kv_file(kind, k)} "
                                         "is missing; replay needs the golden run's kv_cache")
        # the cache before the current step: golden slots [0, filled), zeros above (a fresh cache's content)
        self.work = {(kind, k): np.zeros(block_shape(m, k), kv) for k in range(self.blocks) for kind in layout.KV_KINDS}
        self.filled = 0

    def advance(self, past_len: int):
        for (kind, k), work in self.work.items():
            if past_len > self.filled:
                work[:, :, :, self.filled:past_len] = self.gold.cache(kind, k)[:, :, :, self.filled:past_len]
            else:
                work[:, :, :, past_len:self.filled] = 0
        self.filled = past_len

    def mask(self, step: str, meta: StepMeta) -> np.ndarray:
        """The golden mask, or the same one laid out for the candidate's window when its windows differ."""
        m = self.candidate.manifest
        golden = self.gold.tensor(step, layout.ATTENTION_MASK)
        W = window_for(m, meta.next_past_len)
        if W == golden.shape[3] - golden.shape[2]:
            return golden
        return step_inputs(meta.input_token_ids, meta.past_len, golden.shape[2], W, m.mask_value)[1]

    def step(self, step: str, meta: StepMeta, stages: list[str]) -> dict[str, dict]:
        """{stage: {tensor: error}} for one golden step."""
        g, c = self.gold, self.candidate
        p, q = meta.past_len, meta.q_len
        self.advance(p)
        ids, positions = g.tensor(step, layout.INPUT_IDS), g.tensor(step, layout.POSITION_IDS)
        mask = self.mask(step, meta) if any(s.startswith("block") for s in stages) else None
        hidden = lambda k: g.tensor(step, hidden_file(k))  # noqa: E731
        out = {}
        if "embed" in stages:
            out["embed"] = {hidden_file(0): tensor_error(c.embed(ids)[:, :q], hidden(0)[:, :q])}
        for k in range(self.blocks):
            if f"block{k}" not in stages:
                continue
            h, present_key, present_value = c.block(k, hidden(k).astype(self.hidden_dtype), mask, positions,
                                                    self.work["key", k], self.work["value", k])
            out[f"block{k}"] = {
                hidden_file(k + 1): tensor_error(h[:, :q], hidden(k + 1)[:, :q]),
                PRESENT_KEY: tensor_error(present_key[:, :, :, :q], g.cache("key", k)[:, :, :, p:p + q]),
                PRESENT_VALUE: tensor_error(present_value[:, :, :, :q], g.cache("value", k)[:, :, :, p:p + q])}
        if "output" in stages:
            golden_logits, h = g.tensor(step, LOGITS), hidden(self.blocks)
            last_row = golden_logits.shape[1] == 1 and h.shape[1] > 1  # the head ran on the last real row only
            logits = c.output((h[:, q - 1:q] if last_row else h).astype(self.hidden_dtype))
            rows = 1 if last_row else q
            out["output"] = {LOGITS: tensor_error(logits[:, :rows], golden_logits[:, :rows])}
        return out


class FreeRunning:
    """A free-running candidate run against the golden one: what each stage received and produced."""

    def __init__(self, gold: RunFolder, cand: RunFolder, blocks: int, slots: int):
        self.gold, self.cand, self.blocks, self.slots = gold, cand, blocks, slots
        self._slot_errors: dict[tuple[str, int], SlotErrors | None] = {}
        self.diverged_at: str | None = None

    def slot_errors(self, kind: str, k: int) -> SlotErrors | None:
        if (kind, k) not in self._slot_errors:
            a, b = self.cand.cache(kind, k), self.gold.cache(kind, k)
            fits = a is not None and b is not None and a.shape == b.shape
            self._slot_errors[kind, k] = SlotErrors(a, b, self.slots) if fits else None
        return self._slot_errors[kind, k]

    def same_inputs(self, step: str, meta: StepMeta) -> bool:
        _, cmeta = self.cand.steps[step]
        if cmeta is not None:
            return (cmeta.past_len, cmeta.input_token_ids) == (meta.past_len, meta.input_token_ids)
        if self.cand.has(step, layout.INPUT_IDS):  # dumps without meta.json: the ids tell
            return bool(np.array_equal(self.cand.tensor(step, layout.INPUT_IDS)[:, :meta.q_len],
                                       self.gold.tensor(step, layout.INPUT_IDS)[:, :meta.q_len]))
        return True

    def step(self, step: str, meta: StepMeta, stages: list[str]) -> tuple[dict, dict, str | None]:
        """({stage: received errors}, {stage: produced errors}, note) for one step."""
        if step not in self.cand.steps:
            return {}, {}, "not in the candidate run"
        if self.diverged_at is None and not self.same_inputs(step, meta):
            self.diverged_at = step
        if self.diverged_at is not None:
            return {}, {}, f"the candidate run's tokens differ from {self.diverged_at} on"
        p, q = meta.past_len, meta.q_len

        def hidden(k):
            name = hidden_file(k)
            if not self.cand.has(step, name):
                return {}
            return {name: tensor_error(self.cand.tensor(step, name)[:, :q], self.gold.tensor(step, name)[:, :q])}

        def cache(k, lo, hi, named):
            errs = {}
            for kind in layout.KV_KINDS:
                if hi <= lo:
                    continue
                se = self.slot_errors(kind, k)
                if se is None:
                    continue
                if lo == 0:
                    errs[named[kind]] = se.prefix(hi)
                else:
                    errs[named[kind]] = tensor_error(self.cand.cache(kind, k)[:, :, :, lo:hi],
                                                     self.gold.cache(kind, k)[:, :, :, lo:hi])
            return errs

        received, produced = {}, {}
        for stage in stages:
            if stage == "embed":
                received[stage] = {layout.INPUT_IDS: tensor_error(np.zeros(1), np.zeros(1))}  # same ids (checked)
                produced[stage] = hidden(0)
            elif stage == "output":
                received[stage] = hidden(self.blocks)
                produced[stage] = self._logits(step, q)
            else:
                k = int(stage[5:])
                received[stage] = {**hidden(k), **cache(k, 0, p, PAST)}
                produced[stage] = {**hidden(k + 1), **cache(k, p, p + q, {"key": PRESENT_KEY, "value": PRESENT_VALUE})}
        return received, produced, None

    def _logits(self, step: str, q: int) -> dict:
        if not self.cand.has(step, LOGITS):
            return {}
        a, b = self.cand.tensor(step, LOGITS), self.gold.tensor(step, LOGITS)
        if a.shape[1] != b.shape[1] and min(a.shape[1], b.shape[1]) == 1:  # --full_logits on one side only
            a, b = (a[:, q - 1:q], b) if a.shape[1] > 1 else (a, b[:, q - 1:q])
        rows = min(q, a.shape[1])
        return {LOGITS: tensor_error(a[:, :rows], b[:, :rows])}
