"""The random-weight demo checkpoint (python -m pipeline.demo --random) is a valid HF Qwen3 checkpoint (checked with transformers) and is written once."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.demo.checkpoint import SEED_KEY, main, tensor_shapes, write_demo_checkpoint
from pipeline.core.errors import StagepipeError
from pipeline.checkpoint.model_config import load_model_config
from pipeline.checkpoint.safetensors_io import CheckpointWeights
from pipeline.runtime.chat_template import ChatTemplate
from pipeline.runtime.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "qwen3-demo"
    assert write_demo_checkpoint(out, seed=0) is True
    return out


@pytest.fixture(scope="session")
def hf_model(demo_dir):
    model, info = transformers.Qwen3ForCausalLM.from_pretrained(str(demo_dir), output_loading_info=True,
                                                                 dtype=torch.float32)
    model.eval()
    return model, info


def test_loads_with_all_weights(demo_dir, hf_model):
    model, info = hf_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    weights = CheckpointWeights(demo_dir)
    assert set(weights.names()) == set(tensor_shapes())
    assert all(weights.dtype(n) == "BF16" for n in weights.names())
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight", "model.norm.weight"):
        np.testing.assert_array_equal(state[name].numpy(), weights.get(name))


def test_greedy_output_varies(demo_dir, hf_model):
    model, _ = hf_model
    tok = Tokenizer.load(demo_dir)
    ids = tok.encode(ChatTemplate.load(demo_dir).prompt("Tell me a story.", no_think=True))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=151643)
    new = out[0, len(ids):].tolist()
    assert len(new) == 8 or new[-1] in (151643, 151645)
    assert len(set(new)) > 1, [tok.token_text(i) for i in new]


def test_configs(demo_dir):
    cfg = load_model_config(demo_dir)
    assert (cfg.architecture, cfg.hidden_size, cfg.num_layers, cfg.head_dim, cfg.vocab_size) == (
        "Qwen3ForCausalLM", 128, 4, 64, 151936)
    assert cfg.qk_norm and cfg.tie_word_embeddings and cfg.rope_theta == 1e6 and cfg.weights_dtype == "bfloat16"
    gen = json.loads((demo_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["top_k"] == 20
    assert json.loads((demo_dir / "config.json").read_text())[SEED_KEY] == 0
    assert json.loads((demo_dir / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_rewrite_only_when_needed(tmp_path):
    out = tmp_path / "demo"
    assert write_demo_checkpoint(out, seed=1) is True
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    first = CheckpointWeights(out).get("model.layers.0.self_attn.q_proj.weight")
    assert write_demo_checkpoint(out, seed=1) is False
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert write_demo_checkpoint(out, seed=2) is True  # another seed replaces the folder
    second = CheckpointWeights(out).get("model.layers.0.self_attn.q_proj.weight")
    assert not np.array_equal(first, second)
    (out / "tokenizer.json").unlink()  # incomplete: rebuilt
    assert write_demo_checkpoint(out, seed=2) is True
    assert (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temp folders left behind


def test_refuses_foreign_folder_and_cli(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(StagepipeError, match="not a stagepipe demo checkpoint"):
        write_demo_checkpoint(foreign)
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(foreign), "--random"])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert main(["--out", str(tmp_path / "cli"), "--random", "--seed", "3"]) == 0
    assert "wrote the random demo" in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "cli"), "--random", "--seed", "3"]) == 0
    assert "nothing to do" in capsys.readouterr().out
