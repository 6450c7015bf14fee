"""What each stage does to a step folder. Stage CLIs (stages/) and doit (dodo.py) both call these.

A step folder holds meta.json and the step's tensors. Each stage records in meta.json how long it took, a
digest of its inputs and a digest of every file it wrote (a block also of the KV cache slots it wrote). A stage
asked to redo work skips it only when its inputs match the record and everything it wrote is still there,
unchanged (stage_problem); otherwise it does the work again. So a rerun (by hand, or after a crash that lost
doit's records) is idempotent and cheap, and damage is repaired instead of trusted.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.core.atomic import rewrite_text, write_npy, write_text
from pipeline.runtime.backends import Backend
from pipeline.core.errors import StagepipeError
from pipeline.core.layout import (META, StepPaths, hidden_file, read_token_file, step_name, step_number,
                                   token_file_text)
from pipeline.runtime.kv_cache import slots_digest, store_slots
from pipeline.runtime.mrope import MropeStep
from pipeline.runtime.plan import StepPlan, hidden_dtype, plan_inputs, plan_step, position_ids_shape, rope_tables
from pipeline.runtime.sampling import check_sampling, sample
from pipeline.core.tensors import digest, file_digest, parse_tensor, read_file
from pipeline.core.jsonfile import load_model_file
from schemas.run import SamplingSettings, StageRecord, StepMeta

# the step fields token_embed decides; a later stage refuses a meta.json whose fields were edited since
STEP_FIELDS = {"step", "mode", "past_len", "q_len", "next_past_len", "max_input_len", "max_cache_len",
               "attention_window", "input_token_ids", "onnx_fingerprint", "backend", "sample_next", "history",
               "position_delta"}


def load_meta(path: Path) -> StepMeta:
    return load_model_file(path, StepMeta)


def readable_meta(path: Path) -> StepMeta | None:
    """The step's meta.json, or None when it is missing or unreadable (the step is then done again)."""
    try:
        return load_meta(path)
    except StagepipeError:
        return None


def save_meta(path: Path, meta: StepMeta, last: bool = False):
    """Every stage rewrites meta.json; the output stage, the step's last, passes last=True (atomic.rewrite_text)."""
    rewrite_text(path, meta.model_dump_json(indent=2) + "\n", keep_spare=not last)


def step_identity(meta: StepMeta) -> str:
    return digest(meta.model_dump_json(include=STEP_FIELDS))


def final_hidden(step_dir: Path, m) -> Path:
    return Path(step_dir) / hidden_file(len(m.blocks))


def history_of(prev_step_dir: Path | None, m) -> str:
    """What a step's cache slots [0, past_len) depend on, in one digest: the previous step's last hidden states
    (the head's input), which every earlier token and cache slot feeds. A step whose history changed is
    recomputed even when its own token did not (an edit upstream can bring back the same token over a
    different cache). The hidden states stand in for the logits: the same history in 4 KB, not 600 KB."""
    if prev_step_dir is None:
        return ""
    hidden = final_hidden(prev_step_dir, m)
    if not hidden.exists():
        raise StagepipeError(f"{hidden}: the previous step has not run all its blocks yet; finish it first")
    return digest(hidden)


def record_key(paths: StepPaths, path: Path) -> str:
    """How a stage record names a file it wrote: by name inside the step folder, else by its path."""
    path = Path(path)
    return path.name if path.parent == paths.step_dir else str(path)


