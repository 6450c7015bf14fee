"""Test-only oracle for Qwen2.5-VL: a tiny random-weight checkpoint written by transformers, and its outputs.

The checkpoint has the real Qwen vocabulary and tokenizer (pipeline.demo's, with <|image_pad|> = 151655), a
2-layer language model with M-RoPE, and a 4-layer vision tower whose layers 1 and 3 attend to the whole image
and 0 and 2 within windows: at the 140-pixel test size the 5x5 merged-unit grid falls into 3x3 windows of 2x2,
2x1, 1x2 and 1x1 units, so the uneven edge windows are exercised too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.hf_oracle import _redraw_parameters

IMAGE_SIZE = 140
VL_SEED = 3
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
VISION = dict(depth=4, hidden_size=64, intermediate_size=96, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1, 3],
              window_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2)


def make_vl_checkpoint(out_dir: Path, seed: int = VL_SEED, tied: bool = False) -> Path:
    """Write the tiny Qwen2.5-VL checkpoint (float32, transformers 5.x config layout). Untied: with tied embeddings
    the residual stream keeps echoing the input token and greedy text repeats one token."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from pipeline.demo.tokenizer_files import write_qwen3_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = Qwen2_5_VLConfig(text_config=dict(TEXT, tie_word_embeddings=tied), vision_config=VISION,
                              tie_word_embeddings=tied, architectures=["Qwen2_5_VLForConditionalGeneration"])
    with torch.random.fork_rng():
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    _redraw_parameters(model, seed)
    model.save_pretrained(out_dir)
    write_qwen3_tokenizer(out_dir)
    # the demo tokenizer carries Qwen3's text-only chat template; a VL checkpoint without one gets Qwen2.5-VL's format
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    gen = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out_dir


def rewrite_config_v4(model_dir: Path):
    """Rewrite the checkpoint's 5.x config.json the way transformers 4.49-4.5x wrote Qwen2.5-VL configs: the
    language model's fields at the top level, rope_scaling {"type": "mrope"}, vision fields named as then."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "layer_types", "dtype"):
        text.pop(key, None)
    cfg.update(text)
    cfg.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
               torch_dtype=cfg.pop("dtype", "float32"), transformers_version="4.49.0")
    vision = cfg["vision_config"]
    vision.pop("rope_parameters", None)
    vision["in_chans"] = vision.pop("in_channels")
    vision["spatial_patch_size"] = vision["patch_size"]
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def load_vl_model(model_dir: Path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()


def make_test_image(path: Path, size=(150, 131), seed: int = 0, mode: str = "RGB") -> Path:
    """A random picture (smooth gradients plus noise) that transformers' processor maps to 140 x 140 pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 9.0 + c) * np.cos(yy / 13.0 - c) for c in range(3)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        alpha = (rng.random((h, w)) * 255).astype(np.uint8)
        image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    image.save(path)
    return Path(path)


def hf_pixel_values(image_path: Path, image_size: int = IMAGE_SIZE):
    """transformers' Qwen2-VL image processor (PIL backend) at min_pixels = max_pixels = image_size^2."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(min_pixels=image_size ** 2, max_pixels=image_size ** 2)
    out = processor(images=[Image.open(image_path)], return_tensors="np")
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def hf_vision_outputs(model, pixel_values: np.ndarray, grid_thw: np.ndarray) -> dict:
    """The visual model's patch embeddings, every layer's output (window order) and the merged image embeddings."""
    visual = model.model.visual
    captured = {}
    hooks = [visual.patch_embed.register_forward_hook(lambda m, i, o: captured.__setitem__("patch", o.detach()))]
    for n, blk in enumerate(visual.blocks):
        hooks.append(blk.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o.detach())))
    try:
        with torch.no_grad():
            out = visual(torch.as_tensor(pixel_values), grid_thw=torch.as_tensor(grid_thw))
    finally:
        for h in hooks:
            h.remove()
    return {"patch": captured["patch"].numpy(), "layers": [captured[n].numpy() for n in range(len(visual.blocks))],
            "image_embeds": out.pooler_output.numpy()}


def hf_rope_index(model, input_ids, grid_thw, image_token_id: int):
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64)).reshape(1, -1)
    positions, delta = model.model.get_rope_index(ids, mm_token_type_ids=(ids == image_token_id).int(),
                                                  image_grid_thw=torch.as_tensor(grid_thw))
    return positions.numpy(), int(delta.reshape(-1)[0])


def hf_generate(model, input_ids, pixel_values, grid_thw, image_token_id: int, new_tokens: int):
    """Greedy new tokens and the top-1/top-2 margin of each step (EOS neither stops nor is suppressed)."""
    import copy

    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64)).reshape(1, -1)
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.eos_token_id = None
    kwargs = {}
    if pixel_values is not None:
        kwargs = dict(pixel_values=torch.as_tensor(pixel_values), image_grid_thw=torch.as_tensor(grid_thw),
                      mm_token_type_ids=(ids == image_token_id).int())
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                                 return_dict_in_generate=True, output_logits=True, **kwargs)
    finally:
        model.generation_config = saved
    logits = torch.stack([step[0] for step in out.logits])
    top2 = torch.topk(logits, 2, dim=-1).values
    return out.sequences[0, ids.shape[1]:].tolist(), (top2[:, 0] - top2[:, 1]).tolist()
