"""Numpy reference implementation of the three stages, read straight from the checkpoint.

Same contracts as the ONNX graphs (see pipeline/graphs.py):
  embed(input_ids (1,T))                                              -> hidden (1,T,H)
  block(layers, hidden, mask (1,1,T,C+T), position_ids (1,T),
        past_key/past_value (Lk,1,KV,C,D))                            -> hidden, present_key/value (Lk,1,KV,T,D)
  output(hidden)                                                      -> logits (1,T,V) float32
Everything is computed in float32, the way transformers computes a float32 model.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.checkpoint.model_config import ModelConfig, load_model_config
from pipeline.checkpoint.safetensors_io import CheckpointWeights


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(np.square(x), axis=-1, keepdims=True)
    return weight * (x / np.sqrt(variance + eps))


def rope_cos_sin(position_ids: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (T, D) for positions (T,), as transformers computes them (float32, halves duplicated)."""
    inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)).astype(np.float32)
    angles = position_ids.astype(np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([angles, angles], axis=-1)
    return np.cos(emb), np.sin(emb)


def mrope_cos_sin(position_ids: np.ndarray, head_dim: int, theta: float, section: list[int]):
    """M-RoPE cos/sin (T, D) for (3, T) positions: frequency j takes its angle from row r(j), the rows owning
    section[0], section[1], section[2] consecutive frequencies (transformers' Qwen2_5_VLRotaryEmbedding)."""
    inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)).astype(np.float32)
    angles = position_ids.astype(np.float32)[:, :, None] * inv_freq  # (3, T, D/2)
    row = np.repeat(np.arange(3), section)
    picked = angles[row, :, np.arange(head_dim // 2)].T  # (T, D/2)
    emb = np.concatenate([picked, picked], axis=-1)
    return np.cos(emb), np.sin(emb)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (..., T, D): rotate pairs (i, i+D/2)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class ReferenceModel:
    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.config: ModelConfig = load_model_config(self.model_dir)
        self.weights = CheckpointWeights(self.model_dir)

    @lru_cache(maxsize=None)
    def _w(self, name: str) -> np.ndarray:
        return self.weights.get(name)

    def _opt(self, name: str):
        return self._w(name) if self.weights.has(name) else None

    def _linear(self, x, prefix: str):
        y = x @ self._w(prefix + ".weight").T
        bias = self._opt(prefix + ".bias")
        return y + bias if bias is not None else y

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self._w("model.embed_tokens.weight")[np.asarray(input_ids, dtype=np.int64)]

    def output(self, hidden: np.ndarray) -> np.ndarray:
        c = self.config
        x = rms_norm(hidden.astype(np.float32), self._w("model.norm.weight"), c.rms_norm_eps)
        head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        return (x @ self._w(head).T).astype(np.float32)

    def block(self, layers: range, hidden, attention_mask, position_ids, past_key, past_value):
        c = self.config
        x = hidden.astype(np.float32)[0]  # (T, H)
        mask = attention_mask.astype(np.float32)[0, 0]  # (T, C+T)
        positions = np.asarray(position_ids)
        if positions.ndim == 3:  # VL: (3,1,T) M-RoPE positions
            cos, sin = mrope_cos_sin(positions[:, 0], c.head_dim, c.rope_theta, c.mrope_section)
        else:
            cos, sin = rope_cos_sin(positions[0], c.head_dim, c.rope_theta)
        present_k, present_v = [], []
        for i, layer in enumerate(layers):
            x, k, v = self._layer(layer, x, mask, cos, sin,
                                  past_key[i, 0].astype(np.float32), past_value[i, 0].astype(np.float32))
            present_k.append(k)
            present_v.append(v)
        kv_dtype = past_key.dtype
        return (x[None].astype(hidden.dtype),
                np.stack(present_k)[:, None].astype(kv_dtype),
                np.stack(present_v)[:, None].astype(kv_dtype))

    def _layer(self, layer: int, x, mask, cos, sin, past_k, past_v):
        c = self.config
        p = f"model.layers.{layer}"
        T, D, KV, G = x.shape[0], c.head_dim, c.num_key_value_heads, c.group_size

        h = rms_norm(x, self._w(p + ".input_layernorm.weight"), c.rms_norm_eps)
        q = self._linear(h, p + ".self_attn.q_proj").reshape(T, KV * G, D).transpose(1, 0, 2)  # (Hq, T, D)
        k = self._linear(h, p + ".self_attn.k_proj").reshape(T, KV, D).transpose(1, 0, 2)  # (KV, T, D)
        v = self._linear(h, p + ".self_attn.v_proj").reshape(T, KV, D).transpose(1, 0, 2)
        if c.qk_norm:
            q = rms_norm(q, self._w(p + ".self_attn.q_norm.weight"), c.rms_norm_eps)
            k = rms_norm(k, self._w(p + ".self_attn.k_norm.weight"), c.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        keys = np.concatenate([past_k, k], axis=1)  # (KV, C+T, D)
        values = np.concatenate([past_v, v], axis=1)
        q = q.reshape(KV, G * T, D)  # query head h uses kv head h // G
        scores = (q @ keys.transpose(0, 2, 1)).reshape(KV, G, T, -1) / np.sqrt(D) + mask
        attn = (softmax(scores).reshape(KV, G * T, -1) @ values).reshape(KV * G, T, D)
        attn = attn.transpose(1, 0, 2).reshape(T, KV * G * D)
        x = x + self._linear(attn, p + ".self_attn.o_proj")

        h = rms_norm(x, self._w(p + ".post_attention_layernorm.weight"), c.rms_norm_eps)
        gate = self._linear(h, p + ".mlp.gate_proj")
        up = self._linear(h, p + ".mlp.up_proj")
        x = x + self._linear(silu(gate) * up, p + ".mlp.down_proj")
        return x, k, v
