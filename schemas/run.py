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


class UserTurn(Strict):
    """A later user turn of a conversation (turn 1, 2, ...; turn 0 is run.json's prompt). Once it began, the
    turns before it are fixed: their steps are history and are never recomputed."""

    text: str  # the user's message
    # what the turn prefills: the previous reply's last token (sampled, not yet in the cache), then the tokens of
    # the chat template's text for this turn (rendering says how that text was found)
    token_ids: list[int]
    # exact: the template's rendering of the whole conversation minus the text already in the cache;
    # new_turn: the cache is no prefix of that rendering (Qwen3 drops earlier think blocks), so the template's
    # closing of the previous reply and its rendering of this user turn
    rendering: Literal["exact", "new_turn"]
    first_step: int = Field(ge=1)
    past_len: int = Field(ge=1)  # cache slots filled before its first step
    max_new_tokens: int = Field(ge=1)
    previous_reply: list[int]  # the previous turn's reply as it stood when this turn began
    previous_stop: Literal["eos", "max_steps", "interrupted"]  # how that reply ended (interrupted: Ctrl-C in chat)


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
    system: str | None = None  # --system: the system turn of a --chat conversation (None: the template's default)
    prompt_token_ids: list[int]
    onnx_dir: str
    onnx_fingerprint: str  # a hybrid run's: over its main graphs and every routed stage's backend and graphs
    backend: str = "onnx"
    stage_routes: dict[str, StageRoute] = {}  # hybrid runs: stage -> where it runs instead
    max_new_tokens: int = Field(ge=1)  # of turn 0; later turns carry their own
    ignore_eos: bool = False
    full_logits: bool = False  # prefill steps keep logits for all T rows, not just the last
    stop_token_ids: list[int] = []
    sampling: SamplingSettings
    turns: list[UserTurn] = []  # a conversation's later user turns, in order (doit chat, --reply, --messages)
    image: str | None = None  # VL models: the image file (the run's vision/ step); None for text prompts


class StageRecord(Strict):
    seconds: float  # wall time of the stage's own work (load, compute, write)
    inputs_digest: str  # md5 of the input tensors: a finished stage with the same inputs is not redone
    # what the stage wrote, checked before its work is trusted again: file (relative to the step folder) ->
    # sha1 of its bytes; "meta.json" -> digest of the step fields token_embed wrote (a hand edit shows)
    outputs: dict[str, str] = {}
    # block stages: sha1 of the K and V cache slots [past_len, next_past_len) the block wrote
    cache_digest: str = ""


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
    # repetition penalty: how many token ids it saw (those in the cache after this step: the conversation so far)
    seen_token_count: int | None = None
    # VL models (M-RoPE): positions past the prompt are cache slot + position_delta (runtime/mrope.py); None for
    # text models
    position_delta: int | None = None
    stages: dict[str, StageRecord] = {}
    next_token_id: int | None = None
    # not saved: set when a stage found its work already done on the same inputs and returned without redoing it
    _reused: bool = PrivateAttr(default=False)

    @property
    def reused(self) -> bool:
        return self._reused


class VisionMeta(Strict):
    """meta.json of an image step (a run's vision/ folder): the vision stages of one image."""

    schema_version: int = RUN_SCHEMA_VERSION
    kind: Literal["vision"] = "vision"
    image: str  # the image file
    image_digest: str  # md5 of its bytes
    image_size: int  # it was resized to image_size x image_size
    grid: list[int]  # [t, h, w] patches
    image_tokens: int  # rows of image_embeds.npy
    onnx_fingerprint: str
    backend: str = "onnx"
    stages: dict[str, StageRecord] = {}  # preprocess, vision_patch, vision_block0.., vision_merger


class TurnSummary(Strict):
    """One message of the conversation and the steps that belong to it."""

    role: Literal["user", "assistant"]
    text: str  # user: the message; assistant: the reply's text (special tokens left out)
    token_ids: list[int]  # user: the ids its turn prefilled; assistant: the ids generated
    # user: its prefill steps; assistant: the steps that sampled its tokens (the first is the last prefill step)
    first_step: int
    last_step: int  # -1 while no step of it has finished
    stop_reason: Literal["running", "eos", "max_steps", "cache_full", "interrupted"] | None = None  # assistant
    time_to_first_token_s: float | None = None  # assistant: stage time of its turn's prefill steps
    decode_tokens_per_s: float | None = None  # assistant


class RunSummary(Strict):
    """summary.json. In a conversation the top-level fields describe its latest turn; `turns` has every one."""

    schema_version: int = RUN_SCHEMA_VERSION
    prompt: str
    prompt_token_ids: list[int]
    generated_token_ids: list[int]
    text: str
    stop_reason: Literal["running", "eos", "max_steps", "cache_full"]
    steps: int  # step folders in the run
    time_to_first_token_s: float | None  # stage time of all prefill steps
    decode_tokens_per_s: float | None  # decode steps per second of decode stage time
    turns: list[TurnSummary] = []  # user and assistant messages in order


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
