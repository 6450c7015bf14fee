"""A run's steps, turn by turn. Each turn prefills its tokens in chunks of max_input_len (one step per chunk), then
decodes one token a step until end of sequence, its max_new_tokens or a full cache; step numbers run on across
turns. Turn 0 is run.json's prompt. A later turn (RunSettings.turns) begins at the step after the last one that
sampled the previous reply, so every turn but the last has a fixed set of steps; the last is planned for all the
steps it may need (those after an end of sequence do nothing).

In a step of a turn past its prefill, the token fed is the one the step before it sampled; a turn's first prefill
chunk starts with the previous reply's last token, which was sampled but never fed.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from pipeline.core.errors import StagepipeError
from pipeline.runtime.generate import prompt_chunks
from schemas.run import RunSettings


@dataclass(frozen=True)
class Turn:
    index: int
    text: str  # the user's message
    token_ids: tuple[int, ...]  # what its prefill steps feed
    chunks: tuple[tuple[int, ...], ...]  # token_ids in steps of at most max_input_len
    first_step: int
    end_step: int  # one past its last planned step
    past_len: int  # cache slots filled before its first step
    max_new_tokens: int

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    @property
    def first_sampling_step(self) -> int:
        """The last prefill step: it samples the reply's first token."""
        return self.first_step + self.n_chunks - 1

    def steps(self) -> range:
        return range(self.first_step, self.end_step)

    def chunk(self, s: int) -> list[int] | None:
        """The prefill tokens of step s; None for a decode step (it feeds the token the step before sampled)."""
        i = s - self.first_step
        return list(self.chunks[i]) if i < self.n_chunks else None

    def past_len_at(self, s: int) -> int:
        i = s - self.first_step
        if i < self.n_chunks:
            return self.past_len + sum(len(c) for c in self.chunks[:i])
        return self.past_len + len(self.token_ids) + (i - self.n_chunks)


@dataclass(frozen=True)
class TurnPlan:
    turns: tuple[Turn, ...]

    @property
    def n_steps(self) -> int:
        return self.turns[-1].end_step

    @property
    def last(self) -> Turn:
        return self.turns[-1]

    def turn_of(self, s: int) -> Turn:
        starts = [t.first_step for t in self.turns]
        return self.turns[bisect.bisect_right(starts, s) - 1]

    def step_sizes(self) -> list[tuple[int, int]]:
        """(past_len, q_len) of every planned step, in order."""
        return [(t.past_len_at(s), len(t.chunk(s) or [1])) for t in self.turns for s in t.steps()]


def plan_turns(settings: RunSettings, max_input_len: int, max_cache_len: int) -> TurnPlan:
    specs = [(settings.prompt, settings.prompt_token_ids, 0, 0, settings.max_new_tokens)]
    specs += [(t.text, t.token_ids, t.first_step, t.past_len, t.max_new_tokens) for t in settings.turns]
    turns = []
    for i, (text, ids, first, past_len, max_new) in enumerate(specs):
        chunks = tuple(tuple(c) for c in prompt_chunks(list(ids), max_input_len))
        if i + 1 < len(specs):
            end = specs[i + 1][2]
            if end < first + len(chunks):
                raise StagepipeError(f"run.json: turn {i + 1} begins at step {end}, inside turn {i}'s prefill "
                                     f"(steps {first}..{first + len(chunks) - 1}); start over with --clean")
        else:
            # the first new token comes from the last prefill step; each decode step then feeds one token in
            end = first + len(chunks) + min(max_new - 1, max_cache_len - (past_len + len(ids)))
        turns.append(Turn(i, text, tuple(ids), chunks, first, end, past_len, max_new))
    return TurnPlan(tuple(turns))
