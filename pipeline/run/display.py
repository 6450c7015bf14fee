"""What a run shows: the summary line, the prompt preview, progress on stderr."""
from __future__ import annotations

import sys
import time

from pipeline.core import layout


def print_summary_line(run, summary):
    turn = f"turn {len(run.plan.turns) - 1}: " if len(run.plan.turns) > 1 else ""
    tokens = f"{summary.steps} steps, {len(summary.generated_token_ids)} new tokens, stop: {summary.stop_reason}"
    if not run.new_steps:
        print(f"[{run.dir}: {turn}already complete: {tokens}; its text is in {layout.SUMMARY_JSON}]", flush=True)
        return
    rate = f"{summary.decode_tokens_per_s:.1f} tokens/s decode" if summary.decode_tokens_per_s else "no decode"
    ttft = f"{summary.time_to_first_token_s:.3f}s" if summary.time_to_first_token_s is not None else "-"
    print(f"\n[{run.dir}: {turn}{tokens}, first token {ttft}, {rate}]", flush=True)


def completed_steps(run) -> int:
    """How many steps from step_0000 on have their output written (what a rerun does not redo)."""
    done = 0
    while done < run.n_steps and (run.step_dir(done) / layout.LOGITS).exists() and \
            (run.step_dir(done) / layout.META).exists():
        done += 1
    return done


def prompt_preview(text: str, keep: int = 300) -> str:
    """The prompt as shown before the reply: whole, or its start and end when it is long."""
    if len(text) <= 2 * keep:
        return text
    return f"{text[:keep]} [... {len(text) - 2 * keep} characters ...] {text[-keep:]}"


class Progress:
    """Progress on stderr: prefill chunks as they finish, and for long runs every 64 decode steps with the
    rate so far. The reply itself streams to stdout."""

    def __init__(self, every: int = 64):
        self.every, self.started, self.tokens = every, None, 0

    def prefill(self, done: int, total: int):
        if total >= 4 and (done % max(1, total // 8) == 0 or done == total - 1):
            print(f"[prefill {done}/{total} chunks]", file=sys.stderr, flush=True)

    def token(self, step: int, planned: int):
        self.started = self.started or time.perf_counter()
        self.tokens += 1
        if planned > self.every and self.tokens % self.every == 0:
            rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
            print(f"\n[step {step + 1}/{planned}, {rate:.1f} tokens/s]", file=sys.stderr, flush=True)
