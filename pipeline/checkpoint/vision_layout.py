"""Where every patch of a fixed-size image goes in Qwen2.5-VL's vision tower, computed once in numpy.

transformers computes these per image inside the model (get_vision_position_ids, get_vision_window_index in
transformers/vision_utils.py) with data-dependent index ops. For a fixed image size they are constants: the
converter bakes them into the vision graphs, the numpy reference uses them, and nothing is computed in a graph.

Orders. The image processor emits patches block-major: merge x merge patches (one "unit", one language-model
token) are consecutive, units in raster order over the (h/merge, w/merge) unit grid. Window attention groups
units into windows of window_size/(patch*merge) units a side (the last row/column of windows may be smaller);
the vision blocks work in window order: windows in raster order, units in raster order inside a window.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline.core.errors import StagepipeError
from schemas.manifest import VisionConfig


def check_image_size(config: VisionConfig, image_size: int):
    factor = config.patch_size * config.spatial_merge_size
    if image_size < factor or image_size % factor:
        raise StagepipeError(f"--image_size {image_size}: must be a positive multiple of patch_size x "
                             f"spatial_merge_size = {factor} (e.g. {factor * 16})")


@dataclass(frozen=True)
class VisionLayout:
    config: VisionConfig
    image_size: int

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) in patches: transformers' image_grid_thw of one image."""
        side = self.image_size // self.config.patch_size
        return 1, side, side

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def unit(self) -> int:
        """Patches per merged unit (merge x merge)."""
        return self.config.spatial_merge_size ** 2

    @property
    def image_tokens(self) -> int:
        return self.num_patches // self.unit

    @cached_property
    def _windows(self) -> list[np.ndarray]:
        """Unit indices of each window, windows in window order (as get_vision_window_index)."""
        c = self.config
        _, h, w = self.grid
        units_h, units_w = h // c.spatial_merge_size, w // c.spatial_merge_size
        side = c.window_size // c.spatial_merge_size // c.patch_size
        if side < 1:
            raise StagepipeError(f"vision window_size {c.window_size} is smaller than one merged unit")
        units = np.arange(units_h * units_w).reshape(units_h, units_w)
        return [units[r:r + side, q:q + side].reshape(-1)
                for r in range(0, units_h, side) for q in range(0, units_w, side)]

    @cached_property
    def unit_order(self) -> np.ndarray:
        """(image_tokens,) int64: unit index at each window-order position (transformers' window_index)."""
        return np.concatenate(self._windows).astype(np.int64)

    @cached_property
    def unit_restore(self) -> np.ndarray:
        """(image_tokens,) int64: the inverse of unit_order (window order -> the processor's order)."""
        return np.argsort(self.unit_order).astype(np.int64)

    @cached_property
    def patch_order(self) -> np.ndarray:
        """(num_patches,) int64: processor-order patch index at each window-order position."""
        return (self.unit_order[:, None] * self.unit + np.arange(self.unit)).reshape(-1)

    @cached_property
    def window_patches(self) -> list[int]:
        """Patches per window, in window order."""
        return [len(units) * self.unit for units in self._windows]

    def window_mask(self, mask_value: float) -> np.ndarray:
        """(num_patches, num_patches) float32 additive mask in window order: 0 within a window, mask_value across."""
        window_of = np.repeat(np.arange(len(self.window_patches)), self.window_patches)
        return np.where(window_of[:, None] == window_of[None, :], 0.0, mask_value).astype(np.float32)

    def patch_positions(self) -> np.ndarray:
        """(num_patches, 2) int64 (row, column) of each patch in the processor's order (get_vision_position_ids)."""
        _, h, w = self.grid
        m = self.config.spatial_merge_size
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        return np.stack([rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1),
                         cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)], axis=-1)

    def rotary_cos_sin(self) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (num_patches, head_dim) float32 in window order, as Qwen2_5_VLVisionRotaryEmbedding: a
        quarter of the head's frequencies turn with the patch row, a quarter with its column, both repeated."""
        c = self.config
        quarter = c.head_dim // 2
        inv_freq = (1.0 / c.rope_theta ** (np.arange(0, quarter, 2, dtype=np.int64).astype(np.float32) / quarter)
                    ).astype(np.float32)
        pos = self.patch_positions()[self.patch_order].astype(np.float32)  # (N, 2)
        angles = (pos[:, :, None] * inv_freq).reshape(len(pos), -1)  # (N, 2 * D/4): rows' then columns'
        emb = np.concatenate([angles, angles], axis=-1)
        return np.cos(emb), np.sin(emb)

    def is_window_layer(self, layer: int) -> bool:
        return layer not in self.config.fullatt_block_indexes
