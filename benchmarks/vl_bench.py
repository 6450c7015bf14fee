"""Qwen2.5-VL at full vision size: convert a Qwen2.5-VL-3B-shaped random checkpoint and run its vision stages.

    python benchmarks/vl_bench.py [--model_dir models/bench-qwen2.5-vl-3b] [--precisions fp32,fp16]
        [--image_size 448] [--vision_blocks 4] [--run_auto] [--out runs/bench/vl.json] [--keep]

1. Writes (unless --model_dir holds it) a random checkpoint with Qwen2.5-VL-3B's shapes and transformers 4.49's
   config layout: the vision tower at full size (32 layers, hidden 1280, 16 heads, intermediate 3420, window
   112, full attention in layers 7/15/23/31, merger to 2048) and the language model cut to 2 of its 36 layers
   (hidden 2048, 16 heads, 2 KV heads, intermediate 11008, vocab 151936, tied embeddings, M-RoPE [16, 24, 24]);
   bf16 in shards of at most 1 GB with an index, the real Qwen tokenizer, preprocessor_config.json. Tensors are
   streamed to disk in row chunks, so the writer holds a few MB.
2. Converts it (`python -m pipeline.convert`, a child process) per precision, measuring wall time and the
   child's peak RSS (os.wait4's ru_maxrss, which counts the checkpoint pages it maps).
3. Runs the image step (`python -m stages.vision`) on a generated picture, again as a measured child; with
   several precisions, each vision stage's output is compared with the first precision's (cosine).
4. With --run_auto: a short image + text run (`doit run_auto --image ... --steps 4`), timed.
5. With --fp16_device: the fp16 vision graphs run with float16 arithmetic (fp16_device_run), each stage's
   output compared with the first precision's (onnxruntime's CPU provider computes their matmuls in float32)
Targets (the VL issue): conversion < 3 minutes and < 3 GB peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.convert_bench import dir_bytes, run_child  # noqa: E402
from pipeline.checkpoint.model_config import load_model_config  # noqa: E402
from pipeline.checkpoint.safetensors_io import f32_to_bf16_bits  # noqa: E402
from pipeline.checkpoint.vl_config import load_vision_config  # noqa: E402
from pipeline.convert.source import expected_tensors  # noqa: E402
from pipeline.convert.vision_graphs import expected_vision_tensors  # noqa: E402
from pipeline.core.atomic import write_json  # noqa: E402

TARGET_WALL_S = 180.0
TARGET_RSS_MB = 3072.0
SEED = 0
SHARD_BYTES = 1 << 30
CHUNK_ELEMENTS = 1 << 22

VISION = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
          "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
          "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
          "temporal_patch_size": 2}
CONFIG = {  # Qwen2.5-VL-3B-Instruct's config.json (transformers 4.49 layout), num_hidden_layers cut from 36 to 2
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.49.0", "use_cache": True,
    "use_sliding_window": False, "vision_config": VISION,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936}
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor"}


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor the converter reads, for the config.json in model_dir."""
    return {**expected_tensors(load_model_config(model_dir)), **expected_vision_tensors(load_vision_config(model_dir))}


def draw_chunks(rng, name: str, shape: tuple[int, ...]):
    """The tensor's values as float32 chunks: norms 1 + N(0, 0.1), biases N(0, 0.1), embeddings N(0, 1),
    matrices N(0, 1.5/sqrt(fan_in)) (as the test checkpoints)."""
    n = int(np.prod(shape))
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    for start in range(0, n, CHUNK_ELEMENTS):
        x = rng.standard_normal(min(CHUNK_ELEMENTS, n - start), dtype=np.float32)
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "layernorm" in name or \
                name.endswith("norm.weight") or name.endswith("ln_q.weight"):
            x = 1.0 + 0.1 * x
        elif name.endswith(".bias"):
            x *= 0.1
        elif "embed_tokens" not in name:
            x *= 1.5 / np.sqrt(fan_in)
        yield x


