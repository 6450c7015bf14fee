"""Qwen2.5-VL through the stage pipeline, checked against transformers on a tiny random checkpoint
(tests/vl_oracle.py): config parsing, pixel preprocessing, the vision stages, M-RoPE positions, generation."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.checkpoint.model_config import load_model_config
from pipeline.checkpoint.vision_layout import VisionLayout, check_image_size
from pipeline.checkpoint.vl_config import load_vision_config
from pipeline.core.errors import StagepipeError
from pipeline.runtime.image_preprocess import image_patches
from tests.vl_oracle import IMAGE_SIZE, hf_pixel_values, make_test_image, make_vl_checkpoint, rewrite_config_v4

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return make_vl_checkpoint(tmp_path_factory.mktemp("vl") / "ckpt")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_test_image(tmp_path_factory.mktemp("img") / "picture.png")


def test_config_layouts_of_transformers_4_and_5_parse_alike(vl_dir, tmp_path):
    old = tmp_path / "v4"
    shutil.copytree(vl_dir, old)
    rewrite_config_v4(old)
    assert "text_config" not in json.loads((old / "config.json").read_text())
    text, vision = load_model_config(vl_dir), load_vision_config(vl_dir)
    assert load_model_config(old) == text and load_vision_config(old) == vision
    assert text.mrope_section == [2, 3, 3] and text.qkv_bias and not text.qk_norm and not text.tie_word_embeddings
    assert (vision.depth, vision.fullatt_block_indexes, vision.out_hidden_size) == (4, [1, 3], text.hidden_size)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    assert load_vision_config(tmp_path) is None


def test_nested_tensor_names_read_as_usual(vl_dir, tmp_path):
    """Checkpoints saved with model.language_model.* / model.visual.* names read like the hub's layout."""
    from pipeline.checkpoint.safetensors_io import CheckpointWeights, save_safetensors

    nested = tmp_path / "nested"
    nested.mkdir()
    weights = CheckpointWeights(vl_dir)
    renamed = {("model.language_model." + n[6:] if n.startswith("model.") else "model." + n if
                n.startswith("visual.") else n): weights.get(n) for n in weights.names()}
    save_safetensors(nested / "model.safetensors", renamed)
    again = CheckpointWeights(nested)
    for name in ("model.layers.1.mlp.up_proj.weight", "visual.blocks.2.attn.qkv.bias", "lm_head.weight"):
        assert np.array_equal(again.get(name), weights.get(name))


def test_config_errors_are_one_line(vl_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(vl_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 4]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StagepipeError, match="mrope_section"):
        load_model_config(bad)
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 3]
    cfg["vision_config"]["out_hidden_size"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StagepipeError, match="out_hidden_size 32"):
        load_vision_config(bad)
    with pytest.raises(StagepipeError, match="multiple of"):
        check_image_size(load_vision_config(vl_dir), 150)


@pytest.mark.parametrize("mode,size", [("RGB", (150, 131)), ("RGBA", (127, 152))])
def test_pixel_patches_equal_the_hf_processor(vl_dir, tmp_path, mode, size):
    """Pillow resize, rescale, normalize and patchify give transformers' pixel_values bit for bit."""
    path = make_test_image(tmp_path / f"p.{'png'}", size=size, mode=mode, seed=len(mode))
    config = load_vision_config(vl_dir)
    expected, grid = hf_pixel_values(path)
    layout = VisionLayout(config, IMAGE_SIZE)
    assert grid.tolist() == [list(layout.grid)]
    ours = image_patches(path, config, IMAGE_SIZE)
    assert ours.dtype == np.float32 and np.array_equal(ours, expected)


def test_unreadable_image_is_one_error(vl_dir, tmp_path):
    bad = tmp_path / "not.png"
    bad.write_bytes(b"no picture here")
    with pytest.raises(StagepipeError, match="not an image"):
        image_patches(bad, load_vision_config(vl_dir), IMAGE_SIZE)
    with pytest.raises(StagepipeError, match="not found"):
        image_patches(tmp_path / "missing.png", load_vision_config(vl_dir), IMAGE_SIZE)


# -- the vision stages ---------------------------------------------------------------------------------------------
def _convert(model_dir, out, **settings):
    from pipeline.convert.onnx_dir import convert

    base = dict(blocks=2, max_input_len=8, max_cache_len=96, image_size=IMAGE_SIZE, vision_blocks=2)
    return convert(model_dir, out, log=lambda *a: None, **{**base, **settings})


