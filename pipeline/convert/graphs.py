"""The three stage graphs (embed, block, output) with static shapes, built op by op.

Contracts (batch 1, T = tokens per step, C = cache slots, W = the graph's attention window <= C, H hidden,
D head_dim, KV kv heads, V vocab):
  embed : input_ids int64 (1,T)                                     -> hidden_states (1,T,H)
  blockK: hidden_states (1,T,H), attention_mask f32 (1,1,T,W+T),
          position_ids int64 (1,T) (VL models, M-RoPE: (3,1,T)),
          past_key/past_value (Lk,1,KV,C,D)                             -> hidden_states_out (1,T,H),
                                                                       present_key/present_value (Lk,1,KV,T,D)
          (convert --cache_input window: past_key/past_value (Lk,1,KV,W,D); --rope_input: cos, sin f32 (T,D)
          in place of position_ids)
  output: hidden_states (1,T,H)                                     -> logits f32 (1,T,V)
Inside a block the residual stream, norms, RoPE and attention run in float32; in fp16 graphs only the
matrix multiplies (and the hidden states passed between stages) are float16.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.checkpoint.model_config import ModelConfig
from pipeline.convert.onnx_builder import NP_TO_ONNX, GraphBuilder

F32 = np.float32
# Bump whenever the graphs or weights built for the same settings change (a new op pattern, input layout, or
# quantizer): auto-conversion (pipeline.model_source.staleness) then rebuilds onnx_dirs made by older code.
# 3: whole-cache block inputs, the fused RMSNorm chain, clip-searched quantization scales.
GRAPH_FORMAT = 3


@dataclass(frozen=True)
class GraphShape:
    T: int  # tokens per step
    W: int  # attention window: the cache slots [0, W) a step attends to
    C: int = 0  # slots of the past_key/past_value inputs: the whole cache (0: W, only the window's slots)
    rope_input: bool = False  # block graphs take cos/sin (T, D) tables in place of position_ids

    @property
    def cache_slots(self) -> int:
        return self.C or self.W


@dataclass(frozen=True)
class Precision:
    compute: np.dtype  # dtype of matmul weights and of hidden states between stages
    kv: np.dtype  # dtype of past/present key and value tensors
    weight_bits: int = 0  # 4 or 8: weight-only quantized linear layers (com.microsoft MatMulNBits), else 0

    @property
    def is_fp16(self) -> bool:
        return self.compute == np.float16


class StageGraph:
    """Shared helpers for one graph: weight lookup, dtype casts, linear layers and RMSNorm."""

    def __init__(self, name: str, config: ModelConfig, precision: Precision, weight_lookup):
        self.g = GraphBuilder(name)
        self.c = config
        self.p = precision
        self._weight_lookup = weight_lookup  # (checkpoint name, dtype) -> external TensorProto

    def w(self, name: str, dtype=None) -> str:
        return self.g.weight(self._weight_lookup(name, np.dtype(dtype or self.p.compute)))

    def cast(self, x: str, dtype) -> str:
        return self.g.op("Cast", x, to=NP_TO_ONNX[np.dtype(dtype)])

    def from_f32(self, x: str, dtype) -> str:
        """Cast a float32 value to `dtype`, or leave it when that is float32 already."""
        return x if np.dtype(dtype) == F32 else self.cast(x, dtype)

    def linear(self, x: str, prefix: str, bias: bool) -> str:
        """x float32 (N, in) -> float32 (N, out); the Gemm runs in the compute dtype, weight stored (out, in)."""
        g = self.g
        if self.p.weight_bits:
            return self._quantized_linear(x, prefix, bias)
        x_in = self.cast(x, self.p.compute) if self.p.is_fp16 else x
        args = [x_in, self.w(prefix + ".weight")]
        if bias:
            args.append(self.w(prefix + ".bias"))
        y = g.op("Gemm", *args, transB=1)
        return self.cast(y, F32) if self.p.is_fp16 else y

    def _quantized_linear(self, x: str, prefix: str, bias: bool) -> str:
        """Weight-only quantized (out, in) matrix: blocks of `block` weights share one float scale."""
        g = self.g
        packed, scales, block = self._weight_lookup.quantized(prefix + ".weight", self.p.weight_bits)
        out_features, in_features = packed.dims[0], packed.dims[1] * block
        # accuracy_level 4: the kernel quantizes activations to int8 per block and multiplies in integers, as
        # onnxruntime-genai's CPU int4 models do; 3x faster than float activations (13 -> 4.4 ms for the 49
        # matrices of a 7-layer 0.6B block, measured) for a small error next to the weights' own
        y = g.op("MatMulNBits", x, g.weight(packed), g.weight(scales), domain="com.microsoft", K=in_features,
                 N=out_features, bits=self.p.weight_bits, block_size=block, accuracy_level=4)
        return g.op("Add", y, self.w(prefix + ".bias", F32)) if bias else y

    def rms_norm(self, x: str, weight_name: str) -> str:
        g = self.g
        # Pow(x, 2), not x*x: onnxruntime fuses this exact chain into one SimplifiedLayerNormalization kernel
        mean_sq = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, F32)), axes=[-1], keepdims=1)
        denom = g.op("Sqrt", g.op("Add", mean_sq, g.const(self.c.rms_norm_eps, F32)))
        return g.op("Mul", g.op("Div", x, denom), self.w(weight_name, F32))


def build_embed(config: ModelConfig, precision: Precision, shape: GraphShape, weight_lookup):
    s = StageGraph("embed", config, precision, weight_lookup)
    g = s.g
    ids = g.input("input_ids", np.int64, (1, shape.T))
    hidden = g.op("Gather", s.w("model.embed_tokens.weight"), ids, axis=0)
    g.output(hidden, "hidden_states", precision.compute, (1, shape.T, config.hidden_size))
    return g.to_model()


def build_output(config: ModelConfig, precision: Precision, shape: GraphShape, weight_lookup):
    s = StageGraph("output", config, precision, weight_lookup)
    g, c, T = s.g, config, shape.T
    hidden = g.input("hidden_states", precision.compute, (1, T, c.hidden_size))
    x = g.op("Reshape", hidden, g.const([T, c.hidden_size]))
    if precision.is_fp16:
        x = s.cast(x, F32)
    x = s.rms_norm(x, "model.norm.weight")
    head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
    logits = s.linear(x, head.removesuffix(".weight"), bias=False)
    g.output(g.op("Reshape", logits, g.const([1, T, c.vocab_size])), "logits", F32, (1, T, c.vocab_size))
    return g.to_model()


def build_block(config: ModelConfig, precision: Precision, shape: GraphShape, layers: range, weight_lookup):
    s = StageGraph(f"block_{layers.start}_{layers.stop}", config, precision, weight_lookup)
    g, c = s.g, config
    T, W, H, D, KV = shape.T, shape.W, c.hidden_size, c.head_dim, c.num_key_value_heads
    Lk = len(layers)
    hidden = g.input("hidden_states", precision.compute, (1, T, H))
    mask = g.input("attention_mask", F32, (1, 1, T, W + T))
    rope_inputs = (g.input("cos", F32, (T, D)), g.input("sin", F32, (T, D))) if shape.rope_input else None
    positions = None if shape.rope_input else \
        g.input("position_ids", np.int64, (3, 1, T) if c.mrope_section else (1, T))
    # the whole cache comes in (the caller passes its buffer as it is, no copy) and each layer slices its
    # first W slots: for a smaller window that slice is the one copy of the cache a step makes
    past_key = g.input("past_key", precision.kv, (Lk, 1, KV, shape.cache_slots, D))
    past_value = g.input("past_value", precision.kv, (Lk, 1, KV, shape.cache_slots, D))

    x = g.op("Reshape", hidden, g.const([T, H]))
    if precision.is_fp16:
        x = s.cast(x, F32)
    cos, sin_signed = _rope_from_inputs(s, *rope_inputs, D) if rope_inputs else _rope_tables(s, positions, T, D)

    present_keys, present_values = [], []
    for i, layer in enumerate(layers):
        past_k = _cache_layer(s, past_key, i, KV, W, D)
        past_v = _cache_layer(s, past_value, i, KV, W, D)
        x, k, v = _decoder_layer(s, f"model.layers.{layer}", x, mask, cos, sin_signed, past_k, past_v, T, W)
        present_keys.append(g.op("Reshape", s.from_f32(k, precision.kv), g.const([1, 1, KV, T, D])))
        present_values.append(g.op("Reshape", s.from_f32(v, precision.kv), g.const([1, 1, KV, T, D])))

    out = g.op("Reshape", x, g.const([1, T, H]))
    if precision.is_fp16:
        out = s.cast(out, precision.compute)
    g.output(out, "hidden_states_out", precision.compute, (1, T, H))
    for name, parts in (("present_key", present_keys), ("present_value", present_values)):
        merged = parts[0] if Lk == 1 else g.op("Concat", *parts, axis=0)
        g.output(merged, name, precision.kv, (Lk, 1, KV, T, D))
    return g.to_model()


def _rope_tables(s: StageGraph, positions: str, T: int, D: int):
    """cos (T,D) and sign-folded sin (T,D) so that rope(x) = x*cos + swap_halves(x)*sin_signed."""
    g, c = s.g, s.c
    inv_freq = (1.0 / c.rope_theta ** (np.arange(0, D, 2, dtype=np.int64).astype(F32) / D)).astype(F32)
    if c.mrope_section:
        angles = _mrope_angles(s, positions, T, D, inv_freq)
    else:
        pos = g.op("Reshape", s.cast(positions, F32), g.const([T, 1]))
        angles = g.op("Mul", pos, g.const(inv_freq.reshape(1, D // 2), F32))  # (T, D/2)
    cos_half, sin_half = g.op("Cos", angles), g.op("Sin", angles)
    cos = g.op("Concat", cos_half, cos_half, axis=-1)
    sin_signed = g.op("Concat", g.op("Neg", sin_half), sin_half, axis=-1)
    return cos, sin_signed


def _rope_from_inputs(s: StageGraph, cos: str, sin: str, D: int):
    """cos as given, and sin (T,D) as transformers lays it out, its first half negated: the tables _rope takes."""
    sign = np.concatenate([-np.ones(D // 2, F32), np.ones(D // 2, F32)]).reshape(1, D)
    return cos, s.g.op("Mul", sin, s.g.const(sign, F32))


def _mrope_angles(s: StageGraph, positions: str, T: int, D: int, inv_freq: np.ndarray) -> str:
    """M-RoPE (Qwen2.5-VL): frequency j turns with position row r(j) of (3,1,T) ids, the rows taking mrope_section
    consecutive frequencies each (temporal, height, width). The row is picked by a one-hot (3,1,D/2) product
    summed over rows: exact (x*1 + 0 + 0) and free of index ops. Three equal rows give plain RoPE."""
    g = s.g
    onehot = np.zeros((3, 1, D // 2), dtype=F32)
    bounds = np.cumsum([0] + list(s.c.mrope_section))
    for row in range(3):
        onehot[row, 0, bounds[row]:bounds[row + 1]] = 1.0
    pos = g.op("Reshape", s.cast(positions, F32), g.const([3, T, 1]))
    pos = g.op("ReduceSum", g.op("Mul", pos, g.const(onehot, F32)), g.const([0]), keepdims=0)  # (T, D/2)
    return g.op("Mul", pos, g.const(inv_freq.reshape(1, D // 2), F32))


def _rope(s: StageGraph, x: str, cos: str, sin_signed: str, D: int) -> str:
    g = s.g
    first, second = g.op("Split", x, g.const([D // 2, D // 2]), axis=-1, n_out=2)
    swapped = g.op("Concat", second, first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", swapped, sin_signed))


def _cache_layer(s: StageGraph, past: str, i: int, KV: int, W: int, D: int) -> str:
    """Slots [0, W) of layer i of a (Lk,1,KV,C,D) cache input, as float32 (KV,W,D)."""
    g = s.g
    layer = g.op("Slice", past, g.const([i, 0]), g.const([i + 1, W]), g.const([0, 3]))
    layer = g.op("Reshape", layer, g.const([KV, W, D]))
    return s.cast(layer, F32) if s.p.kv != np.float32 else layer


def _heads(s: StageGraph, x: str, T: int, n_heads: int, D: int) -> str:
    """(T, n*D) -> (n, T, D)."""
    g = s.g
    return g.op("Transpose", g.op("Reshape", x, g.const([T, n_heads, D])), perm=[1, 0, 2])


def _decoder_layer(s: StageGraph, p: str, x, mask, cos, sin_signed, past_k, past_v, T: int, W: int):
    g, c = s.g, s.c
    D, KV, G, Hq = c.head_dim, c.num_key_value_heads, c.group_size, c.num_attention_heads

    h = s.rms_norm(x, p + ".input_layernorm.weight")
    q = _heads(s, s.linear(h, p + ".self_attn.q_proj", c.qkv_bias), T, Hq, D)  # (Hq, T, D)
    k = _heads(s, s.linear(h, p + ".self_attn.k_proj", c.qkv_bias), T, KV, D)  # (KV, T, D)
    v = _heads(s, s.linear(h, p + ".self_attn.v_proj", c.qkv_bias), T, KV, D)
    if c.qk_norm:
        q = s.rms_norm(q, p + ".self_attn.q_norm.weight")
        k = s.rms_norm(k, p + ".self_attn.k_norm.weight")
    q, k = _rope(s, q, cos, sin_signed, D), _rope(s, k, cos, sin_signed, D)

    # Grouped-query attention without repeating K/V: query head h uses kv head h // G, so the Hq query heads
    # regroup as (KV, G*T) rows. Scores against the window's cache slots and against the step's own keys are computed apart
    # and only the small score rows are joined, so the (KV, W, D) cache slots are never copied.
    q_grouped = g.op("Reshape", q, g.const([KV, G * T, D]))
    scores_past = g.op("MatMul", q_grouped, g.op("Transpose", past_k, perm=[0, 2, 1]))  # (KV, G*T, W)
    scores_new = g.op("MatMul", q_grouped, g.op("Transpose", k, perm=[0, 2, 1]))  # (KV, G*T, T)
    scores = g.op("Mul", g.op("Concat", scores_past, scores_new, axis=-1), g.const(1.0 / np.sqrt(D), F32))
    scores = g.op("Add", g.op("Reshape", scores, g.const([KV, G, T, W + T])), mask)
    probs = g.op("Reshape", g.op("Softmax", scores, axis=-1), g.const([KV, G * T, W + T]))
    probs_past, probs_new = g.op("Split", probs, g.const([W, T]), axis=-1, n_out=2)
    attn = g.op("Add", g.op("MatMul", probs_past, past_v), g.op("MatMul", probs_new, v))  # (KV, G*T, D)
    attn = g.op("Reshape", attn, g.const([Hq, T, D]))
    attn = g.op("Reshape", g.op("Transpose", attn, perm=[1, 0, 2]), g.const([T, Hq * D]))
    x = g.op("Add", x, s.linear(attn, p + ".self_attn.o_proj", c.o_bias))

    h = s.rms_norm(x, p + ".post_attention_layernorm.weight")
    gate = s.linear(h, p + ".mlp.gate_proj", False)
    up = s.linear(h, p + ".mlp.up_proj", False)
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    x = g.op("Add", x, s.linear(act, p + ".mlp.down_proj", False))
    return x, k, v
