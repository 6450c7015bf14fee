"""Converter benchmark: wall time and peak memory of converting a Qwen3-0.6B-shaped checkpoint.

    python benchmarks/convert_bench.py [--model_dir models/bench-qwen3-0.6b] [--onnx_dir onnx/bench-qwen3-0.6b]
        [--out runs/bench/convert.json] [--blocks 4] [--precision fp32] [--keep]

1. Writes a random-weight checkpoint with Qwen3-0.6B's shapes (28 layers, hidden 1024, 16 heads, 8 kv heads,
   head_dim 128, intermediate 3072, vocab 151936, tied embeddings, bf16 weights, one model.safetensors, seed 0)
   unless --model_dir already holds one (in a child process). Tensors are drawn one at a time and only their
   bf16 form is kept until the file is written: about 2.1 GB peak (1.2 GB of bf16 data, or the float32
   embedding table and its rounding temporaries).
2. Converts it with `python -m pipeline.convert` (T=16, C=1024) in a child process, measuring the wall time and
   the child's peak resident set size (os.wait4's ru_maxrss; it counts the checkpoint pages the child maps).
3. Prints the figures and writes them as JSON. Targets (the converter issue): < 60 s and < 1.5 GB peak RSS.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.cli_args import ArgumentParser  # noqa: E402
from pipeline.core.atomic import write_json  # noqa: E402
from pipeline.checkpoint.safetensors_io import save_safetensors  # noqa: E402

TARGET_WALL_S = 60.0
TARGET_RSS_MB = 1536.0  # 1.5 GB
SEED = 0

QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
    "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False,
                     "transformers_version": "4.51.0"}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors in the order transformers saves them."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D, Hq, KV = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (H,), f"{p}.mlp.down_proj.weight": (H, I),
                       f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
                       f"{p}.post_attention_layernorm.weight": (H,), f"{p}.self_attn.k_norm.weight": (D,),
                       f"{p}.self_attn.k_proj.weight": (KV * D, H), f"{p}.self_attn.o_proj.weight": (H, Hq * D),
                       f"{p}.self_attn.q_norm.weight": (D,), f"{p}.self_attn.q_proj.weight": (Hq * D, H),
                       f"{p}.self_attn.v_proj.weight": (KV * D, H)})
    shapes["model.norm.weight"] = (H,)
    return shapes


class LazyTensors:
    """What save_safetensors iterates: each float32 tensor is drawn when reached and dropped after its bf16
    conversion, so only one float32 tensor is alive at a time."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int):
        self.shapes = shapes
        self.rng = np.random.default_rng(seed)

    def items(self):
        for name, shape in self.shapes.items():
            x = self.rng.standard_normal(shape, dtype=np.float32)
            if len(shape) == 1:  # RMSNorm weights around 1
                x *= 0.1
                x += 1.0
            elif "embed_tokens" not in name:
                x *= 1.5 / np.sqrt(shape[1])  # std 1.5/sqrt(fan_in), as the test checkpoints
            yield name, x
            del x


def write_checkpoint(model_dir: Path, seed: int = SEED) -> float:
    """Write the random bf16 checkpoint into model_dir (built beside it, then renamed). Returns seconds taken."""
    t0 = time.perf_counter()
    tmp = model_dir.parent / f".{model_dir.name}.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shapes = tensor_shapes(QWEN3_0_6B)
        save_safetensors(tmp / "model.safetensors", LazyTensors(shapes, seed), bf16=True)
        write_json(tmp / "config.json", QWEN3_0_6B)
        write_json(tmp / "generation_config.json", GENERATION_CONFIG)
        try:
            os.replace(tmp, model_dir)
        except OSError:  # another process wrote the same folder meanwhile: keep theirs
            if not (model_dir / "model.safetensors").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return time.perf_counter() - t0


