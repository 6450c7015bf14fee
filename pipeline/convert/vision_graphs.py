"""Qwen2.5-VL's vision tower as static-shape graphs for one image size, built op by op.

Contracts (N patches, P = 3*2*14*14 values a patch, C vision hidden, M = N/4 image tokens, E the language
model's hidden size; every tensor float32):
  vision_patch : pixel_patches (N, P), the image processor's order -> hidden_states (N, C), window order
  vision_blockK: hidden_states (N, C)                                -> hidden_states_out (N, C)
  vision_merger: hidden_states (N, C)                                -> image_embeds (M, E), the processor's order
Everything transformers computes per image with data-dependent index ops is a constant here, computed in numpy
at conversion (pipeline/checkpoint/vision_layout.py): the window order (a Gather by constant indices in
vision_patch, its inverse in vision_merger), the 2-D rotary cos/sin tables (already in window order) and the
window attention mask. A window layer attends over all N patches with an additive mask that keeps each patch
inside its window (block-diagonal); a full-attention layer has no mask. In fp16 graphs only the matrix
multiplies run in float16: the residual stream, RMSNorm, SiLU/GELU, rotary and attention stay float32, and
so do the hidden states between vision stages (a ViT's residual stream can outgrow float16).
"""
from __future__ import annotations

import numpy as np

from pipeline.checkpoint.vision_layout import VisionLayout
from pipeline.convert.graphs import F32, Precision, StageGraph, _heads, _rope
from schemas.manifest import VisionConfig


def expected_vision_tensors(c: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor the vision graphs read, with the shape it must have."""
    C, I, merged = c.hidden_size, c.intermediate_size, c.hidden_size * c.spatial_merge_size ** 2
    shapes = {"visual.patch_embed.proj.weight": (C, c.in_channels, c.temporal_patch_size, c.patch_size,
                                                 c.patch_size),
              "visual.merger.ln_q.weight": (C,), "visual.merger.mlp.0.weight": (merged, merged),
              "visual.merger.mlp.0.bias": (merged,), "visual.merger.mlp.2.weight": (c.out_hidden_size, merged),
              "visual.merger.mlp.2.bias": (c.out_hidden_size,)}
    for i in range(c.depth):
        p = f"visual.blocks.{i}"
        shapes.update({f"{p}.norm1.weight": (C,), f"{p}.norm2.weight": (C,), f"{p}.attn.qkv.weight": (3 * C, C),
                       f"{p}.attn.qkv.bias": (3 * C,), f"{p}.attn.proj.weight": (C, C), f"{p}.attn.proj.bias": (C,),
                       f"{p}.mlp.gate_proj.weight": (I, C), f"{p}.mlp.gate_proj.bias": (I,),
                       f"{p}.mlp.up_proj.weight": (I, C), f"{p}.mlp.up_proj.bias": (I,),
                       f"{p}.mlp.down_proj.weight": (C, I), f"{p}.mlp.down_proj.bias": (C,)})
    return shapes


def build_vision_patch(layout: VisionLayout, precision: Precision, weight_lookup):
    """Conv3d with stride = kernel over flattened patches is one matrix multiply by the (C, P) kernel."""
    c = layout.config
    s = StageGraph("vision_patch", c, precision, weight_lookup)
    g, N, P, C = s.g, layout.num_patches, c.patch_values, c.hidden_size
    pixels = g.input("pixel_patches", F32, (N, P))
    x = g.op("Gather", pixels, g.const(layout.patch_order), axis=0)  # window order
    kernel = g.weight(weight_lookup("visual.patch_embed.proj.weight", precision.compute, (C, P)))
    y = g.op("Gemm", s.from_f32(x, precision.compute), kernel, transB=1)
    g.output(s.cast(y, F32) if precision.is_fp16 else y, "hidden_states", F32, (N, C))
    return g.to_model()


def build_vision_block(layout: VisionLayout, precision: Precision, layers: range, weight_lookup,
                       mask_value: float, stage: str):
    c = layout.config
    s = StageGraph(f"vision_block_{layers.start}_{layers.stop}", c, precision, weight_lookup)
    g, N, C = s.g, layout.num_patches, c.hidden_size
    x = g.input("hidden_states", F32, (N, C))
    cos, sin = layout.rotary_cos_sin()
    half = c.head_dim // 2
    sin_signed = np.concatenate([-sin[:, :half], sin[:, half:]], axis=-1)  # rope(x) = x*cos + swap(x)*sin_signed
    # inline, not external: onnxruntime's transpose optimizer rewrites the tables (k is transposed after its
    # rotary) and fails on initializers handed in as shared memory maps (OnnxBackend's weights)
    tables = [g.const(cos, F32), g.const(sin_signed, F32)]
    mask = None
    if any(layout.is_window_layer(layer) for layer in layers):
        mask = g.weight(weight_lookup.constant(f"{stage}.window_mask", layout.window_mask(mask_value)))
    for layer in layers:
        x = _vision_layer(s, f"visual.blocks.{layer}", x, *tables, mask if layout.is_window_layer(layer) else None, N)
    g.output(x, "hidden_states_out", F32, (N, C))
    return g.to_model()


def _vision_layer(s: StageGraph, p: str, x: str, cos: str, sin_signed: str, mask: str | None, N: int) -> str:
    g, c = s.g, s.c
    C, heads, D = c.hidden_size, c.num_heads, c.head_dim
    h = s.rms_norm(x, p + ".norm1.weight")
    qkv = g.op("Split", s.linear(h, p + ".attn.qkv", True), g.const([C, C, C]), axis=-1, n_out=3)
    q, k, v = (_heads(s, t, N, heads, D) for t in qkv)  # (heads, N, D)
    q, k = _rope(s, q, cos, sin_signed, D), _rope(s, k, cos, sin_signed, D)
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 2, 1])), g.const(1.0 / np.sqrt(D), F32))
    if mask is not None:  # window layer: each patch attends within its window only
        scores = g.op("Add", scores, mask)
    attn = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # (heads, N, D)
    attn = g.op("Reshape", g.op("Transpose", attn, perm=[1, 0, 2]), g.const([N, C]))
    x = g.op("Add", x, s.linear(attn, p + ".attn.proj", True))

    h = s.rms_norm(x, p + ".norm2.weight")
    gate = s.linear(h, p + ".mlp.gate_proj", True)
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), s.linear(h, p + ".mlp.up_proj", True))
    return g.op("Add", x, s.linear(act, p + ".mlp.down_proj", True))


def build_vision_merger(layout: VisionLayout, precision: Precision, weight_lookup):
    c = layout.config
    s = StageGraph("vision_merger", c, precision, weight_lookup)
    g, N, M, E = s.g, layout.num_patches, layout.image_tokens, c.out_hidden_size
    hidden = g.input("hidden_states", F32, (N, c.hidden_size))
    x = g.op("Reshape", s.rms_norm(hidden, "visual.merger.ln_q.weight"), g.const([M, c.hidden_size * layout.unit]))
    x = s.linear(x, "visual.merger.mlp.0", True)
    # exact GELU (torch.nn.GELU): x/2 * (1 + erf(x/sqrt(2))), in float32
    x = g.op("Mul", g.op("Mul", x, g.const(0.5, F32)),
             g.op("Add", g.op("Erf", g.op("Mul", x, g.const(1.0 / np.sqrt(2.0), F32))), g.const(1.0, F32)))
    x = s.linear(x, "visual.merger.mlp.2", True)
    g.output(g.op("Gather", x, g.const(layout.unit_restore), axis=0), "image_embeds", F32, (M, E))
    return g.to_model()
