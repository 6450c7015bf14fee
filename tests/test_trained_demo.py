"""The trained demo model: small compact weights, a valid HF checkpoint when expanded, the stage pipeline equal to
transformers on it, and it has learned Python (held-out perplexity far below the unigram baseline)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import StagepipeError
from pipeline.demo import trained_model
from pipeline.demo.checkpoint import write_trained_demo

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "docs" / "demo-training.json"
PROMPT = "def bubble_sort(items):\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, onnx_dir fp32 T=16 C=256) of the trained demo model."""
    from pipeline.convert.onnx_dir import convert

    root = tmp_path_factory.mktemp("trained")
    assert write_trained_demo(root / "ckpt") is True
    assert write_trained_demo(root / "ckpt") is False  # complete: left as it is
    convert(root / "ckpt", root / "onnx", max_input_len=16, max_cache_len=256, log=lambda *a: None)
    return root / "ckpt", root / "onnx"


@pytest.fixture(scope="module")
def hf(trained):
    model = transformers.Qwen3ForCausalLM.from_pretrained(str(trained[0]), dtype=torch.float32)
    return model.eval()


def test_compact_weights_are_small_and_expand_to_the_full_vocabulary(trained, hf):
    assert (trained_model.WEIGHTS_DIR / trained_model.WEIGHTS_FILE).stat().st_size <= 20 * 2**20
    cfg = hf.config
    assert cfg.vocab_size == 151936 and cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.tie_word_embeddings
    from pipeline.checkpoint.safetensors_io import CheckpointWeights

    compact = CheckpointWeights(trained_model.WEIGHTS_DIR)
    ids = compact.get(trained_model.TOKEN_IDS, np.int64)
    embed = hf.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(embed[ids], compact.get("model.embed_tokens.weight"))
    unused = np.ones(len(embed), bool)
    unused[ids] = False
    assert unused.sum() > 100_000 and not embed[unused].any()  # every other row is zero
    assert set(trained_model.SPECIAL_IDS) <= set(ids.tolist())


def test_damaged_weights_are_refused(tmp_path):
    copy = tmp_path / "trained"
    shutil.copytree(trained_model.WEIGHTS_DIR, copy)
    data = bytearray((copy / trained_model.WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x40
    (copy / trained_model.WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(StagepipeError, match="damaged"):
        trained_model.weights_digest(copy)


def _encode(onnx_dir, text):
    from pipeline.runtime.tokenizer import Tokenizer

    return Tokenizer.load(onnx_dir).encode(text)


def test_pipeline_equals_transformers(trained, hf):
    from benchmarks.perplexity import all_position_logits
    from pipeline.runtime.backends import OnnxBackend
    from pipeline.runtime.generate import generate
    from tests.hf_oracle import hf_greedy_generate, hf_greedy_margins

    ckpt, onnx_dir = trained
    text = (REPO / "benchmarks" / "demo_corpus.py").read_text()  # not stdlib: unseen text
    ids = _encode(onnx_dir, text)[:80]
    ours = all_position_logits(onnx_dir, ids)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 1e-4 * scale + 1e-4, (np.abs(ours - theirs).max(), scale)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()

    prompt = _encode(onnx_dir, PROMPT)
    new = generate(OnnxBackend(onnx_dir), prompt, 24)
    expected = hf_greedy_generate(hf, prompt, 24)
    margins = hf_greedy_margins(hf, prompt, 24)
    decisive = next((i for i, m in enumerate(margins) if m < 1e-2), len(margins))  # a near-tie may flip
    assert decisive >= 8 and new[:decisive] == expected[:decisive], (new, expected, margins)


def test_continues_python(trained):
    from pipeline.runtime.backends import OnnxBackend
    from pipeline.runtime.generate import generate
    from pipeline.runtime.tokenizer import Tokenizer

    onnx_dir = trained[1]
    text = Tokenizer.load(onnx_dir).decode(generate(OnnxBackend(onnx_dir), _encode(onnx_dir, PROMPT), 48))
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) >= 3 and all(line.startswith("    ") for line in lines[:2]), text  # an indented body
    words = set(text.replace("(", " ").replace(":", " ").split())
    assert words & {"for", "if", "return", "in", "while", "len", "range", "self"}, text


def test_held_out_perplexity_far_below_unigram(trained):
    from benchmarks.perplexity import held_out_texts, perplexity

    record = json.loads(RECORD.read_text())
    result = perplexity(trained[1], held_out_texts()[:2], 512)
    assert result["scored_tokens"] >= 500
    assert result["perplexity"] < record["unigram_perplexity"] / 5, (result, record["unigram_perplexity"])


def test_damaged_expanded_checkpoint_is_rewritten(tmp_path):
    """The expanded weights are what the demo's runs convert from: damage to them is repaired, never converted."""
    out = tmp_path / "ckpt"
    assert write_trained_demo(out) is True
    good = (out / "model.safetensors").read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x10
    (out / "model.safetensors").write_bytes(bytes(data))
    assert write_trained_demo(out) is True
    assert (out / "model.safetensors").read_bytes() == good
    assert write_trained_demo(out) is False
