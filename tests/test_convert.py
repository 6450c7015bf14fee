"""Acceptance tests of the converter (python -m pipeline.convert) against transformers.

Every random-weight checkpoint of tests/hf_oracle.py is converted once per session (fp32 graphs, float32 KV,
T=8, C=64) and checked stage by stage against transformers (ONNX and numpy reference), end to end by greedy
generation with a KV cache the test manages itself, and for what lands on disk (manifest, shared weight files,
graph hygiene). Two checkpoints are also converted to fp16. Bad inputs go through the real CLI in a subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline.runtime.backends import OnnxBackend, ReferenceBackend
from pipeline.convert.onnx_dir import convert
from pipeline.core.errors import StagepipeError
from pipeline.runtime.generate import generate, prompt_chunks
from pipeline.runtime.plan import step_inputs
from pipeline.checkpoint.safetensors_io import CheckpointWeights, save_safetensors
from schemas.manifest import Manifest
from tests.hf_oracle import (CHECKPOINT_SPECS, GREEDY_NEW_TOKENS, PROMPT_LEN, hf_greedy_generate, hf_layer_outputs,
                             prompt_ids)

REPO = Path(__file__).resolve().parents[1]
T, C = 8, 64  # prefill tokens per step, KV cache slots: small, so the 21-token prompt takes 3 prefill chunks
SPEC_NAMES = list(CHECKPOINT_SPECS)

# How each checkpoint is split into blocks, and the layer ranges that must come out.
SPLITS = {
    "qwen3_tied": dict(blocks=2),
    "qwen3_untied_gqa1": dict(layer_split=[1, 3]),
    "qwen2_bias": dict(blocks=2),
    "qwen3_uneven": dict(blocks=2),  # 5 layers -> 3 + 2
    "qwen3_bf16_shards_v4": dict(layer_split=[3, 1]),
}
EXPECTED_RANGES = {
    "qwen3_tied": [(0, 2), (2, 4)],
    "qwen3_untied_gqa1": [(0, 1), (1, 4)],
    "qwen2_bias": [(0, 2), (2, 4)],
    "qwen3_uneven": [(0, 3), (3, 5)],
    "qwen3_bf16_shards_v4": [(0, 3), (3, 4)],
}
FP16_NAMES = ["qwen2_bias", "qwen3_tied"]  # one Qwen2 (q/k/v bias), one Qwen3 (q/k norm, tied head)
CONVERSIONS = [(n, "fp32") for n in SPEC_NAMES] + [(n, "fp16") for n in FP16_NAMES]


# ---------------------------------------------------------------------------------------------------------------
# Session fixtures: each conversion and each transformers reference computed once
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def converted(tmp_path_factory, checkpoint_path):
    """Callable (spec name, precision) -> onnx_dir, converted on first use (fp32: float32 KV; fp16: float16 KV)."""
    root = tmp_path_factory.mktemp("converted")
    done: dict[tuple[str, str], Path] = {}

    def get(name: str, precision: str = "fp32") -> Path:
        if (name, precision) not in done:
            onnx_dir = root / f"{name}-{precision}"
            convert(checkpoint_path(name), onnx_dir, max_input_len=T, max_cache_len=C, precision=precision,
                    log=lambda *a: None, **SPLITS[name])  # default KV dtype: float32, or float16 for fp16
            done[name, precision] = onnx_dir
        return done[name, precision]

    return get


@pytest.fixture(scope="session")
def hf_prefill(hf_model):
    """Callable name -> transformers outputs for the first T prompt tokens: hf_layer_outputs plus the KV cache
    as per-layer (keys, values) numpy arrays (1, KV, T, D), i.e. after k_norm and RoPE."""
    done = {}

    def get(name: str) -> dict:
        if name not in done:
            model = hf_model(name)
            ids = prompt_ids(CHECKPOINT_SPECS[name])[:T]
            out = hf_layer_outputs(model, ids)
            with torch.no_grad():
                cache = model(torch.tensor([ids]), use_cache=True).past_key_values
            out["kv"] = [(layer.keys.numpy().copy(), layer.values.numpy().copy()) for layer in cache.layers]
            done[name] = out
        return done[name]

    return get


@pytest.fixture(scope="session")
def hf_greedy(hf_model):
    done = {}

    def get(name: str) -> list[int]:
        if name not in done:
            done[name] = hf_greedy_generate(hf_model(name), prompt_ids(CHECKPOINT_SPECS[name]), GREEDY_NEW_TOKENS)
        return done[name]

    return get


def load_manifest(onnx_dir: Path) -> Manifest:
    return Manifest.model_validate_json((onnx_dir / "manifest.json").read_text())


def assert_close(actual, expected, what: str):
    """max |actual - expected| <= 1e-4 * max(1, max |expected|).

    Both sides compute in float32, in a different order (onnxruntime's fused kernels, numpy's BLAS, torch's
    kernels); those rounding differences are ~1e-7 relative per op and grow to ~1e-6 relative over a few layers
    (measured: ~1e-5 absolute on hidden states of scale ~20). 1e-4 of the tensor's scale leaves an order of
    magnitude of margin, yet any real bug (wrong RoPE half, missing bias or norm, wrong KV head, off-by-one mask)
    changes outputs by O(1) of that scale and fails by far.
    """
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    err = float(np.abs(actual - expected).max())
    bound = 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


class OnnxStages:
    """onnxruntime sessions for the graphs the manifest lists, picked explicitly by mode (prefill/decode)."""

    def __init__(self, onnx_dir: Path):
        import onnxruntime as ort

        self.dir, self.m = onnx_dir, load_manifest(onnx_dir)
        self._ort, self._sessions = ort, {}

    def run(self, mode: str, stage: str, **feeds) -> list[np.ndarray]:
        if (mode, stage) not in self._sessions:
            opts = self._ort.SessionOptions()
            opts.log_severity_level = 3
            self._sessions[mode, stage] = self._ort.InferenceSession(
                str(self.dir / self.m.graphs[mode][stage].file), opts, providers=["CPUExecutionProvider"])
        return self._sessions[mode, stage].run(None, feeds)


def onnx_generate(onnx_dir: Path, prompt: list[int], new_tokens: int, windows: bool = False,
                  used: set | None = None) -> tuple[list[int], np.ndarray]:
    """Greedy generation with the test's own KV cache: prefill graphs over T-token chunks, then decode graphs.
    windows=True: each step's blocks run the graphs of the smallest attention window W >= past_len + q_len
    (graph set "<mode>_c<W>", or "<mode>" when W = C), which take the whole cache and read slots [0, W) only;
    `used` collects the sets.

    Per block the cache is a (Lk,1,KV,C,D) array; a step writes only slots [past_len, past_len + q_len) from
    the first q_len rows of present_key/value (padding rows are never stored). Slots not written yet hold
    noise, not zeros, so the result is right only if the mask really hides them. Returns (new token ids,
    logits of every prompt position (len(prompt), V)).
    """
    st = OnnxStages(onnx_dir)
    m = st.m
    mc, kv_dtype = m.model, np.dtype(m.kv_dtype)
    rng = np.random.default_rng(1)
    noise = lambda b: (3 * rng.standard_normal(  # noqa: E731
        (b.num_layers, 1, mc.num_key_value_heads, m.max_cache_len, mc.head_dim))).astype(kv_dtype)
    cache = [(noise(b), noise(b)) for b in m.blocks]

    def step(mode: str, tokens: list[int], past_len: int) -> np.ndarray:
        steps_T = m.max_input_len if mode == "prefill" else 1
        W = min(w for w in m.cache_windows if w >= past_len + len(tokens)) if windows else m.max_cache_len
        blocks = mode if W == m.max_cache_len else f"{mode}_c{W}"
        if used is not None:
            used.add(blocks)
        ids, mask, positions = step_inputs(tokens, past_len, steps_T, W, m.mask_value)
        (hidden,) = st.run(mode, "embed", input_ids=ids)
        for k, (keys, values) in enumerate(cache):
            hidden, present_k, present_v = st.run(
                blocks, f"block{k}", hidden_states=hidden, attention_mask=mask, position_ids=positions,
                past_key=keys, past_value=values)
            assert present_k.shape[3] == steps_T and present_k.dtype == kv_dtype
            q = len(tokens)
            keys[:, :, :, past_len:past_len + q] = present_k[:, :, :, :q]
            values[:, :, :, past_len:past_len + q] = present_v[:, :, :, :q]
        (logits,) = st.run(mode, "output", hidden_states=hidden)
        return logits[0, :len(tokens)]

    past_len, rows = 0, []
    for chunk in prompt_chunks(prompt, m.max_input_len):
        rows.append(step("prefill", chunk, past_len))
        past_len += len(chunk)
    prompt_logits = np.concatenate(rows)
    new = [int(np.argmax(prompt_logits[-1]))]
    while len(new) < new_tokens:
        logits = step("decode", [new[-1]], past_len)
        past_len += 1
        new.append(int(np.argmax(logits[-1])))
    return new, prompt_logits


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["onnx", "reference"])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_prefill_stages_match_transformers(name, backend, converted, hf_prefill):
    """One T-token prefill step at past_len 0: embed, every block's hidden output and present K/V, and logits."""
    onnx_dir = converted(name)
    m = load_manifest(onnx_dir)
    assert [(b.layer_start, b.layer_end) for b in m.blocks] == EXPECTED_RANGES[name]
    hf = hf_prefill(name)
    ids, mask, positions = step_inputs(prompt_ids(CHECKPOINT_SPECS[name])[:T], 0, T, C, m.mask_value)
    KV, D = m.model.num_key_value_heads, m.model.head_dim

    if backend == "onnx":
        st = OnnxStages(onnx_dir)
        embed = lambda x: st.run("prefill", "embed", input_ids=x)[0]  # noqa: E731
        block = lambda k, h, pk, pv: st.run("prefill", f"block{k}", hidden_states=h, attention_mask=mask,  # noqa: E731
                                            position_ids=positions, past_key=pk, past_value=pv)
        output = lambda h: st.run("prefill", "output", hidden_states=h)[0]  # noqa: E731
    else:
        ref = ReferenceBackend(onnx_dir)
        embed, output = ref.embed, ref.output
        block = lambda k, h, pk, pv: ref.block(k, h, mask, positions, pk, pv)  # noqa: E731

    hidden = embed(ids)
    assert hidden.dtype == np.float32
    assert_close(hidden, hf["embed"], f"{backend} embed")
    for k, b in enumerate(m.blocks):
        past = np.zeros((b.num_layers, 1, KV, C, D), np.float32)
        hidden, present_k, present_v = block(k, hidden, past, past.copy())
        assert_close(hidden, hf["layers"][b.layer_end - 1], f"{backend} block{k} hidden (layer {b.layer_end - 1})")
        for i, layer in enumerate(range(b.layer_start, b.layer_end)):
            hf_k, hf_v = hf["kv"][layer]  # (1, KV, T, D)
            assert_close(present_k[i], hf_k, f"{backend} block{k} present_key of layer {layer}")
            assert_close(present_v[i], hf_v, f"{backend} block{k} present_value of layer {layer}")
    assert_close(output(hidden), hf["logits"], f"{backend} logits")


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_onnx_greedy_with_own_kv_cache_matches_transformers(name, converted, hf_greedy):
    prompt = prompt_ids(CHECKPOINT_SPECS[name])
    assert len(prompt) == PROMPT_LEN > T  # several prefill chunks, the last one padded
    new, _ = onnx_generate(converted(name), prompt, GREEDY_NEW_TOKENS)
    assert new == hf_greedy(name)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_attention_window_graphs_match_transformers(name, converted, hf_greedy):
    """The same generation through the smaller attention windows' block graphs: chunks of 8, 2x8 and 3x8 prompt
    tokens use the 8-, 16- and 32-slot windows, decode steps the 32- and 64-slot ones."""
    prompt, used = prompt_ids(CHECKPOINT_SPECS[name]), set()
    new, logits = onnx_generate(converted(name), prompt, GREEDY_NEW_TOKENS, windows=True, used=used)
    assert used == {"prefill_c8", "prefill_c16", "prefill_c32", "decode_c32", "decode"}
    assert new == hf_greedy(name)
    _, full = onnx_generate(converted(name), prompt, 1)
    assert_close(logits, full, f"{name}: prompt logits through windows vs the full cache")


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_reference_generate_matches_transformers(name, converted, hf_greedy):
    prompt = prompt_ids(CHECKPOINT_SPECS[name])
    assert generate(ReferenceBackend(converted(name)), prompt, GREEDY_NEW_TOKENS) == hf_greedy(name)


