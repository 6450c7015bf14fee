"""The trained demo model: compact weights shipped in the repo, expanded into a normal HuggingFace checkpoint.

    python -m pipeline.demo --out models/demo-qwen3           # this one (the default demo)

`pipeline/demo/trained/model.safetensors` (written by `python -m benchmarks.train_demo`) holds the layers and only the
embedding rows of tokens the training text used, with `token_ids` saying which vocabulary id each row belongs to.
Expansion gives every other id of Qwen3's 151,936 rows a zero row (its logit is 0; training accounted for that) and
writes config.json, generation_config.json and the tokenizer files. numpy only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.checkpoint.safetensors_io import CheckpointWeights, save_safetensors
from pipeline.core.atomic import write_json, write_text
from pipeline.core.errors import StagepipeError
from pipeline.core.layout import GENERATION_CONFIG, MODEL_CONFIG
from pipeline.core.tensors import sha256_file
from pipeline.demo.tokenizer_files import QWEN3_ADDED_TOKENS, write_qwen3_tokenizer

WEIGHTS_DIR = Path(__file__).parent / "trained"
WEIGHTS_FILE = "model.safetensors"
DIGEST_FILE = "model.sha256"  # written beside the weights by the training script; checked before every expansion
TOKEN_IDS = "token_ids"
MARKER_KEY = "stagepipe_demo_trained"  # config.json key: the sha256 of the compact weights the folder came from
EXPANDED_KEY = "stagepipe_demo_weights_sha256"  # config.json key: the sha256 of the expanded model.safetensors

VOCAB = 151936
SPECIAL_IDS = tuple(token_id for token_id, _, _ in QWEN3_ADDED_TOKENS)
EOT_ID, IM_END_ID = 151643, 151645
SHAPE = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 6,
         "num_key_value_heads": 2, "head_dim": 64}


def model_config() -> dict:
    """Qwen3 config of the demo shape (head_dim 64 is not hidden/heads = 32, as in real Qwen3 models)."""
    layers = SHAPE["num_hidden_layers"]
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": VOCAB, **SHAPE,
            "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "attention_bias": False,
            "attention_dropout": 0.0, "tie_word_embeddings": True, "use_cache": True, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": layers, "layer_types": ["full_attention"] * layers,
            "initializer_range": 0.02, "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "dtype": "bfloat16"}


def generation_config() -> dict:
    # a source file ends with <|endoftext|>; sampling as Qwen3's own generation_config suggests
    return {"bos_token_id": EOT_ID, "eos_token_id": [EOT_ID, IM_END_ID], "pad_token_id": EOT_ID,
            "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


def save_compact(out_dir, state: dict[str, np.ndarray], token_ids: np.ndarray):
    """Write the trained layers and the used embedding rows (bf16) with the ids they belong to."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {TOKEN_IDS: np.asarray(token_ids, dtype=np.int32), **state}
    save_safetensors(out_dir / WEIGHTS_FILE, tensors, bf16=True, metadata={"format": "pt", "vocab_size": str(VOCAB)})
    write_text(out_dir / DIGEST_FILE, sha256_file(out_dir / WEIGHTS_FILE) + "\n")


def weights_digest(weights_dir=WEIGHTS_DIR) -> str:
    """The sha256 of the compact weights, checked against the one recorded when they were trained."""
    path = Path(weights_dir) / WEIGHTS_FILE
    restore = "restore it with `git checkout pipeline/demo/trained` or retrain: python -m benchmarks.train_demo"
    try:
        digest = sha256_file(path)
        expected = (Path(weights_dir) / DIGEST_FILE).read_text().strip()
    except OSError as e:
        raise StagepipeError(f"{e.filename}: cannot read the trained demo weights ({e.strerror}); {restore}") from None
    if digest != expected:
        raise StagepipeError(f"{path}: damaged (its sha256 differs from {DIGEST_FILE}); {restore}")
    return digest


def expanded_weights(weights_dir=WEIGHTS_DIR) -> dict[str, np.ndarray]:
    """The full-vocabulary float32 tensors of the HF checkpoint."""
    compact = CheckpointWeights(Path(weights_dir))
    ids = compact.get(TOKEN_IDS, np.int64)
    rows = compact.get("model.embed_tokens.weight")
    if ids.ndim != 1 or len(ids) != len(rows) or ids.min() < 0 or ids.max() >= VOCAB or len(set(ids.tolist())) != len(ids):
        raise StagepipeError(f"{weights_dir}/{WEIGHTS_FILE}: token_ids do not match the embedding rows; "
                             "retrain with python -m benchmarks.train_demo")
    embed = np.zeros((VOCAB, rows.shape[1]), dtype=np.float32)
    embed[ids] = rows
    weights = {name: compact.get(name) for name in compact.names() if name not in (TOKEN_IDS, "model.embed_tokens.weight")}
    return {"model.embed_tokens.weight": embed, **weights}


def write_trained_files(folder: Path, digest: str, weights_dir=WEIGHTS_DIR):
    """Fill an empty folder with the expanded checkpoint; config.json last (its marker says the folder is complete)."""
    write_qwen3_tokenizer(folder)
    save_safetensors(folder / "model.safetensors", expanded_weights(weights_dir), bf16=True)
    write_json(folder / GENERATION_CONFIG, generation_config())
    write_json(folder / MODEL_CONFIG, {**model_config(), MARKER_KEY: digest,
                                       EXPANDED_KEY: sha256_file(folder / "model.safetensors")})
