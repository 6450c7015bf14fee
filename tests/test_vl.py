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