def stage_problem(meta: StepMeta, stage: str, paths: StepPaths, past=None, wanted=()) -> str | None:
    """Why the work `stage` recorded in this step cannot be trusted, or None when everything it wrote still
    holds: each file it recorded is there with the same bytes, meta.json's step fields are as token_embed wrote
    them, (blocks, given the cache's (past_key, past_value)) the cache slots hold what the block wrote, and
    (output) the token files are there. wanted: record keys the caller's outputs must be among."""
    rec = meta.stages.get(stage)
    if rec is None:
        return f"{stage} has not finished"
    if not rec.outputs:
        return f"{stage}'s record was written without output digests (an older stagepipe)"
    missing = [k for k in wanted if k not in rec.outputs]
    if missing:
        return f"{stage} wrote other files than {missing[0]}"
    for key, want in rec.outputs.items():
        if key == META:
            if want != step_identity(meta):
                return f"{paths.meta}: step fields (past_len, q_len, ...) were edited after token_embed wrote them"
            continue
        path = paths.step_dir / key
        try:
            raw = path.read_bytes()
        except OSError as e:
            return f"{path}: {'missing' if isinstance(e, FileNotFoundError) else f'unreadable ({e.strerror})'}"
        if file_digest(raw) != want:
            return f"{path}: changed since {stage} wrote it"
    if past is not None and stage.startswith("block") and \
            slots_digest(*past, meta.past_len, meta.q_len) != rec.cache_digest:
        where = Path(past[0].filename).parent if getattr(past[0], "filename", None) else "the KV cache"
        return f"{where}: slots {meta.past_len}..{meta.next_past_len - 1} no longer hold what {stage} wrote there"
    if stage == "output" and meta.sample_next:
        try:
            read_token_file(paths.next_token_file)  # any token id: an edit by hand is followed (edited_token)
        except StagepipeError:
            return f"{paths.next_token_file}: missing or not a token id"
    return None


def edited_token(meta: StepMeta, paths: StepPaths) -> int | None:
    """The token id in next_token_id.txt when it is not the one the output stage sampled (an edit by hand, which
    the steps after it follow), else None."""
    if "output" not in meta.stages or not meta.sample_next or meta.next_token_id is None:
        return None
    try:
        token = read_token_file(paths.next_token_file)
    except StagepipeError:
        return None
    return token if token != meta.next_token_id else None


def _trusted(meta: StepMeta | None, stage: str, inputs_digest: str, paths: StepPaths, on_skip, done: str,
             past=None, wanted=()) -> bool:
    """True when the stage's recorded work holds for these inputs (then on_skip hears why nothing is done)."""
    rec = meta and meta.stages.get(stage)
    if not rec or rec.inputs_digest != inputs_digest or stage_problem(meta, stage, paths, past, wanted):
        return False
    meta._reused = True
    if on_skip:
        on_skip(f"{paths.step_dir}: {stage} already done: its inputs and {done} match meta.json's record; nothing "
                "rewritten (delete a file it wrote to have it redone)")
    return True


def adopt_token_edit(paths: StepPaths, token_text) -> int:
    """The step's next_token_id.txt, which the user may have edited by hand: when it differs from meta.json,
    next_token.txt and meta.json (the output stage's record of next_token.txt included) are refreshed to match
    it, so the step folder never contradicts itself."""
    token = read_token_file(paths.next_token_file)
    meta = load_meta(paths.meta)
    if meta.next_token_id != token:
        written = write_text(paths.next_token_text, token_text(token))
        meta.next_token_id = token
        rec = meta.stages.get("output")
        if rec and record_key(paths, paths.next_token_text) in rec.outputs:
            rec.outputs[record_key(paths, paths.next_token_text)] = written
        save_meta(paths.meta, meta, last=True)
    return token


