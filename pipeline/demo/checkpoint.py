"""The demo Qwen3 checkpoints in HuggingFace layout, written with numpy alone.

    python -m pipeline.demo --out models/demo-qwen3                  # the trained demo model (pipeline/demo/trained_model.py)
    python -m pipeline.demo --out models/random --random [--seed 0]  # random weights, for shape and parity tests

Both have the real Qwen3 vocabulary and tokenizer (so prompts and token ids are realistic) but only 4 small layers,
so every stage of the pipeline can be exercised in seconds without downloading a model. The random one writes noise.
The folder is built in a temporary sibling and renamed into place, so an interrupted run never leaves half a
checkpoint; a folder that already holds the same checkpoint is left as it is.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.core.cli_args import ArgumentParser
from pipeline.core.atomic import write_json
from pipeline.core.errors import StagepipeError, cli_entry
from pipeline.core.tensors import sha256_file
from pipeline.checkpoint.safetensors_io import read_header, save_safetensors
from pipeline.demo import trained_model
from pipeline.demo.tokenizer_files import write_qwen3_tokenizer
from pipeline.core.layout import GENERATION_CONFIG, MODEL_CONFIG, TOKENIZER_CONFIG, TOKENIZER_JSON

SEED_KEY = "stagepipe_demo_seed"
VERSION_KEY = "stagepipe_demo_version"
DEMO_VERSION = 1  # bump when what the generator writes changes, so old demo folders are rebuilt

HIDDEN = 128
INTERMEDIATE = 384
LAYERS = 4
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64
VOCAB = 151936  # Qwen3's embedding rows (151669 tokenizer ids, padded)
BOS_ID = 151643  # <|endoftext|>
EOS_ID = 151645  # <|im_end|>

# Linear weights are N(0, LINEAR_GAIN / sqrt(fan_in)). With 1.5 the residual stream stays dominated by the input
# token's own (tied) embedding and greedy decoding of a chat prompt repeats one token forever; 2.0 makes the layers
# matter enough that greedy output varies (hidden-state peaks stay below ~40, fine for bf16/fp16).
LINEAR_GAIN = 2.0
NORM_NOISE = 0.05

FILES = (MODEL_CONFIG, GENERATION_CONFIG, "model.safetensors", TOKENIZER_JSON, TOKENIZER_CONFIG)


def demo_config(seed: int) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "dtype": "bfloat16",
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "layer_types": ["full_attention"] * LAYERS,
        "max_position_embeddings": 40960,
        "max_window_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "sliding_window": None,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
        SEED_KEY: int(seed),
        VERSION_KEY: DEMO_VERSION,
    }


def demo_generation_config() -> dict:
    return {
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, BOS_ID],
        "pad_token_id": BOS_ID,
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
    }


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """HF Qwen3 tensor names -> shapes, in the order they are drawn from the random generator."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": (HEAD_DIM,),
            p + "self_attn.k_norm.weight": (HEAD_DIM,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def demo_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights: embeddings N(0, 1), linears N(0, LINEAR_GAIN/sqrt(fan_in)), norms 1 + N(0, NORM_NOISE)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in tensor_shapes().items():
        if name == "model.embed_tokens.weight":
            w = rng.standard_normal(shape, dtype=np.float32)
        elif len(shape) == 1:  # RMSNorm scales
            w = 1.0 + NORM_NOISE * rng.standard_normal(shape, dtype=np.float32)
        else:  # (out, in) linear
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(LINEAR_GAIN / math.sqrt(shape[1]))
        weights[name] = w.astype(np.float32)
    return weights


def is_complete_demo(out_dir, seed: int) -> bool:
    """True if out_dir already holds the demo checkpoint this version writes for `seed`."""
    out_dir = Path(out_dir)
    try:
        cfg = json.loads((out_dir / MODEL_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if cfg.get(SEED_KEY) != int(seed) or cfg.get(VERSION_KEY) != DEMO_VERSION:
        return False
    if not all((out_dir / f).is_file() for f in FILES):
        return False
    try:
        header, _ = read_header(out_dir / "model.safetensors")
    except StagepipeError:
        return False
    expected = tensor_shapes()
    return {k: tuple(v["shape"]) for k, v in header.items()} == expected


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_demo_folder(path: Path) -> bool:
    try:
        cfg = json.loads((path / MODEL_CONFIG).read_text())
        return SEED_KEY in cfg or trained_model.MARKER_KEY in cfg
    except (OSError, json.JSONDecodeError, TypeError):
        return False


def write_demo_checkpoint(out_dir, seed: int = 0) -> bool:
    """Write the random demo checkpoint into out_dir. Returns False (writing nothing) if it is already there for
    this seed."""
    seed = int(seed)
    if seed < 0:
        raise StagepipeError(f"--seed must be >= 0 (got {seed})")

    def fill(folder: Path):
        write_qwen3_tokenizer(folder)
        save_safetensors(folder / "model.safetensors", demo_weights(seed), bf16=True)
        write_json(folder / GENERATION_CONFIG, demo_generation_config())
        write_json(folder / MODEL_CONFIG, demo_config(seed))  # last: its seed key marks the folder complete

    return _replace_folder(Path(out_dir), lambda: is_complete_demo(out_dir, seed), fill)


def write_trained_demo(out_dir) -> bool:
    """Expand the trained demo model into out_dir (a HF checkpoint). Returns False if it is already there."""
    digest = trained_model.weights_digest()

    def complete() -> bool:
        try:
            cfg = json.loads((Path(out_dir) / MODEL_CONFIG).read_text())
            if cfg.get(trained_model.MARKER_KEY) != digest or not all((Path(out_dir) / f).is_file() for f in FILES):
                return False
            # the expanded weights are what every run of the demo converts from: a damaged file is rewritten
            return cfg.get(trained_model.EXPANDED_KEY) == sha256_file(Path(out_dir) / "model.safetensors")
        except (OSError, json.JSONDecodeError):
            return False

    return _replace_folder(Path(out_dir), complete, lambda folder: trained_model.write_trained_files(folder, digest))


def _replace_folder(out_dir: Path, complete, fill) -> bool:
    """Build the checkpoint in a temporary sibling with fill(folder) and rename it into place, unless complete().

    out_dir may be missing, empty, or an earlier demo checkpoint (it is replaced); any other existing folder is
    refused so that nothing of the user's is overwritten.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise StagepipeError(f"{out_dir}: exists and is not a folder; choose another --out")
    if complete():
        return False
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_demo_folder(out_dir):
        raise StagepipeError(f"{out_dir}: folder is not empty and is not a stagepipe demo checkpoint; "
                             "choose another --out or empty it first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); give it a normal folder's mode
        fill(tmp)
        for f in tmp.iterdir():  # the atomic writers' temp files are private (0600); make them normal files
            os.chmod(f, 0o666 & ~_umask())
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", suffix=".tmp", dir=out_dir.parent))
            os.rmdir(old)
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return True


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="python -m pipeline.demo",
                            description="Write the demo Qwen3 checkpoint (HF layout): the trained one, or random weights.")
    parser.add_argument("--out", required=True, help="checkpoint folder to create")
    parser.add_argument("--random", action="store_true",
                        help="random weights instead of the trained model (what the parity tests use)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for --random (default 0)")
    args = parser.parse_args(argv)
    if not args.random:
        wrote = write_trained_demo(args.out)
        what = "the trained demo Qwen3 checkpoint"
    else:
        wrote = write_demo_checkpoint(args.out, args.seed)
        what = f"the random demo Qwen3 checkpoint (seed {args.seed})"
    print(f"wrote {what} to {args.out}" if wrote else f"{args.out} already holds {what}; nothing to do")
    return 0


if __name__ == "__main__":
    main()
