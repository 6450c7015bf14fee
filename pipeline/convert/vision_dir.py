"""The vision half of converting a Qwen2.5-VL checkpoint: onnx_dir/vision/ with one graph and one weights file
per vision stage, and the manifest's `vision` entry (patch grid, image tokens, window layout, graphs)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.checkpoint.safetensors_io import CheckpointWeights
from pipeline.checkpoint.vision_layout import VisionLayout, check_image_size
from pipeline.checkpoint.vl_config import load_vision_config
from pipeline.convert.graphs import Precision
from pipeline.convert.onnx_builder import WeightStore
from pipeline.convert.options import ConvertOptions
from pipeline.convert.source import WeightSource, check_tensors
from pipeline.convert.vision_graphs import (build_vision_block, build_vision_merger, build_vision_patch,
                                            expected_vision_tensors)
from pipeline.core.layout import VISION, vision_graph_file, vision_stage_names, vision_weights_file
from schemas.manifest import BlockSpec, VisionConfig, VisionSpec


def checked_vision_config(model_path: Path, weights: CheckpointWeights, o: ConvertOptions) -> VisionConfig | None:
    """The checkpoint's vision tower, checked against the options and the weights before anything is written;
    None for a text model."""
    config = load_vision_config(model_path)
    if config is not None:
        check_image_size(config, o.image_size)
        o.vision_layer_ranges(config.depth)
        check_tensors(weights, expected_vision_tensors(config))
    return config


def vision_precision(precision: str) -> Precision:
    """fp16 graphs: float16 matmuls; every other precision (int8/int4 included) keeps the vision tower in fp32."""
    compute = np.dtype(np.float16 if precision == "fp16" else np.float32)
    return Precision(compute=compute, kv=np.dtype(np.float32))


def write_vision_graphs(config: VisionConfig, weights: CheckpointWeights, out: Path, o: ConvertOptions,
                        mask_value: float, graph_hash, log) -> VisionSpec:
    from pipeline.convert.onnx_dir import graph_spec

    layout = VisionLayout(config, o.image_size)
    ranges = o.vision_layer_ranges(config.depth)
    precision = vision_precision(o.precision)
    (out / VISION).mkdir()
    store = WeightStore(out / VISION)
    lookup = WeightSource(weights, store)
    builders = {"vision_patch": lambda stage: build_vision_patch(layout, precision, lookup)}
    for b, (start, end) in enumerate(ranges):
        builders[f"vision_block{b}"] = lambda stage, r=range(start, end): build_vision_block(
            layout, precision, r, lookup, mask_value, stage)
    builders["vision_merger"] = lambda stage: build_vision_merger(layout, precision, lookup)
    assert list(builders) == vision_stage_names(len(ranges))
    graphs = {}
    for n, (stage, build) in enumerate(builders.items(), 1):
        t0 = time.perf_counter()
        store.open(Path(vision_weights_file(stage)).name)
        model = build(stage)
        store.close()
        rel = vision_graph_file(stage)
        data = model.SerializeToString()
        (out / rel).write_bytes(data)
        graph_hash.update(data)
        graphs[stage] = graph_spec(model, rel)
        log(f"[vision {n}/{len(builders)}] {rel} ({time.perf_counter() - t0:.1f}s)")
    graph_hash.update(store.hasher.digest())
    return VisionSpec(config=config, image_size=o.image_size, grid=list(layout.grid), num_patches=layout.num_patches,
                      image_tokens=layout.image_tokens, window_patches=layout.window_patches,
                      blocks=[BlockSpec(index=i, layer_start=s, layer_end=e) for i, (s, e) in enumerate(ranges)],
                      precision="fp16" if precision.is_fp16 else "fp32", graphs=graphs)
