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
    assert text.mrope_section == [2, 3, 3] and text.qkv_bias and not text.qk_norm and text.tie_word_embeddings
    assert (vision.depth, vision.fullatt_block_indexes, vision.out_hidden_size) == (4, [1, 3], text.hidden_size)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    assert load_vision_config(tmp_path) is None


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
    fp16, fp32 = make_backend("onnx", out), make_backend("onnx", vl_onnx)
    x16, x32 = pixels, pixels
    for stage in ["vision_patch", "vision_block0", "vision_block1", "vision_merger"]:
        x16, x32 = fp16.vision(stage, x16), fp32.vision(stage, x32)
        cosine = float((x16 * x32).sum() / np.linalg.norm(x16) / np.linalg.norm(x32))
        assert cosine >= 0.999, f"{stage}: cosine {cosine}"


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
