"""The random checkpoints are meaningful test material, and the HF oracle helpers behave as documented.

Later parity tests compare stagepipe's ONNX/numpy outputs (token ids, hidden states) against these checkpoints;
that comparison only means something if the models do non-trivial things with clear greedy decisions.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.checkpoint.model_config import load_model_config
from tests.hf_oracle import (CHECKPOINT_SPECS, GREEDY_NEW_TOKENS, PROMPT_LEN, hf_greedy_generate, hf_greedy_margins,
                             hf_layer_outputs, load_hf_model, make_checkpoint, prompt_ids)

# fp32 numerical error of the ONNX/numpy pipelines is ~1e-4 relative (logits of order 1-10, so ~1e-3 absolute at
# worst). A greedy step whose top-1/top-2 gap is below that could flip between two correct implementations, and a
# step with a large gap cannot be matched by a broken one by luck; so require every margin to be far above it.
MIN_MARGIN = 1e-2

SPEC_NAMES = list(CHECKPOINT_SPECS)


@pytest.mark.parametrize("checkpoint", SPEC_NAMES, indirect=True)
def test_greedy_generation_is_nontrivial_and_decisive(checkpoint, hf_model):
    spec = CHECKPOINT_SPECS[checkpoint.name]
    model = hf_model(spec.name)
    prompt = prompt_ids(spec)
    assert len(prompt) == PROMPT_LEN and max(prompt) < spec.vocab - 1

    new = hf_greedy_generate(model, prompt, GREEDY_NEW_TOKENS)
    assert len(new) == GREEDY_NEW_TOKENS
    assert len(set(new)) >= 5, f"{spec.name}: greedy output nearly constant: {new}"
    assert any(t != prompt[-1] for t in new), f"{spec.name}: greedy output just repeats the last prompt token"
    # Parity tests can compare all 20 tokens even against a pipeline that stops at EOS.
    assert spec.eos_token_id not in new, f"{spec.name}: EOS generated: {new}"

    margins = hf_greedy_margins(model, prompt, GREEDY_NEW_TOKENS)
    assert len(margins) == GREEDY_NEW_TOKENS
    assert min(margins) > MIN_MARGIN, f"{spec.name}: min top-1/top-2 margin {min(margins):.3g} (margins {margins})"


@pytest.mark.parametrize("checkpoint", SPEC_NAMES, indirect=True)
def test_layer_outputs_are_consistent_and_every_block_matters(checkpoint, hf_model):
    spec = CHECKPOINT_SPECS[checkpoint.name]
    model = hf_model(spec.name)
    prompt = prompt_ids(spec)
    out = hf_layer_outputs(model, prompt)
    T, H = len(prompt), spec.hidden
    assert out["embed"].shape == (1, T, H) and out["embed"].dtype == np.float32
    assert len(out["layers"]) == spec.layers
    assert all(x.shape == (1, T, H) and x.dtype == np.float32 for x in out["layers"])
    assert out["logits"].shape == (1, T, spec.vocab)

    weights = {n: p.detach().numpy() for n, p in model.named_parameters()}
    np.testing.assert_array_equal(out["embed"][0], weights["model.embed_tokens.weight"][prompt])
    # final_hidden = final RMSNorm of the raw last-layer output; logits = final_hidden @ lm_head^T.
    x = out["layers"][-1].astype(np.float64)
    normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * weights["model.norm.weight"]
    np.testing.assert_allclose(out["final_hidden"], normed, rtol=1e-4, atol=1e-4)
    lm_head = weights["model.embed_tokens.weight" if spec.tied else "lm_head.weight"]
    np.testing.assert_allclose(out["logits"], out["final_hidden"] @ lm_head.T, rtol=1e-4, atol=1e-3)
    # The first greedy token is the argmax of the last prompt position.
    assert int(out["logits"][0, -1].argmax()) == hf_greedy_generate(model, prompt, 1)[0]

    # Every decoder block changes the residual stream substantially (random init at a scale where blocks matter).
    prev = out["embed"]
    for i, cur in enumerate(out["layers"]):
        rel = np.linalg.norm(cur - prev) / np.linalg.norm(prev)
        assert rel > 0.1, f"{spec.name}: layer {i} barely changes the hidden state (relative change {rel:.3g})"
        prev = cur


def test_hidden_states_semantics_of_installed_transformers(qwen3_tied, hf_model):
    """Documents why hf_layer_outputs uses hooks: output_hidden_states[-1] is post-final-norm in transformers 5.x."""
    model = hf_model("qwen3_tied")
    prompt = prompt_ids(CHECKPOINT_SPECS["qwen3_tied"])
    out = hf_layer_outputs(model, prompt)
    with torch.no_grad():
        hs = model(torch.tensor([prompt]), use_cache=False, output_hidden_states=True).hidden_states
    assert len(hs) == len(out["layers"]) + 1
    for i in range(len(out["layers"]) - 1):
        np.testing.assert_array_equal(hs[i + 1].numpy(), out["layers"][i])
    np.testing.assert_array_equal(hs[-1].numpy(), out["final_hidden"])


@pytest.mark.parametrize("checkpoint", SPEC_NAMES, indirect=True)
def test_checkpoint_matches_spec_as_stagepipe_reads_it(checkpoint):
    spec = CHECKPOINT_SPECS[checkpoint.name]
    cfg = load_model_config(checkpoint)
    assert cfg.architecture == ("Qwen3ForCausalLM" if spec.arch == "qwen3" else "Qwen2ForCausalLM")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        (spec.hidden, spec.layers, spec.heads, spec.kv_heads)
    assert cfg.head_dim == spec.resolved_head_dim
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == \
        (spec.intermediate, spec.vocab, spec.tied)
    assert cfg.rope_theta == spec.rope_theta
    assert cfg.weights_dtype == spec.dtype
    assert cfg.qkv_bias == (spec.arch == "qwen2")
    assert cfg.eos_token_ids == [spec.vocab - 1] and cfg.bos_token_id == 0
    index = checkpoint / "model.safetensors.index.json"
    if spec.shards == 1:
        assert (checkpoint / "model.safetensors").exists() and not index.exists()
    else:
        shard_files = set(json.loads(index.read_text())["weight_map"].values())
        assert len(shard_files) == spec.shards and all((checkpoint / f).exists() for f in shard_files)
        keys = json.loads(index.read_text())["weight_map"]
        assert ("lm_head.weight" in keys) == (not spec.tied)


def test_bf16_sharded_v4_checkpoint(qwen3_bf16_shards_v4, hf_model):
    spec = CHECKPOINT_SPECS["qwen3_bf16_shards_v4"]
    cfg = json.loads((qwen3_bf16_shards_v4 / "config.json").read_text())
    # transformers-4.x style config
    assert cfg["rope_theta"] == spec.rope_theta
    assert cfg["torch_dtype"] == "bfloat16"
    assert "dtype" not in cfg and "rope_parameters" not in cfg and "layer_types" not in cfg
    assert cfg["transformers_version"].startswith("4.")

    # Stored as bfloat16 in every shard.
    index = json.loads((qwen3_bf16_shards_v4 / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        raw = (qwen3_bf16_shards_v4 / shard).read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        header.pop("__metadata__", None)
        assert header and all(t["dtype"] == "BF16" for t in header.values()), shard

    # transformers 5.x loads it (as float32) with the right RoPE base, and the weights are bf16-representable.
    model = hf_model(spec.name)
    assert model.config.rope_parameters["rope_theta"] == spec.rope_theta
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, p.to(torch.bfloat16).to(torch.float32)), name


def test_make_checkpoint_is_deterministic(tmp_path, qwen3_uneven):
    spec = CHECKPOINT_SPECS["qwen3_uneven"]
    again = make_checkpoint(tmp_path / spec.name, spec)
    for f in ("model.safetensors", "config.json", "generation_config.json"):
        assert (again / f).read_bytes() == (qwen3_uneven / f).read_bytes(), f


def test_load_hf_model_is_float32_eager_eval(qwen2_bias):
    model = load_hf_model(qwen2_bias)
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.model.layers[0].self_attn.q_proj.bias is not None
