"""Weight-only block quantization in the layout of onnxruntime's MatMulNBits (com.microsoft).

W (N, K) is cut into blocks of `block` consecutive weights along K; each block gets one float32 scale and
stores q = round(w / scale) + 2^(bits-1) as unsigned integers: MatMulNBits's default zero point, so no
zero-point tensor is needed. 4-bit values pack two per byte, low nibble first. The scale is the one among
CLIP_FRACTIONS * max|w| / (2^(bits-1) - 1) with the least squared error: clipping a block's outlier a little
buys finer steps for the rest (a few % lower error than plain max scaling at 4 bits).
"""
from __future__ import annotations

import numpy as np

from pipeline.core.errors import StagepipeError

CLIP_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def block_size_for(in_features: int, name: str) -> int:
    for block in (32, 16):
        if in_features % block == 0:
            return block
    raise StagepipeError(f"{name}: {in_features} input features are not a multiple of 16; int4/int8 quantization "
                         "needs that: convert with --precision fp32 or fp16")


def quantize_rows(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, K) float -> packed uint8 (rows, K/block, block*bits/8), scales float32 (rows, K/block)."""
    rows, K = w.shape
    qmax, zero = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    blocks = w.astype(np.float32, copy=False).reshape(rows, K // block, block)
    amax = np.abs(blocks).max(axis=-1)
    amax[amax == 0] = 1.0
    scales, best_err = None, None
    for fraction in CLIP_FRACTIONS if bits < 8 else (1.0,):
        candidate = (amax * fraction / qmax).astype(np.float32)
        q = np.clip(np.rint(blocks / candidate[..., None]), -qmax - 1, qmax)
        err = np.square(q * candidate[..., None] - blocks).sum(axis=-1)
        if scales is None:
            scales, best_err = candidate, err
        else:
            better = err < best_err
            scales[better], best_err[better] = candidate[better], err[better]
    q = (np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax) + zero).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scales.astype(np.float32)


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """The float32 matrix a quantized weight stands for (for tests and the reference)."""
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1)
    else:
        q = packed
    w = (q.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]
    return w.reshape(w.shape[0], -1)
