"""What the image step does to its folder (a run's vision/, or any --step_dir): decode and preprocess the image,
then run the vision stages one after another, each reading the previous one's file and writing its own.

    image --preprocess--> pixel_patches.npy (N, P) --vision_patch--> vision_hidden0.npy (N, C)
          --vision_block0--> vision_hidden1.npy ... --vision_block{K-1}--> vision_hidden{K}.npy
          --vision_merger--> image_embeds.npy (M, E)

meta.json (schemas/run.py VisionMeta) records each stage's time and a digest of its inputs: a stage asked to
redo work it finished on the same inputs returns at once, so reruns are cheap and any stage can be replayed
alone on a file put in its input's place (--stage).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.core.atomic import write_npy, write_text
from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import load_model_file
from pipeline.core.layout import IMAGE_EMBEDS, META, PIXEL_PATCHES, VISION, vision_hidden_file, vision_stage_names
from pipeline.core.tensors import digest, parse_tensor, read_file
from pipeline.runtime.backends import Backend
from pipeline.runtime.image_preprocess import image_patches
from schemas.manifest import VisionSpec
from schemas.run import StageRecord, VisionMeta

PREPROCESS = "preprocess"


def vision_spec(backend: Backend) -> VisionSpec:
    spec = backend.manifest.vision
    if spec is None:
        raise StagepipeError(f"{backend.onnx_dir}: a text model's graphs (no vision graphs); convert a Qwen2.5-VL "
                             "checkpoint to run images")
    return spec


def stage_files(spec: VisionSpec) -> dict[str, tuple[str | None, str, tuple[int, ...]]]:
    """stage -> (input file, output file, output shape), in pipeline order (preprocess reads the image)."""
    c, n = spec.config, len(spec.blocks)
    files = [None, PIXEL_PATCHES] + [vision_hidden_file(k) for k in range(n + 1)] + [IMAGE_EMBEDS]
    shapes = [(spec.num_patches, c.patch_values)] + [(spec.num_patches, c.hidden_size)] * (n + 1) + \
        [(spec.image_tokens, c.out_hidden_size)]
    stages = [PREPROCESS] + vision_stage_names(n)
    return {stage: (files[i], files[i + 1], shapes[i]) for i, stage in enumerate(stages)}


def _meta(backend: Backend, path: Path, spec: VisionSpec, image: Path | None) -> VisionMeta:
    m = backend.manifest
    old = load_model_file(path, VisionMeta) if path.is_file() else None
    same = old is not None and (old.onnx_fingerprint, old.backend) == (m.graphs_fingerprint, backend.name)
    if image is None:
        if not same:
            raise StagepipeError(f"{path.parent}: give --image (no image step of these graphs here yet)")
        return old
    if not Path(image).is_file():
        raise StagepipeError(f"--image {image}: not found")
    meta = VisionMeta(image=str(image), image_digest=digest(Path(image)), image_size=spec.image_size,
                      grid=spec.grid, image_tokens=spec.image_tokens, onnx_fingerprint=m.graphs_fingerprint,
                      backend=backend.name)
    if same and old.image_digest == meta.image_digest:
        meta.stages = old.stages
    return meta


def vision_step(backend: Backend, step_dir: Path, image: Path | None, only: str | None = None) -> VisionMeta:
    """Run the image step in step_dir (every stage, or only the stage named); returns its meta.json."""
    spec = vision_spec(backend)
    step_dir = Path(step_dir)
    files = stage_files(spec)
    if only is not None and only not in files:
        raise StagepipeError(f"--stage {only}: choose one of {', '.join(files)}")
    meta_path = step_dir / META
    meta = _meta(backend, meta_path, spec, image)
    for stage, (src, dst, shape) in files.items():
        if only not in (None, stage):
            continue
        started = time.perf_counter()
        out = step_dir / dst
        if stage == PREPROCESS:
            raw = read_file(Path(meta.image), "image")
            inputs_digest = digest(raw, spec.config.model_dump_json(), spec.image_size)
        else:
            raw = read_file(step_dir / src, "vision tensor")
            inputs_digest = digest(raw, backend.manifest.graphs_fingerprint, backend.name)
        rec = meta.stages.get(stage)
        if rec and rec.inputs_digest == inputs_digest and out.exists():
            continue
        if stage == PREPROCESS:
            result = image_patches(Path(meta.image), spec.config, spec.image_size)
        else:
            x = parse_tensor(raw, step_dir / src, files_shape(files, src), np.float32, "vision tensor")
            result = backend.vision(stage, x)
            backend.close(VISION, stage)  # an image step runs each vision graph once: unmap its weights now
        if tuple(result.shape) != shape:
            raise StagepipeError(f"{stage} gave shape {list(result.shape)}, expected {list(shape)}")
        write_npy(out, np.ascontiguousarray(result, dtype=np.float32))
        meta.stages[stage] = StageRecord(seconds=time.perf_counter() - started, inputs_digest=inputs_digest)
        write_text(meta_path, meta.model_dump_json(indent=2) + "\n")
    if not meta_path.exists():
        write_text(meta_path, meta.model_dump_json(indent=2) + "\n")
    return meta


def files_shape(files, name: str) -> tuple[int, ...]:
    """The shape of the file a stage writes."""
    return next(shape for _, dst, shape in files.values() if dst == name)


def load_image_embeds(path: Path, spec: VisionSpec) -> np.ndarray:
    """image_embeds.npy checked against the graphs: (image_tokens, hidden) float32."""
    return parse_tensor(read_file(path, "image embeds"), path, (spec.image_tokens, spec.config.out_hidden_size),
                        np.float32, "image embeds")
