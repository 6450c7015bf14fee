"""RunOptions: every run_auto setting with its default, once; `doit run_auto` parameters are built from it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.cli_args import read_text_file
from pipeline.core.errors import StagepipeError
from pipeline.core.options import option, utf8_text
from schemas.run import SamplingSettings

DEFAULT_PROMPT = "def bubble_sort(items):"  # what the trained demo model (Python source) can continue
SAMPLING_SOURCES = ("flags", "model")


@dataclass(frozen=True)
class RunOptions:
    prompt: str | None = option(None, "prompt text (default: a demo prompt)")
    prompt_file: str = option("", "read the prompt from this UTF-8 text file instead")
    image: str = option("", "VL models: an image file the prompt is about (its tokens go where the prompt writes "
                            "<|image_pad|>, else before the prompt)")
    model_path: str = option("", "HF checkpoint: converted first when the onnx_dir is missing or stale")
    onnx_dir: str = option("", "converted model folder (default with --model_path: onnx/<model folder name>)")
    run_root: str = option("runs/demo", "the run's folder")
    steps: int = option(32, "new tokens to generate at most (in a conversation: per turn)")
    max_input_len: int = option(0, "T when converting (0: the converter's default)")
    max_cache_len: int = option(0, "C when converting (0: the converter's default)")
    greedy: bool = option(False, "argmax (the default unless --temperature/--top_k/--top_p)")
    temperature: float = option(0.0, "sampling temperature")
    top_k: int = option(0, "sample among the k best (0: all)")
    top_p: float = option(0.0, "nucleus sampling mass")
    repetition_penalty: float = option(0.0, "penalize token ids already in the conversation, as transformers does "
                                             "(e.g. 1.1; 0: none, or --sampling model's)")
    sampling: str = option("flags", "model: start from the checkpoint's generation_config.json (temperature, top_k, "
                                    "top_p, repetition_penalty), which the flags above override",
                           choices=SAMPLING_SOURCES)
    seed: int = option(0, "sampling seed")
    chat: bool = option(False, "render the prompt with the checkpoint's own chat template")
    system: str = option("", "--chat: a system message (default: whatever the template adds)")
    no_think: bool = option(False, "--chat with Qwen3's template: thinking off (enable_thinking=False)")
    reply: str = option("", "append this user message to the run's conversation and generate the answer "
                            "(settings you do not give are the run's)")
    messages: str = option("", "a conversation .json ([{role, content}, ...]): replay its system and user "
                               "turns, generating every assistant turn")
    backend: str = option("onnx", "onnx, reference, or a Backend subclass as package.module:ClassName")
    stage_onnx: str = option("", "hybrid run: these stages from another onnx_dir of the same model "
                                 "(block2:DIR[,output:DIR2]; doit takes a bare NAME=VALUE word as its own variable)")
    stage_backend: str = option("", "hybrid run: these stages on another backend (block2:NAME[,...])")
    provider: str = option("cpu", "onnxruntime: cpu or cuda")
    threads: int = option(0, "onnxruntime threads (0: one per core; runs side by side share the cores)")
    ignore_eos: bool = option(False, "do not stop at end of sequence")
    from_step: int = option(-1, "discard steps >= K and generate them again (-1: keep all)")
    clean: bool = option(False, "start the run folder over")
    reset_kv: bool = option(False, "new KV cache, recompute all steps")
    full_logits: bool = option(False, "prefill steps keep logits for all T rows (default: the last real row only)")
    fsync: bool = option(False, "make each finished step durable (fsync its files, the KV cache and the folders)")

    def sampling_given(self) -> bool:
        """True when any sampling option differs from its default."""
        return bool(self.greedy or self.temperature or self.top_k or self.top_p or self.repetition_penalty
                    or self.seed or self.sampling != "flags")

    def sampling_settings(self, onnx_dir) -> SamplingSettings:
        """--sampling model starts from the onnx_dir's generation_config.json; the flags given override it."""
        from pipeline.runtime.generation_config import sampling_from_generation_config
        from pipeline.runtime.sampling import with_overrides

        base = sampling_from_generation_config(onnx_dir, self.seed) if self.sampling == "model" else \
            SamplingSettings(seed=self.seed)
        return with_overrides(base, greedy=self.greedy, temperature=self.temperature or None,
                              top_k=self.top_k or None, top_p=self.top_p or None,
                              repetition_penalty=self.repetition_penalty or None)

    def prompt_text(self) -> str:
        """The prompt: --prompt's text, the --prompt_file's contents, or the demo prompt when neither is given."""
        if self.prompt is not None and self.prompt_file:
            raise StagepipeError("--prompt and --prompt_file: give one of them")
        text = read_text_file(Path(self.prompt_file), "--prompt_file") if self.prompt_file else \
            self.prompt and utf8_text(self.prompt, "--prompt")
        if text is None:
            return DEFAULT_PROMPT
        if not text.strip():
            raise StagepipeError(f"{'--prompt_file ' + self.prompt_file if self.prompt_file else '--prompt'} is "
                                 "empty; give some text")
        return text