def test_graphs_with_window_sized_cache_inputs_still_run(tmp_path, checkpoint_path, hf_greedy, monkeypatch):
    """onnx_dirs converted before block graphs took the whole cache (past_key of W slots, not C) still generate
    the same tokens: the backend passes them the window's slots."""
    import pipeline.convert.onnx_dir as convert_mod
    from pipeline.convert.graphs import GraphShape

    name, real = "qwen3_tied", convert_mod._graph_sets
    monkeypatch.setattr(convert_mod, "_graph_sets", lambda *a: [(graphs, mode, GraphShape(T=shape.T, W=shape.W))
                                                               for graphs, mode, shape in real(*a)])
    old = tmp_path / "old"
    convert(checkpoint_path(name), old, max_input_len=T, max_cache_len=C, log=lambda *a: None, **SPLITS[name])
    past_key = next(i for i in Manifest.model_validate_json((old / "manifest.json").read_text())
                    .graphs[f"decode_c{C // 4}"]["block0"].inputs if i.name == "past_key")
    assert past_key.shape[3] == C // 4  # the old layout
    assert generate(OnnxBackend(old), prompt_ids(CHECKPOINT_SPECS[name]), GREEDY_NEW_TOKENS) == hf_greedy(name)


@pytest.mark.parametrize("backend_class", [ReferenceBackend, OnnxBackend])
def test_backend_refuses_a_window_without_graphs(backend_class, converted):
    backend = backend_class(converted("qwen3_tied"))
    m = backend.manifest
    b, mc = m.blocks[0], m.model
    past = np.zeros((b.num_layers, 1, mc.num_key_value_heads, m.max_cache_len, mc.head_dim), np.float32)
    ids, mask, positions = step_inputs([1], 10, 1, 20, m.mask_value)
    with pytest.raises(StagepipeError, match="a block step attends to 20 cache slots; the graphs have windows of 8, "
                                             "16, 32, 64 slots"):
        backend.block(0, np.zeros((1, 1, mc.hidden_size), np.float32), mask, positions, past, past)