@pytest.fixture(scope="module")
def vl_onnx(vl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vl_onnx") / "onnx"
    _convert(vl_dir, out)
    return out


@pytest.fixture(scope="module")
def vl_model(vl_dir):
    from tests.vl_oracle import load_vl_model

    return load_vl_model(vl_dir)


@pytest.fixture(scope="module")
def hf_vision(vl_model, image):
    from tests.vl_oracle import hf_vision_outputs

    pixels, grid = hf_pixel_values(image)
    return pixels, grid, hf_vision_outputs(vl_model, pixels, grid)


def _close(ours, ref, what, scale_tol=1e-4):
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours.astype(np.float64) - ref).max())
    assert err <= scale_tol * scale, f"{what}: max abs error {err:.3g} > {scale_tol} x scale {scale:.3g}"


def test_window_layout_and_rotary_equal_transformers(vl_dir, vl_model, hf_vision):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    _, grid, _ = hf_vision
    layout = VisionLayout(load_vision_config(vl_dir), IMAGE_SIZE)
    c = layout.config
    window_index, cu = get_vision_window_index(torch.as_tensor(grid), c.spatial_merge_size, c.window_size,
                                               c.patch_size)
    assert np.array_equal(layout.unit_order, window_index.numpy())
    assert np.cumsum([0] + layout.window_patches).tolist() == cu.tolist()
    assert len(set(layout.window_patches)) > 1, "the test size must give uneven edge windows"
    positions = get_vision_position_ids(torch.as_tensor(grid), c.spatial_merge_size)
    assert np.array_equal(layout.patch_positions(), positions.numpy())
    rotary = vl_model.model.visual.rotary_pos_emb
    cos, sin = (t.numpy()[layout.patch_order] for t in rotary(torch.zeros(1), positions))
    ours = layout.rotary_cos_sin()
    np.testing.assert_allclose(ours[0], cos, atol=1e-6)
    np.testing.assert_allclose(ours[1], sin, atol=1e-6)


@pytest.mark.parametrize("backend", ["onnx", "reference"])
def test_vision_stages_equal_transformers(vl_onnx, hf_vision, backend):
    """Each vision stage's output equals the visual model's (patch embeddings and layer outputs in window order,
    the merger's image embeddings in the processor's order) within fp32 tolerance."""
    from pipeline.runtime.backends import make_backend

    pixels, _, hf = hf_vision
    b = make_backend(backend, vl_onnx)
    spec = b.manifest.vision
    assert (spec.grid, spec.num_patches, spec.image_tokens) == ([1, 10, 10], 100, 25)
    order = VisionLayout(spec.config, spec.image_size).patch_order
    x = b.vision("vision_patch", pixels)
    _close(x, hf["patch"][order], "vision_patch")
    for k, block in enumerate(spec.blocks):
        x = b.vision(f"vision_block{k}", x)
        _close(x, hf["layers"][block.layer_end - 1], f"vision_block{k}")
    embeds = b.vision("vision_merger", x)
    assert embeds.shape == (25, 64)
    _close(embeds, hf["image_embeds"], "vision_merger")


