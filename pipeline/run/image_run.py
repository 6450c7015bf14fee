"""run_auto --image: a VL run's image step (the run folder's vision/) and what its prompt steps take from it."""
from __future__ import annotations

from pathlib import Path

from doit.tools import config_changed

from pipeline.core import layout
from pipeline.core.errors import StagepipeError
from pipeline.runtime.chat_template import ChatTemplate
from pipeline.runtime.image_prompt import has_chat_template, image_chat_text, with_image_tokens
from pipeline.runtime.mrope import MropeStep
from pipeline.runtime.vision_stage import load_image_embeds, stage_files, vision_step


class ImageStep:
    def __init__(self, run_dir: Path, manifest, image: Path, onnx_dir: Path):
        if manifest.vision is None:
            raise StagepipeError(f"--image: {onnx_dir} holds a text model's graphs; convert a Qwen2.5-VL checkpoint")
        self.image = Path(image)
        if not self.image.is_file():
            raise StagepipeError(f"--image {image}: not found")
        self.dir = Path(run_dir) / layout.VISION
        self.manifest = manifest
        self._mrope = None

    def prompt_ids(self, tokenizer, prompt: str, chat: bool, onnx_dir: Path, system: str | None = None) -> list[int]:
        """The prompt with the image's tokens (chat: one user turn of the image and the prompt)."""
        text = image_chat_text(prompt, onnx_dir, system) if chat else prompt
        return with_image_tokens(tokenizer.encode(text), self.manifest.vision)

    @staticmethod
    def chat_template(options, onnx_dir: Path):
        """The run's chat template for later turns: the checkpoint's, when it has one (without, the image turn is
        rendered in Qwen2.5-VL's format and the run cannot take later turns)."""
        if options.no_think:
            raise StagepipeError("--no_think is Qwen3's thinking switch; a Qwen2.5-VL model has none")
        return ChatTemplate.load(onnx_dir) if options.chat and has_chat_template(onnx_dir) else None

    def run(self, backend):
        vision_step(backend, self.dir, self.image)

    def mrope(self, prompt_ids: list[int]) -> MropeStep:
        """The prompt steps' positions and image rows (after the image step ran)."""
        if self._mrope is None:
            embeds = load_image_embeds(self.dir / layout.IMAGE_EMBEDS, self.manifest.vision)
            self._mrope = MropeStep.for_prompt(prompt_ids, self.manifest.vision, embeds)
        return self._mrope

    @property
    def embeds_file(self) -> str:
        return str(self.dir / layout.IMAGE_EMBEDS)

    def task(self, action, basename: str, backend_name: str) -> dict:
        outputs = [str(self.dir / dst) for _, dst, _ in stage_files(self.manifest.vision).values()]
        config = {"onnx": self.manifest.graphs_fingerprint, "backend": backend_name, "image": str(self.image)}
        return {"basename": basename, "name": layout.VISION, "actions": [action], "file_dep": [str(self.image)],
                "targets": outputs + [str(self.dir / layout.META)], "uptodate": [config_changed(config)],
                "verbosity": 2}
