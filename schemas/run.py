"""run.json, meta.json (one per step), summary.json and kv_cache/cache.json."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr


RUN_SCHEMA_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingSettings(Strict):
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0  # 1 = none; >1 makes tokens already seen (prompt + generated) less likely


class StageRoute(Strict):
    """Where a hybrid run's stage runs instead of the main onnx_dir/backend (--stage_onnx / --stage_backend)."""

    backend: str
    onnx_dir: str
    onnx_fingerprint: str  # that onnx_dir's graphs_fingerprint


class RunSettings(Strict):
    """run.json: what a run generates and how; a rerun with other settings must say so (--from_step/--clean)."""

    schema_version: int = RUN_SCHEMA_VERSION
    prompt: str
    chat: bool = False
    no_think: bool = False
    prompt_token_ids: list[int]
    onnx_dir: str
    onnx_fingerprint: str  # a hybrid run's: over its main graphs and every routed stage's backend and graphs
    backend: str = "onnx"
    stage_routes: dict[str, StageRoute] = {}  # hybrid runs: stage -> where it runs instead
    max_new_tokens: int = Field(ge=1)
    ignore_eos: bool = False
    full_logits: bool = False  # prefill steps keep logits for all T rows, not just the last
    stop_token_ids: list[int] = []
    sampling: SamplingSettings


class StageRecord(Strict):
    seconds: float  # wall time of the stage's own work (load, compute, write)
    inputs_digest: str  # md5 of the input tensors: a finished stage with the same inputs is not redone


class StepMeta(Strict):
    schema_version: int = RUN_SCHEMA_VERSION
    step: int = Field(ge=0)
    mode: Literal["prefill", "decode"]
    past_len: int = Field(ge=0)  # cache slots filled before this step
    q_len: int = Field(ge=1)  # real tokens in this step (the rest of T is padding)
    next_past_len: int  # past_len + q_len
    max_input_len: int
    max_cache_len: int
    # cache slots [0, attention_window) the block graphs see (attention_mask is (1,1,T,window+T));
    # None in steps written before cache windows existed: max_cache_len
    attention_window: int | None = None
    input_token_ids: list[int]
    onnx_fingerprint: str
    backend: str = "onnx"
    sampling: SamplingSettings
    sample_next: bool = True  # False for a prompt chunk that another prompt chunk follows
    # md5 of the previous step's last hidden states: stands for the cache content this step attends to
    history: str = ""
    stages: dict[str, StageRecord] = {}
    next_token_id: int | None = None
    # not saved: set when a stage found its work already done on the same inputs and returned without redoing it
    _reused: bool = PrivateAttr(default=False)

    @property
    def reused(self) -> bool:
        return self._reused


class RunSummary(Strict):
    schema_version: int = RUN_SCHEMA_VERSION
    prompt: str
    prompt_token_ids: list[int]
    generated_token_ids: list[int]
    text: str
    stop_reason: Literal["running", "eos", "max_steps", "cache_full"]
    steps: int  # step folders in the run
    time_to_first_token_s: float | None  # stage time of all prefill steps
    decode_tokens_per_s: float | None  # decode steps per second of decode stage time


class CacheRecord(Strict):
    """kv_cache/cache.json: binds the cache files to the graphs they were filled by."""

    schema_version: int = RUN_SCHEMA_VERSION
    onnx_fingerprint: str
    max_cache_len: int
    kv_dtype: str
    block_shapes: list[list[int]]


class PromptEntry(Strict):
    """One line of a run set's prompts.jsonl: the prompt, and run_auto options of its own (None: the command's)."""

    prompt: str = Field(min_length=1)
    chat: bool | None = None
    no_think: bool | None = None
    steps: int | None = Field(default=None, ge=1)
    greedy: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool | None = None


class RunSetRecord(Strict):
    """run_set.json: the prompts of a run set; run i of the set is the run folder run_000i."""

    schema_version: int = RUN_SCHEMA_VERSION
    prompts: list[PromptEntry]


class SetRunResult(Strict):
    run: str  # the run folder's name in the set
    prompt: str
    exit_code: int  # run_auto's: 0 done, 1 a task failed, 2 bad input, 130 interrupted
    summary: RunSummary | None = None


class SetSummary(Strict):
    """set_summary.json: how each run of a set ended, and what it generated."""

    schema_version: int = RUN_SCHEMA_VERSION
    runs: list[SetRunResult]
    seconds: float  # wall time of the command that wrote it