def token_embed(backend: Backend, paths: StepPaths, step: int, past_len: int, token_ids: list[int],
                sampling: SamplingSettings, sample_next: bool = True, hidden_out: Path | None = None,
                prev_step_dir: Path | None = None, mrope: MropeStep | None = None, on_skip=None) -> StepMeta:
    """Write the step's inputs, hidden_block0 and a new meta.json. When the step's fields are unchanged the
    other stages' records are kept: each still holds only if its inputs and outputs do (stage_problem).
    mrope: a VL model's prompt step with an image (MropeStep.for_prompt); other VL steps continue the
    previous step's position_delta. on_skip(line): told why nothing was redone, when so."""
    started = time.perf_counter()
    m = backend.manifest
    vocab = m.model.vocab_size
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        raise StagepipeError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    plan = plan_step(m, past_len, len(token_ids))
    hidden_out = Path(hidden_out or paths.hidden(0))
    history = history_of(prev_step_dir, m) if past_len > 0 else ""
    if m.model.mrope_section and mrope is None:
        mrope = MropeStep(delta_of(prev_step_dir) if past_len > 0 else 0)
    inputs_digest = digest(m.graphs_fingerprint, backend.name, step, past_len, token_ids, history,
                           *([mrope.digest(plan)] if mrope else []))
    meta = StepMeta(step=step, mode=plan.mode, past_len=past_len, q_len=len(token_ids),
                    next_past_len=plan.next_past_len, max_input_len=m.max_input_len,
                    max_cache_len=m.max_cache_len, attention_window=plan.W, input_token_ids=list(token_ids),
                    onnx_fingerprint=m.graphs_fingerprint, backend=backend.name, sampling=check_sampling(sampling),
                    sample_next=sample_next, history=history, position_delta=mrope.delta if mrope else None)
    old = readable_meta(paths.meta)
    same_step = old is not None and step_identity(old) == step_identity(meta)
    outputs = [paths.input_ids, paths.attention_mask, paths.position_ids, hidden_out]
    if m.rope_input:  # the block graphs take the RoPE tables: they are this step's inputs too
        outputs += [paths.rope_cos, paths.rope_sin]
    if same_step and _trusted(old, "embed", inputs_digest, paths, on_skip, "the tensors it wrote",
                              wanted=[record_key(paths, p) for p in outputs]):
        return old
    input_ids, mask, positions = plan_inputs(plan, token_ids, m.mask_value)
    hidden = backend.embed(input_ids)
    if mrope is not None:  # the embed graph is the text model's; image rows and 3-D positions are set here
        positions, hidden = mrope.apply(plan, token_ids, hidden)
    arrays = [input_ids, mask, positions, hidden, *(rope_tables(m, positions) if m.rope_input else ())]
    written = {record_key(paths, path): write_npy(path, arr) for path, arr in zip(outputs, arrays)}
    written[META] = step_identity(meta)
    record = StageRecord(seconds=time.perf_counter() - started, inputs_digest=inputs_digest, outputs=written)
    if same_step:  # the later stages' records stay: each is checked against its own inputs and outputs
        meta.stages = {"embed": record, **{k: v for k, v in old.stages.items() if k != "embed"}}
        meta.next_token_id, meta.seen_token_count = old.next_token_id, old.seen_token_count
    else:
        meta.stages["embed"] = record
    save_meta(paths.meta, meta)
    return meta


def delta_of(prev_step_dir: Path | None) -> int:
    """The M-RoPE position delta a VL step continues from: the previous step's (0 without one)."""
    if prev_step_dir is None:
        return 0
    path = Path(prev_step_dir) / META
    if not path.exists():
        raise StagepipeError(f"{path}: the previous step has no meta.json; run its token_embed first")
    delta = load_meta(path).position_delta
    if delta is None:
        raise StagepipeError(f"{path}: no position_delta: the previous step was not made by a VL model's graphs")
    return delta


