"""The checkpoint side of a conversion: the tensors the graphs need (checked before anything is written), the
source files' fingerprint, and reading weights into the graphs' external data chunk by chunk."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.checkpoint.safetensors_io import CheckpointWeights, bf16_bits_to_f32
from pipeline.convert.onnx_builder import WeightStore
from pipeline.convert.quantize import block_size_for, quantize_rows
from pipeline.core.errors import StagepipeError
from pipeline.core.layout import GENERATION_CONFIG, MODEL_CONFIG, PREPROCESSOR_CONFIG
from schemas.manifest import ModelConfig, SourceFile

CHUNK_BYTES = 32 << 20  # convert big tables this many bytes at a time, so memory stays flat


def expected_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor the graphs read, with the shape it must have."""
    H, D, I = c.hidden_size, c.head_dim, c.intermediate_size
    q_out, kv_out = c.num_attention_heads * D, c.num_key_value_heads * D
    shapes = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, H)
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
                       f"{p}.self_attn.q_proj.weight": (q_out, H), f"{p}.self_attn.k_proj.weight": (kv_out, H),
                       f"{p}.self_attn.v_proj.weight": (kv_out, H), f"{p}.self_attn.o_proj.weight": (H, q_out),
                       f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
                       f"{p}.mlp.down_proj.weight": (H, I)})
        if c.qkv_bias:
            shapes.update({f"{p}.self_attn.q_proj.bias": (q_out,), f"{p}.self_attn.k_proj.bias": (kv_out,),
                           f"{p}.self_attn.v_proj.bias": (kv_out,)})
        if c.o_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (H,)
        if c.qk_norm:
            shapes.update({f"{p}.self_attn.q_norm.weight": (D,), f"{p}.self_attn.k_norm.weight": (D,)})
    return shapes


def check_checkpoint(config: ModelConfig, weights: CheckpointWeights):
    check_tensors(weights, expected_tensors(config))


def check_tensors(weights: CheckpointWeights, expected: dict[str, tuple[int, ...]]):
    """Every tensor present with the shape the config implies, in a float format we read."""
    for name, shape in expected.items():
        if not weights.has(name):
            raise StagepipeError(f"{weights.model_dir}: tensor '{name}' is missing from the checkpoint; "
                                 "is it a complete Qwen2/Qwen3 causal-LM checkpoint?")
        if weights.shape(name) != shape:
            raise StagepipeError(f"{weights.model_dir}: tensor '{name}' has shape {list(weights.shape(name))}, "
                                 f"config.json implies {list(shape)}; config and weights do not match")
        if weights.dtype(name) not in ("BF16", "F16", "F32"):
            raise StagepipeError(f"{weights.model_dir}: tensor '{name}' is {weights.dtype(name)}; "
                                 "only bfloat16, float16 and float32 checkpoints are supported")


def source_files(model_dir: Path, weights: CheckpointWeights) -> list[Path]:
    extra = [model_dir / n for n in (MODEL_CONFIG, GENERATION_CONFIG, PREPROCESSOR_CONFIG,
                                     "model.safetensors.index.json")]
    return [p for p in extra if p.exists()] + list(weights.files)


def source_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(16 << 20):
                h.update(block)
    return h.hexdigest()


def source_stat(files: list[Path]) -> dict[str, SourceFile]:
    return {p.name: SourceFile(size=p.stat().st_size, mtime_ns=p.stat().st_mtime_ns) for p in files}


class WeightSource:
    """Checkpoint tensors -> external TensorProtos in the store, converted row-chunk by row-chunk.

    Called as source(name, dtype) for plain weights; source.quantized(name, bits) for MatMulNBits weights."""

    def __init__(self, weights: CheckpointWeights, store: WeightStore):
        self.weights, self.store = weights, store

    def _row_chunks(self, name: str):
        raw = self.weights.raw(name)
        is_bf16 = self.weights.dtype(name) == "BF16"
        rows = max(1, CHUNK_BYTES // max(1, raw[0].nbytes * 2)) if raw.ndim > 1 else len(raw)
        for start in range(0, len(raw), rows):
            part = raw[start:start + rows]
            yield bf16_bits_to_f32(part) if is_bf16 else np.asarray(part)

    def __call__(self, name: str, dtype: np.dtype, shape: tuple[int, ...] | None = None):
        """shape: the tensor seen with another shape of the same row-major bytes (a Conv3d kernel as a matrix)."""
        return self.store.add(name, shape or self.weights.shape(name), dtype,
                              lambda: (c.astype(dtype, copy=False) for c in self._row_chunks(name)))

    def constant(self, key: str, value: np.ndarray):
        """A constant computed at conversion (masks, rotary tables) stored as external data like a weight."""
        return self.store.add(key, value.shape, value.dtype, lambda: (value,))

    def quantized(self, name: str, bits: int):
        """-> (packed uint8 (N, K/block, block*bits/8), scales float32 (N*K/block), block)."""
        n_rows, in_features = self.weights.shape(name)
        block = block_size_for(in_features, name)
        key = f"{name}.q{bits}"
        if key not in self.store.written:
            scales = []

            def packed_chunks():
                for chunk in self._row_chunks(name):
                    q, s = quantize_rows(chunk, bits, block)
                    scales.append(s)
                    yield q

            self.store.add(key, (n_rows, in_features // block, block * bits // 8), np.uint8, packed_chunks)
            self.store.add(f"{name}.scales{bits}", (n_rows * (in_features // block),), np.float32,
                           lambda: (s.reshape(-1) for s in scales))
        return self.store.written[key], self.store.written[f"{name}.scales{bits}"], block