def _float32_inputs(model, op_types) -> dict[str, list[str]]:
    """op type -> element types of its first inputs across the graph (after shape inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    found = {}
    for node in model.graph.node:
        if node.op_type in op_types:
            found.setdefault(node.op_type, []).append(onnx.TensorProto.DataType.Name(types[node.input[0]]))
    return found


def test_fp16_vision_keeps_activations_in_float32(vl_dir, vl_onnx, hf_vision, tmp_path):
    """fp16 vision graphs: matmuls in float16; SiLU (Sigmoid), norms, softmax and GELU (Erf) in float32; each
    stage's output within cosine 0.999 of the fp32 graphs'."""
    import onnx

    from pipeline.runtime.backends import make_backend

    out = tmp_path / "fp16"
    manifest = _convert(vl_dir, out, precision="fp16")
    assert manifest.vision.precision == "fp16"
    kinds = {}
    for stage, spec in manifest.vision.graphs.items():
        model = onnx.load(str(out / spec.file), load_external_data=False)
        for op, types in _float32_inputs(model, {"Sigmoid", "Softmax", "ReduceMean", "Erf", "Gemm"}).items():
            kinds.setdefault(op, set()).update(types)
    assert kinds.pop("Gemm") == {"FLOAT16"}
    assert kinds == {op: {"FLOAT"} for op in ("Sigmoid", "Softmax", "ReduceMean", "Erf")}
    pixels, _, _ = hf_vision
    # onnxruntime's CPU provider runs float16 Gemms in float32 (weights rounded only); the reference evaluator with
    # a float16-in/float16-out Gemm gives what fp16 hardware computes
    from benchmarks.vl_bench import cosine, fp16_device_run

    fp16, fp32 = make_backend("onnx", out), make_backend("onnx", vl_onnx)
    device = fp16_device_run(out, pixels)
    x16, x32 = pixels, pixels
    for stage in ["vision_patch", "vision_block0", "vision_block1", "vision_merger"]:
        x16, x32 = fp16.vision(stage, x16), fp32.vision(stage, x32)
        for name, value in (("onnxruntime", x16), ("fp16 arithmetic", device[stage])):
            assert cosine(value, x32) >= 0.999, f"{stage}, {name}: cosine {cosine(value, x32)}"


def test_vision_graphs_are_standard_and_static(vl_onnx):
    from pipeline.tools.ops import ops_report

    report = ops_report(vl_onnx, strict=True)
    vision = [g for g in report["graphs"] if g["graph"].startswith("vision/")]
    assert [g["graph"] for g in vision] == ["vision/vision_patch", "vision/vision_block0", "vision/vision_block1",
                                          "vision/vision_merger"]
    assert report["ok"] and report["flagged"]["dynamic_dims"] == 0 and not report["flagged"]["nonstandard_domains"]
    assert all(g["initializers"]["external_bytes"] > 0 for g in vision)
    blocks = [g for g in report["graphs"] if g["graph"].startswith("prefill/block")]
    assert blocks and all(i["shape"] == [3, 1, 8] for g in blocks for i in g["inputs"] if i["name"] == "position_ids")


# -- the language side: M-RoPE, image rows, generation -------------------------------------------------------------
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def image_prompt(vl_onnx):
    """The chat prompt's ids with the image's tokens, as transformers' processor makes them."""
    from pipeline.core.jsonfile import load_manifest
    from pipeline.runtime.image_prompt import DEFAULT_IMAGE_CHAT, with_image_tokens
    from pipeline.runtime.tokenizer import Tokenizer

    vision = load_manifest(vl_onnx).vision
    tokenizer = Tokenizer.load(vl_onnx)
    text = DEFAULT_IMAGE_CHAT.format(prompt="What is in this picture?")
    ids = with_image_tokens(tokenizer.encode(text), vision)
    # the processor repeats <|image_pad|> once per image token (Qwen2_5_VLProcessor.replace_image_token)
    assert ids == tokenizer.encode(text.replace("<|image_pad|>", "<|image_pad|>" * vision.image_tokens))
    assert with_image_tokens(ids, vision) == ids
    bare = with_image_tokens(tokenizer.encode("Hi"), vision)
    assert bare[0] == vision.config.vision_start_token_id and bare[vision.image_tokens + 1] == \
        vision.config.vision_end_token_id
    return ids


def _image_embeds(backend, image):
    from pipeline.core.jsonfile import load_manifest

    vision = load_manifest(backend.onnx_dir).vision
    x = image_patches(image, vision.config, vision.image_size)
    for stage in ["vision_patch"] + [f"vision_block{b.index}" for b in vision.blocks] + ["vision_merger"]:
        x = backend.vision(stage, x)
    return x


def test_position_ids_equal_get_rope_index(vl_onnx, vl_model, hf_vision, image_prompt):
    from pipeline.core.jsonfile import load_manifest
    from pipeline.runtime.mrope import MropeStep, rope_index
    from tests.vl_oracle import hf_rope_index

    _, grid, _ = hf_vision
    image_id = 151655
    first = image_prompt.index(image_id)
    for ids in (image_prompt, image_prompt[first:] + [11, 12, 13], [7] + image_prompt[first:first + 25]):
        expected, delta = hf_rope_index(vl_model, ids, grid, image_id)
        ours, our_delta = rope_index(ids, image_id, grid[0].tolist(), 2)
        assert np.array_equal(ours, expected[:, 0]) and our_delta == delta
    # a step's (3,1,T) rows: the prompt's positions, then slot + delta past the prompt (padding rows)
    step = MropeStep.for_prompt(image_prompt, load_manifest(vl_onnx).vision, np.zeros((25, 64), np.float32))
    expected, delta = hf_rope_index(vl_model, image_prompt, grid, image_id)
    L = len(image_prompt)
    got = step.positions(L - 3, 8)[:, 0]
    assert np.array_equal(got[:, :3], expected[:, 0, L - 3:])
    assert (got[:, 3:] == np.arange(L, L + 5) + delta).all()


