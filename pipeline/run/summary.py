"""summary.json: what a run folder generated so far, turn by turn, read back from its step folders."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core import layout
from pipeline.core.jsonfile import load_model_file
from pipeline.core.layout import read_token_file
from pipeline.runtime import stage_ops
from schemas.run import RunSummary, TurnSummary, VisionMeta


@dataclass
class TurnResult:
    generated: list[int] = field(default_factory=list)
    stop_reason: str = "running"
    steps: int = 0  # step folders with a meta.json
    last_done: int = -1  # the last step that ran its output stage
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    complete_prefill: bool = True

    @property
    def time_to_first_token_s(self) -> float | None:
        return self.prefill_s if self.generated and self.complete_prefill else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else None


def image_step_seconds(vision_dir) -> float:
    path = vision_dir / layout.META
    return sum(r.seconds for r in load_model_file(path, VisionMeta).stages.values()) if path.exists() else 0.0


def turn_result(run, turn) -> TurnResult:
    """What a turn's step folders hold: its reply so far and why it stopped ("running" while it may go on)."""
    r = TurnResult()
    if turn.index == 0 and getattr(run, "image", None) is not None:  # the first token waits for the image step too
        r.prefill_s += image_step_seconds(run.dir / layout.VISION)
    stops = set(run.settings.stop_token_ids)
    for s in turn.steps():
        meta_path = run.step_dir(s) / layout.META
        if not meta_path.exists():
            r.complete_prefill &= s >= turn.first_step + turn.n_chunks
            break
        meta = stage_ops.load_meta(meta_path)
        r.steps += 1
        seconds = sum(rec.seconds for rec in meta.stages.values())
        if turn.chunk(s) is not None:
            r.prefill_s += seconds
        else:
            r.decode_s += seconds
            r.decode_steps += 1
        if "output" in meta.stages:
            r.last_done = s
        token_file = run.step_dir(s) / layout.NEXT_TOKEN_ID
        if s >= turn.first_sampling_step:
            if not token_file.exists() or "output" not in meta.stages:
                break
            r.generated.append(read_token_file(token_file))
            if r.generated[-1] in stops:
                r.stop_reason = "eos"
                break
            if len(r.generated) >= turn.max_new_tokens:
                r.stop_reason = "max_steps"
                break
            if meta.next_past_len >= run.manifest.max_cache_len:
                r.stop_reason = "cache_full"
                break
    return r


def build_summary(run) -> RunSummary:
    turns, messages, steps = run.plan.turns, [], 0
    for turn in turns:
        r = turn_result(run, turn)
        steps += r.steps
        if turn.index + 1 < len(turns):  # a fixed turn: the next turn recorded how it ended
            r.stop_reason = run.settings.turns[turn.index].previous_stop
        last_prefill = turn.first_step + turn.n_chunks - 1
        messages.append(TurnSummary(role="user", text=turn.text, token_ids=list(turn.token_ids),
                                    first_step=turn.first_step, last_step=min(r.last_done, last_prefill)))
        messages.append(TurnSummary(
            role="assistant", text=run.tokenizer.decode(r.generated, skip_special_tokens=True),
            token_ids=r.generated, first_step=turn.first_sampling_step,
            last_step=r.last_done if r.last_done >= turn.first_sampling_step else -1, stop_reason=r.stop_reason,
            time_to_first_token_s=r.time_to_first_token_s, decode_tokens_per_s=r.decode_tokens_per_s))
    latest, reply = messages[-2], messages[-1]
    return RunSummary(prompt=latest.text, prompt_token_ids=latest.token_ids, generated_token_ids=reply.token_ids,
                      text=reply.text, stop_reason=reply.stop_reason, steps=steps, time_to_first_token_s=r.time_to_first_token_s,
                      decode_tokens_per_s=r.decode_tokens_per_s, turns=messages)