# ---------------------------------------------------------------------------------------------------------------
# fp16 graphs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FP16_NAMES)
def test_fp16_logits_follow_fp32(name, converted):
    prompt = prompt_ids(CHECKPOINT_SPECS[name])
    _, logits32 = onnx_generate(converted(name, "fp32"), prompt, 1)
    _, logits16 = onnx_generate(converted(name, "fp16"), prompt, 1)
    assert logits16.shape == (len(prompt), CHECKPOINT_SPECS[name].vocab) and logits16.dtype == np.float32
    assert np.isfinite(logits16).all()
    cos = (logits16 * logits32).sum(-1) / (np.linalg.norm(logits16, axis=-1) * np.linalg.norm(logits32, axis=-1))
    print(f"{name}: fp16 vs fp32 logits: min cosine {cos.min():.6f}, max diff {np.abs(logits16 - logits32).max():.3g}")
    assert cos.min() >= 0.999, f"per-position cosine of fp16 vs fp32 logits: {np.round(cos, 5).tolist()}"


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("name", FP16_NAMES)
def test_fp16_block_fully_masked_rows_stay_finite(name, mode, converted):
    """Every mask entry = mask_value (a row that attends to nothing): softmax must not turn into NaN."""
    onnx_dir = converted(name, "fp16")
    st = OnnxStages(onnx_dir)
    m = st.m
    steps_T = T if mode == "prefill" else 1
    ids, _, positions = step_inputs(prompt_ids(CHECKPOINT_SPECS[name])[:steps_T], 0, steps_T, C, m.mask_value)
    mask = np.full((1, 1, steps_T, C + steps_T), m.mask_value, np.float32)
    (hidden,) = st.run(mode, "embed", input_ids=ids)
    assert hidden.dtype == np.float16
    rng = np.random.default_rng(0)
    for k, b in enumerate(m.blocks):
        shape = (b.num_layers, 1, m.model.num_key_value_heads, C, m.model.head_dim)
        past_k, past_v = (rng.standard_normal(shape).astype(np.float16) for _ in range(2))
        outs = st.run(mode, f"block{k}", hidden_states=hidden, attention_mask=mask, position_ids=positions,
                      past_key=past_k, past_value=past_v)
        for out_name, value in zip(("hidden_states_out", "present_key", "present_value"), outs):
            assert value.dtype == np.float16 and np.isfinite(value).all(), f"block{k} {out_name} has NaN/inf"
        hidden = outs[0]
    assert np.isfinite(st.run(mode, "output", hidden_states=hidden)[0]).all()