def write_shards(out: Path, shapes: dict[str, tuple[int, ...]], seed: int):
    """bf16 safetensors shards of at most SHARD_BYTES, streamed, and model.safetensors.index.json."""
    rng = np.random.default_rng(seed)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            nbytes = int(np.prod(shapes[name])) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(out / file, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for name in names:
                for chunk in draw_chunks(rng, name, shapes[name]):
                    f.write(f32_to_bf16_bits(chunk).tobytes())
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_checkpoint(model_dir: Path):
    from pipeline.demo.tokenizer_files import write_qwen3_tokenizer

    tmp = model_dir.parent / f".{model_dir.name}.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_json(tmp / "config.json", CONFIG)
    write_shards(tmp, tensor_shapes(tmp), SEED)
    write_qwen3_tokenizer(tmp)
    config = json.loads((tmp / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # Qwen3's text template: run_auto --chat then renders Qwen2.5-VL's format
    write_json(tmp / "tokenizer_config.json", config)
    (tmp / "chat_template.jinja").unlink(missing_ok=True)
    write_json(tmp / "preprocessor_config.json", PREPROCESSOR)
    write_json(tmp / "generation_config.json", {"bos_token_id": 151643, "eos_token_id": [151645, 151643]})
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)


def write_picture(path: Path, size=(640, 480)):
    from PIL import Image

    rng = np.random.default_rng(1)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 23.0 + c) * np.cos(yy / 31.0 - c) for c in range(3)], axis=-1)
    Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)).save(path)