def block(backend: Backend, paths: StepPaths, k: int, past_key: np.ndarray, past_value: np.ndarray,
          hidden_in: Path | None = None, hidden_out: Path | None = None, on_skip=None) -> StepMeta:
    """Run block k; writes its hidden states and the step's new K/V into the cache slots (past_len...)."""
    started = time.perf_counter()
    m = backend.manifest
    meta = load_meta(paths.meta)
    _check_meta(meta, backend, paths.meta)
    if not 0 <= k < len(m.blocks):
        raise StagepipeError(f"--block {k}: this model has blocks 0..{len(m.blocks) - 1}")
    hidden_in, hidden_out = Path(hidden_in or paths.hidden(k)), Path(hidden_out or paths.hidden(k + 1))
    name = f"block{k}"
    raw = {"hidden states": read_file(hidden_in, "hidden states"),  # read once: for the digest and the arrays
           "attention mask": read_file(paths.attention_mask, "attention mask"),
           "position ids": read_file(paths.position_ids, "position ids")}
    if m.rope_input:
        raw.update({f"RoPE {n}": read_file(path, f"RoPE {n}") for n, path in (("cos", paths.rope_cos),
                                                                             ("sin", paths.rope_sin))})
    inputs_digest = digest(*raw.values(), meta.history)
    slots = f"{hidden_out.name} and cache slots {meta.past_len}..{meta.next_past_len - 1}"
    if _trusted(meta, name, inputs_digest, paths, on_skip, slots, (past_key, past_value),
                [record_key(paths, hidden_out)]):
        return meta
    plan, H = meta_plan(meta, m, paths.meta), m.model.hidden_size
    T, W = plan.T, plan.W
    hidden = parse_tensor(raw["hidden states"], hidden_in, (1, T, H), hidden_dtype(m), "hidden states")
    mask = parse_tensor(raw["attention mask"], paths.attention_mask, (1, 1, T, W + T), np.float32, "attention mask")
    positions = parse_tensor(raw["position ids"], paths.position_ids, position_ids_shape(m, T), np.int64,
                             "position ids")
    tables = {}
    if m.rope_input:  # only then: a backend of your own need not know the argument
        D = m.model.head_dim
        tables["rope"] = tuple(parse_tensor(raw[f"RoPE {n}"], path, (T, D), np.float32, f"RoPE {n}")
                               for n, path in (("cos", paths.rope_cos), ("sin", paths.rope_sin)))
    out, present_key, present_value = backend.block(k, hidden, mask, positions, past_key, past_value, **tables)
    store_slots(past_key, meta.past_len, meta.q_len, present_key)
    store_slots(past_value, meta.past_len, meta.q_len, present_value)
    written = {record_key(paths, hidden_out): write_npy(hidden_out, out)}
    meta.stages[name] = StageRecord(seconds=time.perf_counter() - started, inputs_digest=inputs_digest,
                                    outputs=written,
                                    cache_digest=slots_digest(past_key, past_value, meta.past_len, meta.q_len))
    save_meta(paths.meta, meta)
    return meta


def output(backend: Backend, paths: StepPaths, sampling: SamplingSettings | None = None,
           hidden_in: Path | None = None, token_text=None, full_logits: bool = False,
           context_ids=None, on_skip=None) -> StepMeta:
    """Final norm + lm_head; samples the next token from the last real row (unless a prompt chunk follows).

    A prefill step computes logits for its last real row only (through the T=1 graph), as generation needs;
    full_logits=True runs the prefill graph on all T rows, for comparing every position. context_ids: the token
    ids in the cache before this step, which a repetition penalty needs (with the step's own: the ids so far).
    An edited next_token_id.txt is kept as long as the logits hold (that is how a run is steered by hand)."""
    started = time.perf_counter()
    m = backend.manifest
    meta = load_meta(paths.meta)
    _check_meta(meta, backend, paths.meta)
    if sampling is not None and sampling != meta.sampling:
        meta.sampling = check_sampling(sampling)
    hidden_in = Path(hidden_in or paths.hidden(len(m.blocks)))
    raw = read_file(hidden_in, "hidden states")
    seen = penalized_ids(meta, context_ids, paths.meta)
    inputs_digest = digest(raw, meta.sampling.model_dump_json(), meta.sample_next, full_logits, meta.history,
                           *([seen] if seen is not None else []))
    done = f"{paths.logits.name}{' and the token files' if meta.sample_next else ''}"
    if _trusted(meta, "output", inputs_digest, paths, on_skip, done, wanted=[record_key(paths, paths.logits)]):
        return meta
    T, H = meta_plan(meta, m, paths.meta).T, m.model.hidden_size
    hidden = parse_tensor(raw, hidden_in, (1, T, H), hidden_dtype(m), "hidden states")
    last_row = T > 1 and not full_logits
    logits = backend.output(hidden[:, meta.q_len - 1:meta.q_len] if last_row else hidden)
    written = {record_key(paths, paths.logits): write_npy(paths.logits, logits)}
    meta.next_token_id = None
    if meta.sample_next:
        token = sample(logits[0, -1 if last_row else meta.q_len - 1], meta.sampling, meta.step, seen)
        meta.seen_token_count = None if seen is None else len(seen)
        write_text(paths.next_token_file, token_file_text(token))  # not in the record: it may be edited by hand
        text = token_text(token) if token_text else f"<{token}>"
        written[record_key(paths, paths.next_token_text)] = write_text(paths.next_token_text, text)
        meta.next_token_id = token
    meta.stages["output"] = StageRecord(seconds=time.perf_counter() - started, inputs_digest=inputs_digest,
                                        outputs=written)
    save_meta(paths.meta, meta, last=True)
    return meta