# ---------------------------------------------------------------------------------------------------------------
# What lands on disk
# ---------------------------------------------------------------------------------------------------------------

def expected_io(spec, precision: str, mode: str, block_layers: list[int], window: int = C) -> dict[str, tuple[list, list]]:
    """stage -> ([(name, shape, dtype) inputs], [... outputs]), written down from the spec, not from the code.
    window: the cache slots a block graph attends over (C, or a smaller attention window); every block graph
    takes the whole C-slot cache, its mask is as wide as the window."""
    steps_T, W = (T if mode == "prefill" else 1), window
    H, V, KV, D = spec.hidden, spec.vocab, spec.kv_heads, spec.resolved_head_dim
    act = "float16" if precision == "fp16" else "float32"
    kv = "float16" if precision == "fp16" else "float32"
    io = {"embed": ([("input_ids", [1, steps_T], "int64")], [("hidden_states", [1, steps_T, H], act)]),
          "output": ([("hidden_states", [1, steps_T, H], act)], [("logits", [1, steps_T, V], "float32")])}
    for k, Lk in enumerate(block_layers):
        io[f"block{k}"] = (
            [("hidden_states", [1, steps_T, H], act), ("attention_mask", [1, 1, steps_T, W + steps_T], "float32"),
             ("position_ids", [1, steps_T], "int64"), ("past_key", [Lk, 1, KV, C, D], kv),
             ("past_value", [Lk, 1, KV, C, D], kv)],
            [("hidden_states_out", [1, steps_T, H], act), ("present_key", [Lk, 1, KV, steps_T, D], kv),
             ("present_value", [Lk, 1, KV, steps_T, D], kv)])
    return io


