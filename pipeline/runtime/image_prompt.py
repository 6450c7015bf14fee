"""Prompts with an image for a Qwen2.5-VL model: where the image's tokens go.

A chat template renders an image as <|vision_start|><|image_pad|><|vision_end|>; transformers' processor then
repeats <|image_pad|> once per image token (image_tokens = patches / merge^2: 256 for a 448-pixel image).
The same happens here on token ids, so a prompt's ids are those transformers' processor gives for the same
text.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import StagepipeError
from schemas.manifest import VisionSpec

# What Qwen2.5-VL's chat template renders for one user turn of an image and text (used when the checkpoint
# carries no template of its own)
DEFAULT_IMAGE_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")


def with_image_tokens(ids: list[int], vision: VisionSpec) -> list[int]:
    """The prompt's ids with the image's tokens: a single <|image_pad|> (the placeholder a chat template writes)
    becomes image_tokens of them; a prompt without one gets <|vision_start|> image tokens <|vision_end|> in
    front; a prompt already holding image_tokens of them in one run is kept."""
    c, n = vision.config, vision.image_tokens
    pad = c.image_token_id
    found = [i for i, t in enumerate(ids) if t == pad]
    if not found:
        return [c.vision_start_token_id] + [pad] * n + [c.vision_end_token_id] + list(ids)
    if len(found) == 1:
        i = found[0]
        return list(ids[:i]) + [pad] * n + list(ids[i + 1:])
    if len(found) == n and found[-1] - found[0] == n - 1:
        return list(ids)
    raise StagepipeError(f"the prompt has {len(found)} <|image_pad|> tokens; give one placeholder (one image per "
                         f"prompt) or exactly {n} in a row")


def has_chat_template(folder: Path) -> bool:
    from pipeline.runtime.chat_template import CONFIG_FILE, TEMPLATE_FILE

    config = Path(folder) / CONFIG_FILE
    return (Path(folder) / TEMPLATE_FILE).is_file() or (
        config.is_file() and "chat_template" in json.loads(config.read_text(encoding="utf-8")))


def image_chat_text(prompt: str, folder: Path, system: str | None = None) -> str:
    """One user turn of the image and the prompt (after a system turn), with the assistant turn opened: rendered
    by the checkpoint's own chat template when it has one (the onnx_dir keeps a copy), else in Qwen2.5-VL's format
    (whose template puts "You are a helpful assistant." when no system message is given)."""
    from pipeline.runtime.chat_template import ChatTemplate, chat_messages

    if not has_chat_template(folder):
        text = DEFAULT_IMAGE_CHAT.format(prompt=prompt)
        return text if system is None else text.replace("You are a helpful assistant.", system, 1)
    messages = chat_messages(prompt, system)
    messages[-1]["content"] = [{"type": "image"}, {"type": "text", "text": prompt}]
    return ChatTemplate.load(folder).render(messages, add_generation_prompt=True)


def image_prompt_step(manifest, ids: list[int], image_embeds: Path | None, whole_prompt: bool):
    """-> (ids, MropeStep or None) for a token_embed step: with an image step's image_embeds.npy the prompt gets
    the image's tokens and its rows; a VL prompt naming <|image_pad|> without them is refused."""
    from pipeline.runtime.mrope import MropeStep
    from pipeline.runtime.vision_stage import load_image_embeds

    vision = manifest.vision
    if image_embeds is None:
        if vision is not None and whole_prompt and vision.config.image_token_id in ids:
            raise StagepipeError("the prompt has <|image_pad|>: give --image_embeds (the image step's "
                                 "image_embeds.npy, from python -m stages.vision)")
        return ids, None
    if vision is None:
        raise StagepipeError("--image_embeds: these graphs are a text model's (no vision graphs)")
    if not whole_prompt:
        raise StagepipeError("--image_embeds goes with the prompt's steps (--prompt or --tokens_file), not a decode "
                             "step")
    ids = with_image_tokens(ids, vision)
    return ids, MropeStep.for_prompt(ids, vision, load_image_embeds(Path(image_embeds), vision))