@pytest.mark.parametrize("backend", ["onnx", "reference"])
def test_image_prompt_generates_what_transformers_generates(vl_onnx, vl_model, hf_vision, image, image_prompt,
                                                            backend):
    """Greedy tokens for an image + text prompt (prefilled in chunks of T=8, the image's 25 tokens among them)
    equal transformers' generate with pixel_values."""
    from pipeline.runtime.backends import make_backend
    from pipeline.runtime.generate import generate
    from pipeline.runtime.mrope import MropeStep
    from tests.vl_oracle import hf_generate

    pixels, grid, _ = hf_vision
    b = make_backend(backend, vl_onnx)
    embeds = _image_embeds(b, image)
    ours = generate(b, image_prompt, NEW_TOKENS, mrope=MropeStep.for_prompt(image_prompt, b.manifest.vision, embeds))
    expected, margins = hf_generate(vl_model, image_prompt, pixels, grid, 151655, NEW_TOKENS)
    assert min(margins) > 1e-2 and len(set(expected)) >= 6, (margins, expected)
    assert ours == expected


@pytest.fixture(scope="module")
def text_twin_onnx(vl_dir, tmp_path_factory):
    """A Qwen2 text model with the VL checkpoint's language weights, converted."""
    from pipeline.checkpoint.safetensors_io import CheckpointWeights, save_safetensors
    from tests.vl_oracle import TEXT

    text_dir = tmp_path_factory.mktemp("text_twin") / "ckpt"
    text_dir.mkdir()
    weights = CheckpointWeights(vl_dir)
    save_safetensors(text_dir / "model.safetensors",
                     {n: weights.get(n) for n in weights.names() if not n.startswith("visual.")})
    config = {k: v for k, v in TEXT.items() if k != "rope_parameters"}
    config.update(architectures=["Qwen2ForCausalLM"], rope_theta=1e6, tie_word_embeddings=False,
                  torch_dtype="float32", use_sliding_window=False)
    (text_dir / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(vl_dir / name, text_dir / name)
    _convert(text_dir, text_dir.parent / "onnx")
    return text_dir.parent / "onnx"


def test_text_steps_of_a_vl_model_equal_a_text_model(vl_onnx, text_twin_onnx, vl_model):
    """Three equal position rows are plain RoPE: the VL graphs give a text prompt the tokens (and logits) of a
    Qwen2 text model with the same language weights, and transformers' tokens."""
    from pipeline.runtime.backends import make_backend
    from pipeline.runtime.generate import MemoryKVCache, forward_step, generate
    from pipeline.runtime.mrope import MropeStep
    from pipeline.runtime.tokenizer import Tokenizer
    from tests.vl_oracle import hf_generate

    vl, text = make_backend("onnx", vl_onnx), make_backend("onnx", text_twin_onnx)
    prompt = Tokenizer.load(vl_onnx).encode("Tell me a story about a dragon and a lighthouse keeper.")
    assert len(prompt) > 8
    expected, margins = hf_generate(vl_model, prompt, None, None, 151655, 12)
    assert min(margins) > 1e-2 and len(set(expected)) >= 6
    assert generate(vl, prompt, 12) == generate(text, prompt, 12) == expected
    a, b = MemoryKVCache(vl.manifest), MemoryKVCache(text.manifest)
    np.testing.assert_allclose(forward_step(vl, a, prompt[:8], 0, all_rows=True, mrope=MropeStep()),
                               forward_step(text, b, prompt[:8], 0, all_rows=True), atol=1e-5, rtol=0)


# -- the image step and run_auto -----------------------------------------------------------------------------------
def test_run_auto_with_image_generates_what_transformers_generates(vl_onnx, vl_model, hf_vision, image, image_prompt,
                                                                   tmp_path):
    """doit run_auto --image --chat: the image step, a 52-token prompt prefilled in 7 chunks of 8 (the image's 25
    tokens across 4 of them), 16 greedy tokens equal to transformers' generate; a rerun redoes nothing."""
    from tests.run_helpers import run_doit, summary
    from tests.vl_oracle import hf_generate

    root = tmp_path / "run"
    args = ["--onnx_dir", vl_onnx, "--run_root", root, "--image", image, "--prompt", "What is in this picture?",
            "--chat", "--steps", NEW_TOKENS, "--ignore_eos"]
    run_doit(*args)
    s = summary(root)
    assert s["prompt_token_ids"] == image_prompt
    pixels, grid, _ = hf_vision
    expected, _ = hf_generate(vl_model, image_prompt, pixels, grid, 151655, NEW_TOKENS)
    assert s["generated_token_ids"] == expected
    vision = root / "vision"
    assert sorted(p.name for p in vision.iterdir()) == ["image_embeds.npy", "meta.json", "pixel_patches.npy",
                                                          "vision_hidden0.npy", "vision_hidden1.npy",
                                                          "vision_hidden2.npy"]
    assert np.array_equal(np.load(vision / "pixel_patches.npy"), pixels)
    meta = json.loads((root / "step_0006" / "meta.json").read_text())
    assert meta["position_delta"] == -20 and np.load(root / "step_0006" / "position_ids.npy").shape == (3, 1, 8)
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("*/*.npy")}
    run_doit(*args)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "a rerun recomputed finished work"


