"""Shared helpers for tests that drive runs: a small demo-shaped model with the real tokenizer, and doit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs far away."  # > 1 chunk of 8 tokens


def make_small_onnx(tmp: Path, kv_dtype="float32", max_input_len=8, max_cache_len=64, blocks=2) -> tuple[Path, Path]:
    from pipeline.convert.onnx_dir import convert
    from pipeline.demo.checkpoint import write_demo_checkpoint

    model = tmp / "model"
    write_demo_checkpoint(model, seed=0)
    onnx_dir = tmp / "onnx"
    convert(model, onnx_dir, blocks=blocks, max_input_len=max_input_len, max_cache_len=max_cache_len,
            kv_dtype=kv_dtype, log=lambda *a: None)
    return model, onnx_dir


def one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The one clear error line every command gives for bad input: exit `code`, one `error:` line on stderr naming
    each of needles, no traceback. Returns the line."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def run_doit(*args, check=True, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "--dir", str(REPO), "run_auto", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"doit failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_stage(module: str, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"stages.{module}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"stage {module} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def summary(run_root: Path) -> dict:
    return json.loads((Path(run_root) / "summary.json").read_text())


def step_files(run_root: Path) -> dict[str, bytes]:
    """Every tensor and token file of every step, by relative path (meta.json aside: it holds timings)."""
    out = {}
    for path in sorted(Path(run_root).glob("step_*/*")):
        if path.name != "meta.json":
            out[str(path.relative_to(run_root))] = path.read_bytes()
    return out


def env_without_threads_noise():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
