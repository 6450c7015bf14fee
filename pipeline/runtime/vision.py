"""Numpy reference of Qwen2.5-VL's vision tower, stage by stage, read straight from the checkpoint.

Same contracts as the vision graphs (pipeline/convert/vision_graphs.py), N patches, C vision hidden, M = N/4:
  vision_patch (pixel_patches (N, 3*2*14*14), the processor's order) -> hidden (N, C) in window order
  vision_block (layers, hidden (N, C))                                 -> hidden (N, C)
  vision_merger (hidden (N, C))                                        -> image_embeds (M, out_hidden), the
                                                                          processor's order
Window attention runs window by window here (as transformers does), where the graphs use one masked
attention over all patches: two routes to the same numbers.
"""
from __future__ import annotations

from functools import lru_cache
from math import erf, sqrt
from pathlib import Path

import numpy as np

from pipeline.checkpoint.safetensors_io import CheckpointWeights
from pipeline.checkpoint.vision_layout import VisionLayout
from pipeline.checkpoint.vl_config import load_vision_config
from pipeline.core.errors import StagepipeError
from pipeline.runtime.reference import apply_rope, rms_norm, silu, softmax

_erf = np.vectorize(erf, otypes=[np.float64])


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU of torch.nn.GELU(), in float64 then back."""
    return (0.5 * x * (1.0 + _erf(x.astype(np.float64) / sqrt(2.0)))).astype(x.dtype)


class VisionReference:
    def __init__(self, model_dir: Path, image_size: int, weights: CheckpointWeights | None = None):
        self.config = load_vision_config(model_dir)
        if self.config is None:
            raise StagepipeError(f"{model_dir}: not a vision-language checkpoint (no vision_config)")
        self.layout = VisionLayout(self.config, image_size)
        self.weights = weights or CheckpointWeights(model_dir)
        self.cos, self.sin = self.layout.rotary_cos_sin()

    @lru_cache(maxsize=None)
    def _w(self, name: str) -> np.ndarray:
        return self.weights.get(name)

    def _linear(self, x, prefix: str, bias: bool = True):
        y = x @ self._w(prefix + ".weight").T
        return y + self._w(prefix + ".bias") if bias else y

    def patch(self, pixel_patches: np.ndarray) -> np.ndarray:
        w = self._w("visual.patch_embed.proj.weight")
        return np.asarray(pixel_patches, np.float32)[self.layout.patch_order] @ w.reshape(len(w), -1).T

    def layers(self, layers: range, hidden: np.ndarray) -> np.ndarray:
        x = np.asarray(hidden, np.float32)
        for layer in layers:
            x = self._layer(layer, x)
        return x

    def merger(self, hidden: np.ndarray) -> np.ndarray:
        c = self.config
        x = rms_norm(np.asarray(hidden, np.float32), self._w("visual.merger.ln_q.weight"), c.rms_norm_eps)
        x = x.reshape(self.layout.image_tokens, -1)
        x = self._linear(gelu(self._linear(x, "visual.merger.mlp.0")), "visual.merger.mlp.2")
        return x[self.layout.unit_restore]

    def run_stage(self, stage: str, x: np.ndarray, blocks) -> np.ndarray:
        """One vision stage by name; blocks: the manifest's vision BlockSpecs (layers of each vision_block)."""
        if stage == "vision_patch":
            return self.patch(x)
        if stage == "vision_merger":
            return self.merger(x)
        b = blocks[int(stage.removeprefix("vision_block"))]
        return self.layers(range(b.layer_start, b.layer_end), x)

    def _layer(self, layer: int, x: np.ndarray) -> np.ndarray:
        c, p = self.config, f"visual.blocks.{layer}"
        N, heads, D = len(x), c.num_heads, c.head_dim
        h = rms_norm(x, self._w(p + ".norm1.weight"), c.rms_norm_eps)
        q, k, v = self._linear(h, p + ".attn.qkv").reshape(N, 3, heads, D).transpose(1, 2, 0, 3)  # (heads, N, D)
        q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        sizes = self.layout.window_patches if self.layout.is_window_layer(layer) else [N]
        outs, start = [], 0
        for size in sizes:
            s = slice(start, start + size)
            outs.append(softmax(q[:, s] @ k[:, s].transpose(0, 2, 1) / np.sqrt(D)) @ v[:, s])
            start += size
        attn = np.concatenate(outs, axis=1).transpose(1, 0, 2).reshape(N, heads * D)
        x = x + self._linear(attn, p + ".attn.proj")
        h = rms_norm(x, self._w(p + ".norm2.weight"), c.rms_norm_eps)
        act = silu(self._linear(h, p + ".mlp.gate_proj")) * self._linear(h, p + ".mlp.up_proj")
        return x + self._linear(act, p + ".mlp.down_proj")