def test_stages_by_hand_with_an_image_equal_run_auto(vl_dir, image, tmp_path):
    """stages.vision, then token_embed --image_embeds for each prompt chunk (the image split across two of
    them), blocks and output, then decode steps: byte-identical to run_auto's files."""
    from stages import block, output, token_embed, vision
    from tests.run_helpers import run_doit, run_stage, step_files

    onnx_dir = tmp_path / "onnx16"
    _convert(vl_dir, onnx_dir, max_input_len=16)
    auto = tmp_path / "auto"
    run_doit("--onnx_dir", onnx_dir, "--run_root", auto, "--image", image, "--prompt", "Describe it.",
             "--steps", 3, "--ignore_eos")
    hand = tmp_path / "hand"
    run_stage("vision", "--step_dir", hand / "vision", "--onnx_dir", onnx_dir, "--image", image)
    embeds, kv = hand / "vision" / "image_embeds.npy", hand / "kv_cache"
    prompt_len = len(json.loads((auto / "run.json").read_text())["prompt_token_ids"])
    assert prompt_len > 16
    for s in range(4):
        step = hand / f"step_{s:04d}"
        common = ["--step_dir", str(step), "--onnx_dir", str(onnx_dir)]
        if s < 2:
            token_embed.main(common + ["--past_len", str(s * 16), "--prompt", "Describe it.", "--image_embeds",
                                       str(embeds)])
        else:
            token_embed.main(common + ["--past_len", str(prompt_len + s - 2), "--prev_step",
                                       str(hand / f"step_{s - 1:04d}")])
        for k in range(2):
            block.main(common + ["--block", str(k), "--kv_dir", str(kv)])
        output.main(common)
    ours, theirs = step_files(hand), step_files(auto)
    assert len(ours) == len(theirs) and all(data == theirs[name] for name, data in ours.items())
    for name in ("pixel_patches.npy", "vision_hidden1.npy", "image_embeds.npy"):
        assert (hand / "vision" / name).read_bytes() == (auto / "vision" / name).read_bytes()
    # replay one vision stage on its input file: the same bytes again
    embeds.unlink()
    vision.main(["--step_dir", str(hand / "vision"), "--onnx_dir", str(onnx_dir), "--stage", "vision_merger"])
    assert embeds.read_bytes() == (auto / "vision" / "image_embeds.npy").read_bytes()


def test_vl_input_errors_are_one_line(vl_onnx, text_twin_onnx, image, tmp_path, capsys):
    from pipeline.run.main import run_auto
    from pipeline.run.options import RunOptions
    from stages import token_embed, vision

    for main, argv in ((vision.main, ["--step_dir", tmp_path / "v", "--onnx_dir", text_twin_onnx, "--image", image]),
                       (vision.main, ["--step_dir", tmp_path / "v", "--onnx_dir", vl_onnx, "--image",
                                      tmp_path / "missing.png"]),
                       (token_embed.main, ["--step_dir", tmp_path / "s", "--onnx_dir", vl_onnx, "--past_len", 0,
                                           "--prompt", "<|image_pad|> what?"]),
                       (token_embed.main, ["--step_dir", tmp_path / "s", "--onnx_dir", text_twin_onnx, "--past_len",
                                           0, "--prompt", "what?", "--image_embeds", tmp_path / "e.npy"])):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert run_auto(RunOptions(onnx_dir=str(text_twin_onnx), run_root=str(tmp_path / "r"), image=str(image))) == 2
    assert "text model's graphs" in capsys.readouterr().err
