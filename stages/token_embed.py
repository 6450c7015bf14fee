"""Stage 1: tokens -> input_ids, attention_mask, position_ids, hidden_block0 and meta.json for one step.

Step 0 of a prompt:  --prompt "text" (or --prompt_file FILE, --tokens_file ids.txt) --past_len 0
A chat prompt:       --prompt "text" --chat [--system S] [--no_think] (the onnx_dir's chat template)
Next prompt chunk:   the same --prompt with --past_len 16 (takes the prompt's tokens from past_len on)
A decode step:       --prev_step runs/x/step_0001 (or --tokens_file runs/x/step_0001/next_token_id.txt)
A later chat turn:   --tokens_file with the whole conversation's ids so far (the step takes those from past_len on)
With an image (VL):  --image_embeds runs/x/vision/image_embeds.npy on every prompt step: the prompt's
                     <|image_pad|> (or, without one, the prompt's start) gets the image's tokens, whose rows of
                     hidden_block0.npy are the image embeddings; positions are M-RoPE's (pipeline/runtime/mrope.py)
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.cli_args import read_text_file
from pipeline.core.errors import StagepipeError, cli_entry
from pipeline.core.layout import NEXT_TOKEN_ID, step_name
from pipeline.runtime.image_prompt import image_chat_text, image_prompt_step
from pipeline.runtime.stage_ops import token_embed
from pipeline.core.tensors import parse_token_ids
from pipeline.runtime.chat_template import ChatTemplate
from pipeline.runtime.generation_config import sampling_from_generation_config
from pipeline.runtime.sampling import with_overrides
from pipeline.runtime.tokenizer import Tokenizer
from schemas.run import SamplingSettings
from stages.common import open_backend, stage_parser, step_number, step_paths


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed", "repetition_penalty")


def add_sampling_args(p):
    p.add_argument("--greedy", action="store_true", default=None, help="argmax (the default)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition_penalty", type=float, default=None,
                   help="penalize token ids already in the cache, as transformers does (1: none)")
    p.add_argument("--sampling", choices=("model",), default=None,
                   help="model: start from the onnx_dir's generation_config.json; the flags above override it")


def sampling_from_args(a, base: SamplingSettings | None = None) -> SamplingSettings | None:
    """The sampling settings the flags give over base; None when no flag is given and base stands."""
    given = {k: getattr(a, k) for k in SAMPLING_FLAGS}
    if a.sampling == "model":
        base = sampling_from_generation_config(a.onnx_dir, seed=a.seed or 0)
    elif a.greedy is None and not any(v is not None for v in given.values()) and base is not None:
        return None
    return with_overrides(base or SamplingSettings(), greedy=bool(a.greedy), **given)


@cli_entry
def main(argv=None):
    p = stage_parser("python -m stages.token_embed", __doc__.split("\n")[0])
    p.add_argument("--past_len", type=int, required=True, help="cache slots already filled before this step")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt_file", type=Path, help="a UTF-8 text file holding the prompt")
    src.add_argument("--tokens_file", type=Path, help="token ids (.npy or text): the prompt, or the previous token")
    src.add_argument("--init_tokens", type=Path, help="same as --tokens_file (name used by the original scripts)")
    src.add_argument("--prev_step", type=Path, help="previous step folder: take its next_token_id.txt")
    p.add_argument("--step", type=int, default=None, help="step number (default: from the folder name)")
    p.add_argument("--after_step", type=Path, default=None,
                   help="the step this one follows, whose cache it extends (default: --prev_step, else the "
                        "sibling step_{N-1} folder when past_len > 0)")
    p.add_argument("--hidden_out", type=Path, default=None, help="default STEP_DIR/hidden_block0.npy")
    p.add_argument("--input_ids", type=Path, default=None, help="default STEP_DIR/input_ids.npy")
    p.add_argument("--chat", action="store_true", help="render --prompt with the onnx_dir's chat template")
    p.add_argument("--system", default=None, help="--chat: a system message")
    p.add_argument("--no_think", action="store_true", help="--chat, Qwen3's template: enable_thinking=False")
    p.add_argument("--image_embeds", type=Path, default=None,
                   help="VL models: the image step's image_embeds.npy (python -m stages.vision), for prompt steps")
    add_sampling_args(p)
    a = p.parse_args(argv)
    if a.past_len < 0:
        raise StagepipeError(f"--past_len {a.past_len}: must be >= 0")
    if (a.system is not None or a.no_think) and not a.chat:
        raise StagepipeError("--system and --no_think go with --chat")
    if a.chat and a.prompt is None and not a.prompt_file:
        raise StagepipeError("--chat renders the prompt; give --prompt TEXT or --prompt_file FILE")
    backend = open_backend(a)
    m = backend.manifest
    if a.prompt is not None or a.prompt_file:
        text = read_text_file(a.prompt_file, "--prompt_file") if a.prompt_file else a.prompt
        if not text.strip():
            raise StagepipeError(f"{'--prompt_file' if a.prompt_file else '--prompt'} is empty; give some text")
        if a.chat and a.image_embeds:  # one user turn of the image and the text
            text = image_chat_text(text, a.onnx_dir, system=a.system)
        elif a.chat:
            text = ChatTemplate.load(a.onnx_dir).prompt(text, system=a.system, no_think=a.no_think)
        ids = Tokenizer.load(a.onnx_dir).encode(text)
    else:
        ids = parse_token_ids(a.prev_step / NEXT_TOKEN_ID if a.prev_step else (a.tokens_file or a.init_tokens))
    whole_prompt = a.prompt is not None or bool(a.prompt_file) or bool(a.tokens_file or a.init_tokens) and len(ids) > 1
    ids, mrope = image_prompt_step(m, ids, a.image_embeds, whole_prompt)
    if whole_prompt:
        # a whole prompt: this step takes the tokens from past_len on, at most max_input_len of them
        if a.past_len >= len(ids):
            raise StagepipeError(f"--past_len {a.past_len}: the prompt has only {len(ids)} tokens")
        if len(ids) > m.max_cache_len:
            raise StagepipeError(f"the prompt has {len(ids)} tokens, more than the {m.max_cache_len}-slot KV cache")
        chunk = ids[a.past_len:a.past_len + m.max_input_len]
        sample_next = a.past_len + len(chunk) == len(ids)
    else:
        chunk, sample_next = ids[-1:], True
    sampling = sampling_from_args(a) or SamplingSettings()
    step = a.step if a.step is not None else step_number(a.step_dir)
    prev = a.after_step or a.prev_step
    if prev is None and a.past_len > 0:  # by convention the previous step is the sibling step_{N-1}
        prev = a.step_dir.parent / step_name(step - 1)
        if step < 1 or not prev.is_dir():
            raise StagepipeError(f"--past_len {a.past_len} > 0: give --after_step (the step before this one); "
                                 f"{prev} is not there")
    meta = token_embed(backend, step_paths(a, input_ids=a.input_ids), step, a.past_len, chunk, sampling,
                       sample_next, a.hidden_out, prev_step_dir=prev, mrope=mrope)
    print(f"{a.step_dir}: {meta.mode} step {meta.step}, past_len {meta.past_len}, {meta.q_len} tokens")


if __name__ == "__main__":
    main()