def penalized_ids(meta: StepMeta, context_ids, where: Path) -> list[int] | None:
    """The ids a repetition penalty sees when this step samples (None without a penalty): the cache's."""
    if meta.sampling.repetition_penalty == 1.0 or not meta.sample_next:
        return None
    if context_ids is None or len(context_ids) != meta.past_len:
        got = "none" if context_ids is None else len(context_ids)
        raise StagepipeError(f"{where}: repetition_penalty needs the {meta.past_len} token ids in the cache before "
                             f"this step, got {got}")
    return [*context_ids, *meta.input_token_ids]


def context_from_siblings(step_dir: Path, past_len: int) -> list[int]:
    """The token ids in the cache before a step, as a run folder holds them: the input_token_ids of the sibling
    step folders step_0000 .. step_{N-1}."""
    step_dir = Path(step_dir)
    n = step_number(step_dir.name)
    if n is None and past_len:
        raise StagepipeError(f"{step_dir}: not named step_NNNN, so its earlier steps are unknown; give --context_ids "
                             "FILE (the token ids in the cache before this step)")
    ids = []
    for i in range(n or 0):
        meta_path = step_dir.parent / step_name(i) / META
        if not meta_path.is_file():
            raise StagepipeError(f"{meta_path}: missing; the repetition penalty needs every earlier step's token ids "
                                 "(or give --context_ids FILE)")
        ids += load_meta(meta_path).input_token_ids
    if len(ids) != past_len:
        raise StagepipeError(f"{step_dir.parent}: steps before {step_dir.name} hold {len(ids)} token ids, but the "
                             f"step's past_len is {past_len}; give --context_ids FILE")
    return ids


def meta_plan(meta: StepMeta, m, where: Path) -> StepPlan:
    """The plan of a step as its meta.json records it, checked against what plan_step decides for these graphs."""
    try:
        plan = plan_step(m, meta.past_len, meta.q_len)
    except StagepipeError as e:
        raise StagepipeError(f"{where}: {e}; rerun token_embed for this step") from None
    recorded = (meta.mode, meta.attention_window or m.max_cache_len, meta.next_past_len)
    if recorded != (plan.mode, plan.W, plan.next_past_len):
        raise StagepipeError(f"{where}: mode/attention_window/next_past_len {recorded} do not follow from past_len "
                             f"{meta.past_len} and q_len {meta.q_len} ({plan.mode}, {plan.W}, {plan.next_past_len}); "
                             "rerun token_embed for this step")
    return plan


def _check_meta(meta: StepMeta, backend: Backend, where: Path):
    m = backend.manifest
    embed = meta.stages.get("embed")
    if embed and META in embed.outputs and embed.outputs[META] != step_identity(meta):
        raise StagepipeError(f"{where}: step fields (past_len, q_len, ...) were edited after token_embed wrote them; "
                             "rerun token_embed for this step")
    if meta.onnx_fingerprint != m.graphs_fingerprint:
        raise StagepipeError(f"{where}: step was made with other graphs (onnx fingerprint differs); rerun "
                             "token_embed for this step with this --onnx_dir")
    if (meta.max_input_len, meta.max_cache_len) != (m.max_input_len, m.max_cache_len):
        raise StagepipeError(f"{where}: step has max_input_len/max_cache_len {meta.max_input_len}/"
                             f"{meta.max_cache_len}, the graphs {m.max_input_len}/{m.max_cache_len}")