def fp16_device_run(onnx_dir: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Each vision stage's output when the fp16 graphs run with float16 arithmetic: onnx's reference evaluator,
    its Gemm replaced by one taking float16 inputs, accumulating in float32 (BLAS) and rounding its output to
    float16, as fp16 matrix units do. onnxruntime's CPU provider cannot show this: it has no float16 Gemm and
    runs the graphs' float16 matmuls in float32 (only the weights are rounded)."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    from pipeline.core.jsonfile import load_manifest
    from pipeline.core.layout import vision_stage_names

    class Gemm(OpRun):
        op_domain = ""

        def _run(self, a, b, c=None, alpha=None, beta=None, transA=None, transB=None):
            a32, b32 = a.astype(np.float32), b.astype(np.float32)
            y = (a32.T if transA else a32) @ (b32.T if transB else b32)
            if c is not None:
                y = y + c.astype(np.float32)
            return (y.astype(a.dtype),)

    vision = load_manifest(onnx_dir).vision
    outputs, x = {}, pixels
    for stage in vision_stage_names(len(vision.blocks)):
        model = onnx.load(str(onnx_dir / vision.graphs[stage].file))
        x = ReferenceEvaluator(model, new_ops=[Gemm]).run(None, {model.graph.input[0].name: x})[0]
        outputs[stage] = x
    return outputs


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", default="models/bench-qwen2.5-vl-3b")
    p.add_argument("--work_dir", default="runs/bench/vl", help="onnx_dirs and image steps go here")
    p.add_argument("--out", default="runs/bench/vl.json")
    p.add_argument("--precisions", default="fp32,fp16")
    p.add_argument("--image_size", type=int, default=448)
    p.add_argument("--vision_blocks", type=int, default=4)
    p.add_argument("--run_auto", action="store_true", help="also run a short image + text generation")
    p.add_argument("--fp16_device", action="store_true",
                   help="also run the fp16 vision graphs with float16 arithmetic (onnx's reference evaluator; "
                        "minutes and ~8 GB at 3B size) and compare each stage with the first precision's")
    p.add_argument("--keep", action="store_true", help="keep the onnx_dirs")
    p.add_argument("--write_checkpoint", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    model_dir, work, out = REPO / a.model_dir, REPO / a.work_dir, REPO / a.out
    if a.write_checkpoint:
        write_checkpoint(model_dir)
        return 0
    result = {"benchmark": "vl", "model": "Qwen2.5-VL-3B shapes (vision full, 2 language layers), random bf16",
              "image_size": a.image_size, "vision_blocks": a.vision_blocks, "precisions": {},
              "targets": {"convert_wall_s": TARGET_WALL_S, "convert_peak_rss_mb": TARGET_RSS_MB}}
    if not (model_dir / "config.json").exists():
        print(f"checkpoint: writing {model_dir} ...", flush=True)
        code, wall, rss, log = run_child([sys.executable, str(Path(__file__).resolve()), "--write_checkpoint",
                                          "--model_dir", str(model_dir)])
        print(log, end="")
        if code:
            return 1
        result["checkpoint_write"] = {"wall_s": round(wall, 1), "peak_rss_mb": round(rss / 2**20)}
        print(f"checkpoint: written in {wall:.1f}s, peak RSS {rss / 2**20:.0f} MB")
    result["checkpoint_bytes"] = dir_bytes(model_dir)
    work.mkdir(parents=True, exist_ok=True)
    picture = work / "picture.png"
    write_picture(picture)
    first_step = None
    for precision in a.precisions.split(","):
        onnx_dir, step = work / f"onnx-{precision}", work / f"vision-{precision}"
        shutil.rmtree(onnx_dir, ignore_errors=True)
        shutil.rmtree(step, ignore_errors=True)
        cmd = [sys.executable, "-m", "pipeline.convert", "--model_path", str(model_dir), "--onnx_dir", str(onnx_dir),
               "--precision", precision, "--image_size", str(a.image_size), "--vision_blocks", str(a.vision_blocks),
               "--blocks", "1", "--max_input_len", "16", "--max_cache_len", "512"]
        print("convert:", " ".join(cmd[1:]), flush=True)
        code, wall, rss, log = run_child(cmd)
        print(log, end="")
        if code:
            return 1
        entry = {"convert_wall_s": round(wall, 1), "convert_peak_rss_mb": round(rss / 2**20),
                 "onnx_dir_bytes": dir_bytes(onnx_dir),
                 "vision_weights_bytes": sum(f.stat().st_size for f in (onnx_dir / "vision").glob("*.data"))}
        print(f"convert {precision}: {wall:.1f}s, peak RSS {rss / 2**20:.0f} MB")
        cmd = [sys.executable, "-m", "stages.vision", "--step_dir", str(step), "--onnx_dir", str(onnx_dir),
               "--image", str(picture)]
        code, wall, rss, log = run_child(cmd)
        print(log, end="")
        if code:
            return 1
        meta = json.loads((step / "meta.json").read_text())
        entry.update(vision_wall_s=round(wall, 1), vision_peak_rss_mb=round(rss / 2**20),
                     vision_stage_s={k: round(v["seconds"], 2) for k, v in meta["stages"].items()})
        print(f"vision stages {precision}: {wall:.1f}s, peak RSS {rss / 2**20:.0f} MB, {entry['vision_stage_s']}")
        if first_step is None:
            first_step = step
        else:
            entry["cosine_vs_" + a.precisions.split(",")[0]] = {
                f.name: round(cosine(np.load(f), np.load(first_step / f.name)), 9)
                for f in sorted(step.glob("vision_hidden*.npy")) + [step / "image_embeds.npy"]}
            print("cosine:", entry["cosine_vs_" + a.precisions.split(",")[0]])
        if a.fp16_device and precision == "fp16":
            t0 = time.perf_counter()
            device = fp16_device_run(onnx_dir, np.load(step / "pixel_patches.npy"))
            files = [f.name for f in sorted(first_step.glob("vision_hidden*.npy"), key=lambda f: int(f.stem[13:]))]
            entry["fp16_arithmetic"] = {"seconds": round(time.perf_counter() - t0, 1), "cosine_vs_first": {
                name: round(cosine(out, np.load(first_step / name)), 9)
                for name, out in zip(files + ["image_embeds.npy"], device.values())}}
            print("fp16 arithmetic:", entry["fp16_arithmetic"])
        if a.run_auto:
            root = work / f"run-{precision}"
            cmd = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "--dir", str(REPO), "run_auto",
                   "--onnx_dir", str(onnx_dir), "--run_root", str(root), "--image", str(picture), "--chat",
                   "--prompt", "Describe this picture.", "--steps", "4", "--ignore_eos", "--clean"]
            code, wall, rss, log = run_child(cmd)
            print(log[-400:], end="")
            summary = json.loads((root / "summary.json").read_text())
            entry["run_auto"] = {"wall_s": round(wall, 1), "peak_rss_mb": round(rss / 2**20), "exit": code,
                                 "prompt_tokens": len(summary["prompt_token_ids"]),
                                 "generated": summary["generated_token_ids"]}
        if not a.keep:
            shutil.rmtree(onnx_dir, ignore_errors=True)
        result["precisions"][precision] = entry
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(out, result)
    ok = all(e["convert_wall_s"] < TARGET_WALL_S and e["convert_peak_rss_mb"] < TARGET_RSS_MB
             for e in result["precisions"].values())
    print(f"-> {out}: conversion targets {'met' if ok else 'NOT met'}")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