def run_child(cmd: list[str]) -> tuple[int, float, int, str]:
    """Run a child process; -> (exit code, wall seconds, peak RSS bytes of that child, its output)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()  # a few dozen lines; read them all, then reap the child
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss * 1024, out  # Linux reports ru_maxrss in KiB


def dir_bytes(path: Path) -> int:
    """Bytes on disk, counting a hard-linked file once."""
    seen, total = set(), 0
    for p in path.rglob("*"):
        st = p.stat()
        if p.is_file() and st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_size
    return total


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", default="models/bench-qwen3-0.6b")
    p.add_argument("--onnx_dir", default="onnx/bench-qwen3-0.6b")
    p.add_argument("--out", default="runs/bench/convert.json")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--max_input_len", type=int, default=16)
    p.add_argument("--max_cache_len", type=int, default=1024)
    p.add_argument("--keep", action="store_true", help="keep the converted onnx_dir (about 2.4 GB for fp32)")
    p.add_argument("--write_checkpoint", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    model_dir, onnx_dir, out = (REPO / a.model_dir, REPO / a.onnx_dir, REPO / a.out)

    if a.write_checkpoint:  # the child that writes the checkpoint (see below)
        write_checkpoint(model_dir)
        return 0

    # Both the writer and the converter run as children of this small process: Linux carries a process's peak
    # RSS across fork/exec into ru_maxrss, so a converter started from a process that had just drawn 2 GB of
    # random weights would report that 2 GB as its own peak.
    if (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists():
        print(f"checkpoint: {model_dir} exists, reusing it")
        write_s = write_rss_mb = None
    else:
        print(f"checkpoint: writing {model_dir} (Qwen3-0.6B shapes, random bf16, seed {SEED}) ...", flush=True)
        code, write_s, write_rss, log = run_child([sys.executable, str(Path(__file__).resolve()),
                                                   "--write_checkpoint", "--model_dir", str(model_dir)])
        print(log, end="")
        if code != 0:
            print(f"writing the checkpoint failed with exit code {code}", file=sys.stderr)
            return 1
        write_rss_mb = write_rss / 2**20
        print(f"checkpoint: written in {write_s:.1f}s, peak RSS {write_rss_mb:.0f} MB")
    ckpt_bytes = (model_dir / "model.safetensors").stat().st_size

    shutil.rmtree(onnx_dir, ignore_errors=True)  # not part of the measurement
    cmd = [sys.executable, "-m", "pipeline.convert", "--model_path", str(model_dir), "--onnx_dir", str(onnx_dir),
           "--blocks", str(a.blocks), "--precision", a.precision, "--max_input_len", str(a.max_input_len),
           "--max_cache_len", str(a.max_cache_len)]
    print("convert:", " ".join(cmd), flush=True)
    code, wall, rss, log = run_child(cmd)
    print(log, end="")
    if code != 0:
        print(f"convert failed with exit code {code}", file=sys.stderr)
        return 1
    onnx_bytes = dir_bytes(onnx_dir)
    if not a.keep:
        shutil.rmtree(onnx_dir, ignore_errors=True)

    rss_mb = rss / 2**20
    result = {
        "benchmark": "convert",
        "model": "Qwen3-0.6B shapes, random bf16 weights",
        "checkpoint_bytes": ckpt_bytes,
        "checkpoint_write_s": None if write_s is None else round(write_s, 2),
        "checkpoint_write_peak_rss_mb": None if write_rss_mb is None else round(write_rss_mb, 1),
        "command": cmd[1:],
        "blocks": a.blocks, "precision": a.precision, "max_input_len": a.max_input_len,
        "max_cache_len": a.max_cache_len,
        "wall_s": round(wall, 2),
        "peak_rss_bytes": rss,
        "peak_rss_mb": round(rss_mb, 1),
        "onnx_dir_bytes": onnx_bytes,
        "targets": {"wall_s": TARGET_WALL_S, "peak_rss_mb": TARGET_RSS_MB},
        "meets_targets": {"wall_s": wall < TARGET_WALL_S, "peak_rss_mb": rss_mb < TARGET_RSS_MB},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out, result)
    print(f"\nconvert wall {wall:.1f}s (target < {TARGET_WALL_S:.0f}s), peak RSS {rss_mb:.0f} MB "
          f"(target < {TARGET_RSS_MB:.0f} MB), onnx_dir {onnx_bytes / 2**30:.2f} GiB -> {out}")
    return 0 if all(result["meets_targets"].values()) else 3


if __name__ == "__main__":
    sys.exit(main())