def _proto_io(values) -> list[tuple[str, list[int], str]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out.append((v.name, dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name))
    return out


@pytest.mark.parametrize("name,precision", CONVERSIONS)
def test_manifest_and_files(name, precision, converted, checkpoint_path):
    spec = CHECKPOINT_SPECS[name]
    onnx_dir = converted(name, precision)
    m = load_manifest(onnx_dir)  # validates against the schema (extra fields forbidden)
    assert m.precision == precision and m.kv_dtype == ("float32" if precision == "fp32" else "float16")
    assert (m.max_input_len, m.max_cache_len) == (T, C)
    assert m.opset <= 18
    mc = m.model
    assert mc.head_dim == spec.resolved_head_dim  # from config.json's head_dim, not hidden/heads
    if name == "qwen3_untied_gqa1":
        assert mc.head_dim == 32 != mc.hidden_size // mc.num_attention_heads
    assert (mc.num_layers, mc.num_attention_heads, mc.num_key_value_heads, mc.vocab_size, mc.hidden_size) == (
        spec.layers, spec.heads, spec.kv_heads, spec.vocab, spec.hidden)
    assert mc.tie_word_embeddings == spec.tied
    assert (mc.qkv_bias, mc.qk_norm) == ((True, False) if spec.arch == "qwen2" else (False, True))
    assert [(b.index, b.layer_start, b.layer_end) for b in m.blocks] == [
        (i, s, e) for i, (s, e) in enumerate(EXPECTED_RANGES[name])]

    for fname in ("config.json", "generation_config.json"):
        assert (onnx_dir / fname).read_bytes() == (checkpoint_path(name) / fname).read_bytes()

    stages = m.stage_names()
    # default attention windows C/8, C/4, C/2 (each >= T) besides C itself: block graphs only
    assert m.cache_windows == m.windows() == [C // 8, C // 4, C // 2, C] and C // 8 >= T
    sets = {(mode, C): (mode, stages) for mode in ("prefill", "decode")}
    sets |= {(mode, w): (f"{mode}_c{w}", [s for s in stages if s.startswith("block")])
             for mode in ("prefill", "decode") for w in (C // 8, C // 4, C // 2)}
    assert set(m.graphs) == {set_name for set_name, _ in sets.values()}
    for (mode, window), (set_name, set_stages) in sets.items():
        assert list(m.graphs[set_name]) == set_stages
        want = expected_io(spec, precision, mode, [b.num_layers for b in m.blocks], window)
        for stage in set_stages:
            g = m.graphs[set_name][stage]
            assert g.file == (f"{mode}/{stage}.onnx" if window == C else f"{mode}/{stage}_c{window}.onnx")
            listed = ([(t.name, t.shape, t.dtype) for t in g.inputs], [(t.name, t.shape, t.dtype) for t in g.outputs])
            assert listed == want[stage], f"manifest {set_name}/{stage}"
            proto = onnx.load(str(onnx_dir / g.file), load_external_data=False)
            assert (_proto_io(proto.graph.input), _proto_io(proto.graph.output)) == want[stage], f"{g.file}"
            for wf in g.weights_files:
                assert (onnx_dir / wf).is_file(), wf

    # Prefill and decode of a stage share one weights file (hard link or same path), and the graphs hold no weights.
    for stage in stages:
        pre, dec = m.graphs["prefill"][stage], m.graphs["decode"][stage]
        assert len(pre.weights_files) >= 1 and len(dec.weights_files) == len(pre.weights_files)
        for p, d in zip(pre.weights_files, dec.weights_files):
            assert p == d or os.stat(onnx_dir / p).st_ino == os.stat(onnx_dir / d).st_ino, (p, d)
    for path in onnx_dir.rglob("*.onnx"):
        assert path.stat().st_size < 300_000, f"{path} is {path.stat().st_size} bytes: weights not external?"
    # Every checkpoint weight is written once (the tied head reads the embedding table from embed.data):
    # the data files hold at most each tensor as float32 plus page-alignment padding.
    w = CheckpointWeights(checkpoint_path(name))
    most = sum(4 * int(np.prod(w.shape(n))) + 4096 for n in w.names())
    assert sum(p.stat().st_size for p in (onnx_dir / "prefill").glob("*.data")) <= most, "weights duplicated"
    assert not [p.name for p in onnx_dir.parent.iterdir() if "converting" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("name,precision", CONVERSIONS)
def test_graphs_are_static_standard_onnx(name, precision, converted, monkeypatch, tmp_path):
    onnx_dir = converted(name, precision)
    m = load_manifest(onnx_dir)
    plain_copy = {mode: shutil.copytree(onnx_dir / mode, tmp_path / mode) for mode in ("prefill", "decode")}
    for graph_set in m.graphs.values():  # the full-cache graphs and every attention window's
        for stage, g in graph_set.items():
            mode = g.file.split("/")[0]
            proto = onnx.load(str(onnx_dir / g.file), load_external_data=False)
            assert [(o.domain, o.version) for o in proto.opset_import] == [("", m.opset)] and m.opset <= 18
            assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, f"{g.file}: custom-domain ops"
            for v in list(proto.graph.input) + list(proto.graph.output):
                dims = v.type.tensor_type.shape.dim
                assert dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims), \
                    f"{g.file}: {v.name} has a dynamic dim"
            # The checker also validates external data files: against the working directory for a proto (the
            # model's folder for a path). It runs in a plain copy of the mode folder because onnx >= 1.21
            # rejects external data files with several hard links, and prefill/decode share theirs that way
            # (onnxruntime accepts them; the session tests above load every graph).
            monkeypatch.chdir(plain_copy[mode])
            onnx.checker.check_model(proto)
            onnx.checker.check_model(g.file.split("/")[1], full_check=True)
            # Shape inference agrees with the declared static output shapes (strict: any conflict raises).
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
            for v in inferred.graph.output:
                assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), f"{g.file}: {v.name}"
            big = [t.name for t in proto.graph.initializer
                   if t.data_location != onnx.TensorProto.EXTERNAL and np.prod(t.dims) > 1024]
            assert not big, f"{g.file}: inline weights {big}"
            externals = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
            assert {f"{mode}/{f}" for f in externals} == set(g.weights_files)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs through the CLI, and the output folder's lifecycle
# ---------------------------------------------------------------------------------------------------------------

def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.convert", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _edit_config(ckpt: Path, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))


def _rewrite_weights(ckpt: Path, edit):
    path = ckpt / "model.safetensors"
    w = CheckpointWeights(ckpt)
    tensors = {n: np.array(w.raw(n)) for n in w.names()}  # copies: the file is replaced below
    del w
    edit(tensors)
    save_safetensors(path, tensors)


def _truncate(ckpt: Path, keep: float):
    path = ckpt / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


BAD_INPUTS = {
    # case: (edit the checkpoint copy, extra CLI args, words the error line must contain)
    "other_architecture": (lambda c: _edit_config(c, architectures=["LlamaForCausalLM"]), [],
                           ["LlamaForCausalLM", "not supported"]),
    "rope_scaling_yarn": (lambda c: _edit_config(c, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                  "original_max_position_embeddings": 64}), [],
                          ["yarn"]),
    "sliding_window": (lambda c: _edit_config(c, use_sliding_window=True, sliding_window=16), [],
                       ["use_sliding_window"]),
    "missing_tensor": (lambda c: _rewrite_weights(c, lambda t: t.pop("model.layers.2.mlp.up_proj.weight")), [],
                       ["model.layers.2.mlp.up_proj.weight", "missing"]),
    "wrong_shape": (lambda c: _rewrite_weights(c, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight":
                                                                      np.zeros((64, 64), np.float32)})), [],
                    ["model.layers.1.self_attn.k_proj.weight", "shape"]),
    "layer_split_sum": (lambda c: None, ["--layer_split", "1,2"], ["--layer_split", "4 layers"]),
    "too_many_blocks": (lambda c: None, ["--blocks", "5"], ["--blocks 5", "4 layers"]),
    "missing_config": (lambda c: (c / "config.json").unlink(), [], ["config.json", "not found"]),
    "truncated_safetensors": (lambda c: _truncate(c, 0.5), [], ["model.safetensors", "truncated"]),
    "truncated_header": (lambda c: _truncate(c, 0.001), [], ["model.safetensors", "not a safetensors file"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_no_output(case, tmp_path, checkpoint_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_path("qwen3_tied"), ckpt)
    edit, extra, words = BAD_INPUTS[case]
    edit(ckpt)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    proc = run_cli("--model_path", ckpt, "--onnx_dir", out_parent / "onnx", *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not named in: {lines[0]}"
    assert list(out_parent.iterdir()) == []  # neither the onnx_dir nor a .onnx.converting-* temp


def test_refuses_existing_foreign_folder(tmp_path, checkpoint_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"not an onnx_dir")
    proc = run_cli("--model_path", checkpoint_path("qwen3_tied"), "--onnx_dir", target, "--blocks", 2)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a stagepipe onnx_dir" in lines[0]
    assert sorted(p.name for p in target.iterdir()) == ["holiday.jpg"]
    assert (target / "holiday.jpg").read_bytes() == b"not an onnx_dir"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_reconvert_replaces_onnx_dir_atomically(tmp_path, checkpoint_path, monkeypatch):
    import pipeline.convert.onnx_dir as convert_mod

    ckpt = checkpoint_path("qwen3_tied")
    onnx_dir = tmp_path / "onnx"
    proc = run_cli("--model_path", ckpt, "--onnx_dir", onnx_dir, "--blocks", 2, "--max_input_len", T,
                   "--max_cache_len", C)
    assert proc.returncode == 0, proc.stderr
    old_manifest = (onnx_dir / "manifest.json").read_text()
    assert len(load_manifest(onnx_dir).blocks) == 2
    (onnx_dir / "stale.txt").write_text("left from the old conversion")

    # While the new folder is being written, the old one stays whole and in place.
    seen = []

    def log(msg):
        if msg.startswith("converted "):  # the last line, logged after the swap
            return
        assert (onnx_dir / "manifest.json").read_text() == old_manifest
        assert (onnx_dir / "prefill" / "block1.onnx").exists()
        seen.append([p.name for p in tmp_path.iterdir() if "converting" in p.name])

    convert(ckpt, onnx_dir, blocks=1, max_input_len=T, max_cache_len=C, log=log)
    assert seen and all(len(s) == 1 for s in seen), seen  # built in a hidden sibling...
    m = load_manifest(onnx_dir)  # ...then swapped in whole
    assert [(b.layer_start, b.layer_end) for b in m.blocks] == [(0, 4)]
    assert not (onnx_dir / "stale.txt").exists() and not (onnx_dir / "prefill" / "block1.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no temp or old copy left

    # A conversion that fails half way leaves the previous onnx_dir untouched, and no temp behind.
    before = (onnx_dir / "manifest.json").read_text()

    def broken_output(*a, **k):
        raise StagepipeError("simulated failure while building the output graph")

    monkeypatch.setattr(convert_mod, "build_output", broken_output)
    with pytest.raises(StagepipeError, match="simulated"):
        convert(ckpt, onnx_dir, blocks=2, max_input_len=T, max_cache_len=C, log=lambda *a: None)
    assert (onnx_dir / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_staleness_names_why_graphs_must_be_rebuilt(tmp_path, qwen3_tied):
    """Auto-conversion (run_auto --model_path, bench) redoes an onnx_dir for each of these reasons, and only then."""
    from pipeline.convert.graphs import GRAPH_FORMAT
    from pipeline.convert.staleness import staleness

    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen3_tied, ckpt)
    onnx_dir = tmp_path / "onnx"
    convert(ckpt, onnx_dir, max_input_len=T, max_cache_len=C, log=lambda *a: None)
    wanted = {"max_input_len": T, "max_cache_len": C, "precision": "fp32"}
    assert staleness(onnx_dir, ckpt, wanted) is None
    assert "max_cache_len is 64, 128 requested" == staleness(onnx_dir, ckpt, wanted | {"max_cache_len": 128})

    os.utime(ckpt / "model.safetensors")  # touched, same bytes: still current (the fingerprint decides)
    assert staleness(onnx_dir, ckpt, wanted) is None

    manifest_path = onnx_dir / "manifest.json"
    current = manifest_path.read_text()
    old = json.loads(current) | {"graph_format": GRAPH_FORMAT - 1}
    manifest_path.write_text(json.dumps(old))
    assert "older stagepipe" in staleness(onnx_dir, ckpt, wanted)
    del old["graph_format"]  # written before the field existed
    manifest_path.write_text(json.dumps(old))
    assert f"graph format 0, now {GRAPH_FORMAT}" in staleness(onnx_dir, ckpt, wanted)
    manifest_path.write_text(current)

    weights = CheckpointWeights(ckpt)
    tensors = {n: weights.get(n) for n in weights.names()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_safetensors(ckpt / "model.safetensors", tensors)
    assert staleness(onnx_dir, ckpt, wanted) == "checkpoint content changed"


def test_copy_weights_loads_with_onnx_package(qwen3_tied, tmp_path):
    """--copy_weights: plain files, so onnx.load with weights works (onnx >= 1.21 refuses hard-linked data)."""
    import onnx
    from pipeline.convert.onnx_dir import convert

    out = tmp_path / "onnx"
    convert(qwen3_tied, out, blocks=2, max_input_len=8, max_cache_len=16, copy_weights=True, log=lambda *a: None)
    assert os.stat(out / "prefill" / "block0.data").st_ino != os.stat(out / "decode" / "block0.data").st_ino
    model = onnx.load(str(out / "decode" / "block0.onnx"))  # loads the external weights too
    assert any(t.raw_data for t in model.graph.initializer)
