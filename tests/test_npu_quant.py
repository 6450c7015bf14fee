"""NPU quantization from the golden run's dumps: prompt sets (local processes, Ray), calibration data, static QDQ
graphs, NPU-friendly graph options at convert, and the mixed-precision search."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.run_helpers import REPO, one_line_error, step_files

# calibration runs 0 and 1 (positions up to ~20), held-out run 2 (positions up to ~40: later than any calibrated)
PROMPTS = [{"prompt": "Tell me about NPUs.", "steps": 12, "ignore_eos": True},
           {"prompt": "Why is the sky blue? Answer in one line.", "chat": True, "steps": 6, "temperature": 0.8,
            "seed": 3, "ignore_eos": True},
           {"prompt": "List three prime numbers and a fact about each one of them, please.", "steps": 24,
            "ignore_eos": True}]


def write_prompts(path: Path, entries=PROMPTS) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def run_set_cmd(prompts: Path, root: Path, onnx_dir: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "pipeline.run_set", "--prompts", str(prompts), "--run_root", str(root),
            "--onnx_dir", str(onnx_dir), "-n", "2", *map(str, extra)]


def set_tokens(root: Path) -> list[list[int]]:
    summary = json.loads((root / "set_summary.json").read_text())
    return [r["summary"]["generated_token_ids"] for r in summary["runs"]]


@pytest.fixture(scope="module")
def small(small_onnx):
    return small_onnx


@pytest.fixture(scope="module")
def prompt_set(small, tmp_path_factory):
    """An uninterrupted set of the two prompts (doit run_set): what a killed and resumed set must reproduce."""
    _, onnx_dir = small
    tmp = tmp_path_factory.mktemp("set")
    root = tmp / "set"
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "--dir", str(REPO), "run_set",
                           "--prompts", str(write_prompts(tmp / "prompts.jsonl")), "--run_root", str(root),
                           "--onnx_dir", str(onnx_dir), "-n", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "3 of 3 runs complete" in proc.stdout and "run_0002" in proc.stdout
    return root


def test_run_set_runs_each_prompt_in_its_own_run_folder(prompt_set):
    tokens = set_tokens(prompt_set)
    assert [len(t) for t in tokens] == [12, 6, 24]
    run1 = json.loads((prompt_set / "run_0001" / "run.json").read_text())
    assert run1["chat"] is True and run1["sampling"]["temperature"] == 0.8 and not run1["sampling"]["greedy"]
    assert "already complete" not in (prompt_set / "logs" / "run_0000.log").read_text()


def test_killed_set_resumes_to_the_same_results(small, prompt_set, tmp_path):
    _, onnx_dir = small
    root = tmp_path / "set"
    cmd = run_set_cmd(write_prompts(tmp_path / "prompts.jsonl"), root, onnx_dir)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list(root.glob("run_000*/step_0002/hidden_block1.npy")):
        assert time.time() < deadline and proc.poll() is None, "the set finished or hung before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the set and its runs, as a kill of the job would
    proc.wait()
    assert not (root / "set_summary.json").exists()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert set_tokens(root) == set_tokens(prompt_set)
    for run in ("run_0000", "run_0001", "run_0002"):
        assert step_files(root / run) == step_files(prompt_set / run)


def test_run_set_refuses_other_prompts_and_bad_lines(small, prompt_set, tmp_path):
    _, onnx_dir = small
    other = write_prompts(tmp_path / "other.jsonl", [{"prompt": "Something else."}])
    proc = subprocess.run(run_set_cmd(other, prompt_set, onnx_dir), cwd=REPO, capture_output=True, text=True)
    one_line_error(proc, "other prompts", "--clean")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "x", "temprature": 0.5}\n')
    proc = subprocess.run(run_set_cmd(bad, tmp_path / "s", onnx_dir), cwd=REPO, capture_output=True, text=True)
    one_line_error(proc, "line 2", "temprature")


def test_run_set_on_a_local_ray_instance(small, prompt_set, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'): the Ray path is untested")
    from pipeline.run.options import RunOptions
    from pipeline.run.run_set import RunSetOptions, run_set

    _, onnx_dir = small
    root = tmp_path / "set"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code = run_set(RunSetOptions(prompts=str(write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:2])),
                                     run_root=str(root), ray="local"), RunOptions(onnx_dir=str(onnx_dir), threads=1))
    finally:
        ray.shutdown()
    assert code == 0
    assert set_tokens(root) == set_tokens(prompt_set)[:2]
