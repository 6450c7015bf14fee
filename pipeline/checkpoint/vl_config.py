"""Parse a Qwen2.5-VL config.json: the language model's fields as a text model's, and the vision tower.

Two layouts exist. transformers 4.49-4.5x writes the language model's fields at the top level, with
rope_scaling {"type": "mrope", "mrope_section": [...]} and vision_config beside them; 5.x nests them in
text_config with rope_parameters {"rope_type": "default", "mrope_section": [...]}. Preprocessing values
(mean/std, rescale factor) come from preprocessor_config.json when the checkpoint has one, else the
Qwen2-VL image processor's defaults (OpenAI CLIP mean/std).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import StagepipeError
from schemas.manifest import VisionConfig

VL_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Qwen2.5-VL's special tokens (transformers' Qwen2_5_VLConfig defaults)
IMAGE_TOKEN_ID, VISION_START_TOKEN_ID, VISION_END_TOKEN_ID = 151655, 151652, 151653


def read_config(model_dir: Path) -> dict:
    where = Path(model_dir) / "config.json"
    try:
        return json.loads(where.read_text())
    except FileNotFoundError:
        raise StagepipeError(f"{where}: not found; point --model_path at a HuggingFace checkpoint folder") from None
    except json.JSONDecodeError as e:
        raise StagepipeError(f"{where}: invalid JSON ({e})") from None


def is_vl_config(cfg: dict) -> bool:
    return bool(set(cfg.get("architectures") or []) & set(VL_ARCHITECTURES))


def vl_text_config(cfg: dict, where: str) -> tuple[dict, list[int]]:
    """-> (the language model's fields as a flat text-model config, mrope_section). The M-RoPE entry is taken
    out of rope_scaling/rope_parameters, so what is left is plain RoPE to the text-model parser."""
    text = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
    text.update(cfg.get("text_config") or {})
    # transformers ties the embeddings when either level says so (Qwen2_5_VLConfig.__post_init__)
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings")) or bool(
        (cfg.get("text_config") or {}).get("tie_word_embeddings"))
    section = None
    for key in ("rope_scaling", "rope_parameters"):
        block = dict(text.get(key) or {})
        if "mrope_section" in block:
            section = block.pop("mrope_section")
            if block.get("rope_type", block.get("type")) == "mrope":
                block.pop("type", None)
                block["rope_type"] = "default"
            text[key] = block
    if not section:
        raise StagepipeError(f"{where}: no mrope_section in rope_scaling/rope_parameters; a Qwen2.5-VL config has "
                             "one (e.g. [16, 24, 24]); restore the checkpoint's config.json")
    try:
        section = [int(n) for n in section]
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // int(text["num_attention_heads"]))
    except (KeyError, TypeError, ValueError) as e:
        raise StagepipeError(f"{where}: cannot read mrope_section / the head size ({e})") from None
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise StagepipeError(f"{where}: mrope_section {section} must be 3 numbers summing to head_dim/2 = "
                             f"{head_dim // 2}")
    return text, section


def _preprocessor(model_dir: Path) -> dict:
    path = Path(model_dir) / PREPROCESSOR_CONFIG
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StagepipeError(f"{path}: invalid JSON ({e})") from None


def load_vision_config(model_dir: Path) -> VisionConfig | None:
    """The vision tower of a VL checkpoint; None for a text model."""
    cfg = read_config(model_dir)
    if not is_vl_config(cfg):
        return None
    where = Path(model_dir) / "config.json"
    vc = cfg.get("vision_config")
    if not isinstance(vc, dict):
        raise StagepipeError(f"{where}: a Qwen2.5-VL config needs a vision_config object")
    pre = _preprocessor(model_dir)
    text, _ = vl_text_config(cfg, str(where))
    try:
        act = vc.get("hidden_act", "silu")
        if act != "silu":
            raise StagepipeError(f"{where}: vision_config.hidden_act {act!r} is not supported (Qwen2.5-VL uses silu)")
        rope = vc.get("rope_parameters") or {}
        config = VisionConfig(
            depth=int(vc["depth"]), hidden_size=int(vc["hidden_size"]),
            intermediate_size=int(vc["intermediate_size"]), num_heads=int(vc["num_heads"]),
            out_hidden_size=int(vc.get("out_hidden_size") or text["hidden_size"]),
            patch_size=int(vc.get("patch_size") or vc.get("spatial_patch_size") or 14),
            temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
            in_channels=int(vc.get("in_channels") or vc.get("in_chans") or 3),
            window_size=int(vc.get("window_size", 112)),
            fullatt_block_indexes=[int(i) for i in vc.get("fullatt_block_indexes", [])],
            rope_theta=float(rope.get("rope_theta", 10000.0)), rms_norm_eps=1e-6,  # fixed in transformers
            image_token_id=int(cfg.get("image_token_id", IMAGE_TOKEN_ID)),
            vision_start_token_id=int(cfg.get("vision_start_token_id", VISION_START_TOKEN_ID)),
            vision_end_token_id=int(cfg.get("vision_end_token_id", VISION_END_TOKEN_ID)),
            image_mean=[float(v) for v in pre.get("image_mean", OPENAI_CLIP_MEAN)],
            image_std=[float(v) for v in pre.get("image_std", OPENAI_CLIP_STD)],
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)))
    except KeyError as e:
        raise StagepipeError(f"{where}: vision_config field {e} is missing") from None
    except (TypeError, ValueError) as e:
        raise StagepipeError(f"{where}: a vision_config field has an invalid value ({e})") from None
    _check(config, int(text["hidden_size"]), pre, str(where))
    return config


def _check(c: VisionConfig, text_hidden: int, pre: dict, where: str):
    if c.hidden_size % c.num_heads or c.head_dim % 4:
        raise StagepipeError(f"{where}: vision hidden_size {c.hidden_size} / num_heads {c.num_heads} must give a "
                             "head size divisible by 4 (2-D rotary embedding)")
    if c.out_hidden_size != text_hidden:
        raise StagepipeError(f"{where}: vision out_hidden_size {c.out_hidden_size} differs from the language "
                             f"model's hidden_size {text_hidden}")
    bad = [i for i in c.fullatt_block_indexes if not 0 <= i < c.depth]
    if bad:
        raise StagepipeError(f"{where}: fullatt_block_indexes {bad} are outside the {c.depth} vision layers")
    if len(c.image_mean) != c.in_channels or len(c.image_std) != c.in_channels:
        raise StagepipeError(f"{where}: image_mean/image_std need {c.in_channels} values")
    for key, ours in (("patch_size", c.patch_size), ("merge_size", c.spatial_merge_size),
                      ("temporal_patch_size", c.temporal_patch_size)):
        if key in pre and int(pre[key]) != ours:
            raise StagepipeError(f"{PREPROCESSOR_CONFIG}: {key} {pre[key]} differs from config.json's {ours}")
