"""M-RoPE positions and image rows for the steps of a Qwen2.5-VL language model.

The VL block graphs take position ids (3,1,T): a (temporal, height, width) triple per token. Text tokens have
three equal rows; the image's tokens are numbered over its merged-unit grid, starting where the text before
it stopped, and the text after it continues from the image's largest position + 1 (transformers'
get_rope_index). So positions fall behind cache slots by a fixed `delta` after the image: a decode step at
cache slot j has position j + delta in all three rows, and meta.json's position_delta carries delta from
step to step.

The embed graph is the text model's: token_embed runs it as for any prompt, then replaces the rows of the
<|image_pad|> tokens with image_embeds.npy (the vision step's output) in numpy, the way transformers'
masked_scatter does, before writing hidden_block0.npy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import StagepipeError
from pipeline.core.tensors import digest
from pipeline.runtime.plan import StepPlan
from schemas.manifest import VisionSpec


def rope_index(token_ids: list[int], image_token_id: int, grid: list[int], merge: int) -> tuple[np.ndarray, int]:
    """-> (positions (3, L) int64, delta) for a prompt whose images are runs of image_token_id, each of one
    image of patch grid (t, h, w): transformers' get_rope_index (position ids and mrope_position_deltas)."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    ids = np.asarray(token_ids, dtype=np.int64)
    is_image = ids == image_token_id
    parts, pos, i = [], 0, 0
    while i < len(ids):
        j = i
        while j < len(ids) and is_image[j] == is_image[i]:
            j += 1
        if not is_image[i]:
            parts.append(np.broadcast_to(pos + np.arange(j - i), (3, j - i)))
            pos += j - i
        else:
            per_image = t * h * w
            if (j - i) % per_image:
                raise StagepipeError(f"the prompt has {j - i} consecutive image tokens; one image is {per_image}")
            for _ in range((j - i) // per_image):
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
                parts.append(pos + np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]))
                pos += max(h, w)
        i = j
    positions = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions.astype(np.int64), delta


@dataclass(frozen=True)
class MropeStep:
    """What a VL step adds to token_embed: its (3,1,T) positions and, in a prompt step with an image, the image
    rows. Without an image (a text prompt, or any decode step) positions are cache slot + delta in all rows."""

    delta: int = 0
    prompt_ids: tuple[int, ...] = ()  # the whole prompt, image tokens expanded
    prompt_positions: np.ndarray | None = None  # (3, len(prompt_ids)) from rope_index
    image_embeds: np.ndarray | None = None  # (image_tokens, hidden)
    image_token_id: int = -1

    @classmethod
    def for_prompt(cls, prompt_ids: list[int], vision: VisionSpec, image_embeds: np.ndarray) -> "MropeStep":
        """The steps of a prompt holding one image's tokens, whose rows image_embeds fills."""
        image_id = vision.config.image_token_id
        count = sum(1 for t in prompt_ids if t == image_id)
        if count != vision.image_tokens or len(image_embeds) != vision.image_tokens:
            raise StagepipeError(f"the prompt has {count} image tokens and image_embeds {len(image_embeds)} rows; "
                                 f"one image is {vision.image_tokens} tokens (one image per prompt)")
        positions, delta = rope_index(prompt_ids, image_id, vision.grid, vision.config.spatial_merge_size)
        return cls(delta, tuple(prompt_ids), positions, image_embeds, image_id)

    def positions(self, past_len: int, T: int) -> np.ndarray:
        """(3, 1, T) int64 for the T rows from cache slot past_len (padding rows continue the text rule)."""
        slots = past_len + np.arange(T, dtype=np.int64)
        out = np.broadcast_to(slots + self.delta, (3, T)).copy()
        if self.prompt_positions is not None:
            inside = slots < self.prompt_positions.shape[1]
            out[:, inside] = self.prompt_positions[:, slots[inside]]
        return out[:, None, :]

    def apply(self, plan: StepPlan, token_ids: list[int], hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (position ids (3,1,T), hidden with the step's image-token rows replaced by their image embeddings)."""
        positions = self.positions(plan.past_len, plan.T)
        rows = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        if rows:
            first = sum(1 for t in self.prompt_ids[:plan.past_len] if t == self.image_token_id)
            hidden = hidden.copy()
            hidden[0, rows] = self.image_embeds[first:first + len(rows)].astype(hidden.dtype)
        return positions, hidden

    def digest(self, plan: StepPlan) -> str:
        """What the step's inputs depend on beyond its token ids: its positions and the image embeddings."""
        embeds = self.image_embeds.tobytes() if self.image_embeds is not None else b""
        return digest(self.positions(plan.past_len, plan.T).tobytes(), embeds)
