"""An image file -> the flattened pixel patches a Qwen2.5-VL vision tower takes, with Pillow and numpy.

The steps and their arithmetic are those of transformers' Qwen2-VL image processor (the PIL backend,
image_processing_pil_qwen2_vl.py): transparency composited onto white, RGB; a Pillow bicubic resize of the
uint8 image; x * rescale_factor in float64 then float32; (x - mean) / std in float32; patchified
block-major into (h*w, channels * temporal_patch_size * patch * patch), the still image repeated over the
temporal patch. One difference: the processor picks its size per image (smart_resize keeps the aspect
ratio), while the graphs here are built for one size, so every image is resized to image_size x image_size.
For an image the processor maps to that size (a square-ish one, with min_pixels = max_pixels =
image_size^2) the patches are identical.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.errors import StagepipeError
from schemas.manifest import VisionConfig


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise StagepipeError("reading images needs Pillow: pip install -e '.[vl]' (or pip install pillow)") from None
    return Image


def load_rgb(path: Path):
    """The image at path as an RGB PIL image (transparency composited onto white, as transformers does)."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            img.load()
            has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
            if not has_alpha:
                return img.convert("RGB")
            rgba = img.convert("RGBA")
    except FileNotFoundError:
        raise StagepipeError(f"--image {path}: not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise StagepipeError(f"--image {path}: not an image Pillow can read ({e})") from None
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def normalized_pixels(image, config: VisionConfig, image_size: int) -> np.ndarray:
    """(channels, image_size, image_size) float32: resized, rescaled and normalized."""
    Image = _pil()
    resized = np.asarray(image.resize((image_size, image_size), resample=Image.Resampling.BICUBIC))
    x = (resized.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


def patchify(pixels: np.ndarray, config: VisionConfig) -> np.ndarray:
    """(C, H, W) -> (H/p * W/p, C * temporal * p * p), rows block-major (merge x merge patches together)."""
    C, H, W = pixels.shape
    p, m, tp = config.patch_size, config.spatial_merge_size, config.temporal_patch_size
    gh, gw = H // p, W // p
    patches = pixels.reshape(C, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], tp, p, p))
    return np.ascontiguousarray(patches.reshape(gh * gw, C * tp * p * p), dtype=np.float32)


def image_patches(path: Path, config: VisionConfig, image_size: int) -> np.ndarray:
    """The vision_patch graph's input for the image file at path: (num_patches, patch_values) float32."""
    return patchify(normalized_pixels(load_rgb(path), config, image_size), config)
