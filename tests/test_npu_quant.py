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

from tests.run_helpers import REPO, one_line_error, run_doit, step_files

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
    cmd = run_set_cmd(write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:2]), root, onnx_dir)
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
    assert set_tokens(root) == set_tokens(prompt_set)[:2]
    for run in ("run_0000", "run_0001"):
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


# -- calibration data -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["npz", "npy-list"])
def test_calibration_samples_reproduce_the_golden_stage_outputs(prompt_set, tmp_path, fmt):
    """Each sample fed to the graph it names gives the golden run's output for that step: the cache slots the step
    saw were rebuilt from the final kv_cache."""
    import onnxruntime as ort

    from pipeline.npu.calibration import write_calibration

    out = tmp_path / "cal"
    record = write_calibration(prompt_set, "block1", out, fmt, max_samples=4)
    assert json.loads((out / "calibration.json").read_text())["stage"] == "block1"
    checked = 0
    for name, group in record["graph_sets"].items():
        assert 0 < len(group["samples"]) <= 4
        session = ort.InferenceSession(str(Path(record["onnx_dir"]) / group["graph"]))
        names = [t["name"] for t in group["inputs"]]
        lines = (out / name / "dataset.txt").read_text().splitlines() if fmt == "npy-list" else None
        for i, sample in enumerate(group["samples"]):
            if fmt == "npz":
                feeds = dict(np.load(out / name / sample["files"][0]))
            else:
                feeds = {n: np.load(out / name / f) for n, f in zip(names, lines[i].split())}
            assert list(feeds) == names
            golden = np.load(prompt_set / sample["run"] / sample["step"] / "hidden_block2.npy")
            rows = sample["q_len"]
            got = session.run(None, feeds)[0]
            np.testing.assert_allclose(got[:, :rows], golden[:, :rows], rtol=1e-4, atol=1e-4 * np.abs(golden).max())
            checked += 1
    assert checked >= 4


def test_calibration_size_bound_and_bad_stage(prompt_set, tmp_path):
    from pipeline.npu.calibration import write_calibration

    record = write_calibration(prompt_set, "block0", tmp_path / "cal", max_samples=64, max_mb=2)
    total = sum(f.stat().st_size for f in (tmp_path / "cal").rglob("*.npz"))
    kept = sum(len(g["samples"]) for g in record["graph_sets"].values())
    assert 0 < total <= 2 * 2**20 and len(record["graph_sets"]) < kept < record["steps_available"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.calibration", str(prompt_set), "--stage", "block7",
                           "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
    one_line_error(proc, "--stage block7", "block1")


# -- static QDQ graphs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_onnx(small, tmp_path_factory):
    """The small model without attention windows (2 graphs a block: quick to quantize). The prompt set's runs were
    made with the windowed graphs: calibration lays each step's mask out for these."""
    from pipeline.convert.onnx_dir import convert

    model, _ = small
    out = tmp_path_factory.mktemp("plain") / "onnx"
    convert(model, out, blocks=2, max_input_len=8, max_cache_len=64, cache_windows=[], log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def qdq(plain_onnx, prompt_set, tmp_path_factory):
    """name -> quantize report: calibrated on runs 0-1, measured on the held-out run 2."""
    from pipeline.npu.quantize import quantize

    root = tmp_path_factory.mktemp("qdq")
    cases = {"w8a8": ("w8a8", "mask,rope,norms"), "w8a16": ("w8a16", "mask,rope,norms"),
             "w8a8-default": ("w8a8", "none")}
    return {name: quantize(plain_onnx, prompt_set, scheme, root / name, keep_float, stages="blocks", heldout=1,
                           log=lambda *a: None) for name, (scheme, keep_float) in cases.items()}


def test_qdq_graphs_keep_the_logits_on_held_out_prompts(qdq):
    w8a16, w8a8 = qdq["w8a16"], qdq["w8a8"]
    assert w8a16["heldout_runs"] == ["run_0002"] and w8a16["calibration_runs"] == ["run_0000", "run_0001"]
    assert w8a16["logits"]["cosine_mean"] >= 0.99, w8a16["logits"]
    assert w8a8["logits"]["cosine_mean"] >= 0.98, w8a8["logits"]  # the README's stated w8a8 figure
    assert w8a16["logits"]["cosine_mean"] > w8a8["logits"]["cosine_mean"]
    m = json.loads((Path(w8a16["onnx_dir"]) / "manifest.json").read_text())
    assert m["precision"] == "qdq-w8a16" and m["opset"] == 21 and m["nonstandard_ops"] == []
    assert m["quantization"]["stages"] == {"embed": "fp32", "block0": "w8a16", "block1": "w8a16", "output": "fp32"}


def test_default_settings_qdq_is_worse(qdq):
    """Quantizing the mask Add/Softmax and the RoPE tables as onnxruntime does by default ruins the blocks: the
    exclusions are necessary, not a guess."""
    ours, default = qdq["w8a8"], qdq["w8a8-default"]
    assert default["logits"]["cosine_mean"] < ours["logits"]["cosine_mean"] - 0.1, (default["logits"], ours["logits"])
    assert default["stage_errors"]["block0"]["rel_err_mean"] > 3 * ours["stage_errors"]["block0"]["rel_err_mean"]


def test_qdq_graphs_are_standard_ops_and_run_through_run_auto(qdq, prompt_set, tmp_path):
    import onnx

    from pipeline.npu.qdq import load_with_weights

    out = Path(qdq["w8a8"]["onnx_dir"])
    for rel in ("decode/block0.onnx", "prefill/block1.onnx"):
        onnx.checker.check_model(str(out / rel), full_check=True)  # by path: the weight files are plain copies
        ops = {(n.domain or "", n.op_type) for n in load_with_weights(out / rel).graph.node}
        assert ("", "QuantizeLinear") in ops and all(domain == "" for domain, _ in ops)
        assert {"Cos", "Softmax"} <= {op for _, op in ops}  # kept in float, still there
    run = tmp_path / "run"  # a process of its own: run_auto gives its process one onnxruntime thread pool
    run_doit("--onnx_dir", out, "--run_root", run, "--prompt", "Tell me about NPUs.", "--steps", 4, "--ignore_eos")
    assert len(set_run_tokens(run)) == 4


def test_qdq_graphs_load_in_openvino_with_matching_outputs(qdq, plain_onnx, prompt_set):
    """OpenVINO runs the QDQ graphs as they are. It executes Q/DQ pairs its own way (onnxruntime matches onnx's
    reference evaluator exactly; OpenVINO rounds some int8 steps otherwise and keeps int16 pairs nearer float), so
    its outputs are held to the quantization error: as near the fp32 graph's as onnxruntime's are."""
    pytest.importorskip("openvino", reason="openvino is not installed: pip install openvino")
    sys.path.insert(0, str(REPO))
    from benchmarks.qdq_check import compare_backends

    for name in ("w8a8", "w8a16"):
        r = compare_backends(Path(qdq[name]["onnx_dir"]), plain_onnx, prompt_set, "block0", "decode", samples=6)
        assert r["samples"] == 6
        assert r["openvino_vs_fp32"]["min"] >= r["onnxruntime_vs_fp32"]["min"] - 0.01, r
        assert r["openvino_vs_onnxruntime"]["min"] >= 0.97, r


# -- mixed precision ------------------------------------------------------------------------------------------
def test_mixed_meets_the_target_at_less_size(plain_onnx, qdq, prompt_set, tmp_path):
    from pipeline.npu.mixed import mixed

    dirs = f"fp32={plain_onnx},w8a16={qdq['w8a16']['onnx_dir']},w8a8={qdq['w8a8']['onnx_dir']}"
    out = tmp_path / "mixed"
    r = mixed(dirs, prompt_set, "cosine>=0.995", out, heldout=1, log=lambda *a: None)
    assert r["measured"]["cosine_mean"] >= 0.995
    assert r["measured"]["bytes"] < r["reference_bytes"]
    assert set(r["assignment"].values()) - {"fp32"}, "nothing quantized: the target is met by w8a16 blocks"
    assert json.loads((out / "assignment.json").read_text())["assignment"] == r["assignment"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "mixed" and set(m["quantization"]["stages"]) == {"embed", "block0", "block1", "output"}
    run_doit("--onnx_dir", out, "--run_root", tmp_path / "run", "--steps", 3, "--ignore_eos")


# -- NPU-friendly graph options -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def npu_graphs(small, tmp_path_factory):
    from pipeline.convert.onnx_dir import convert

    model, default = small
    root = tmp_path_factory.mktemp("npu_graphs")
    dirs = {"default": default}
    for name, options in {"window": {"cache_input": "window"}, "rope": {"rope_input": True}}.items():
        dirs[name] = root / name
        convert(model, dirs[name], blocks=2, max_input_len=8, max_cache_len=64, log=lambda *a: None, **options)
    return dirs


def traced(onnx_dir: Path, tokens: list[int]) -> dict:
    """Every stage output of a prefill chunk then decode steps, in memory."""
    from pipeline.runtime.backends import OnnxBackend
    from pipeline.runtime.generate import MemoryKVCache, forward_step

    backend, out, past = OnnxBackend(onnx_dir), {}, 0
    cache = MemoryKVCache(backend.manifest)
    for i, chunk in enumerate([tokens[:8], tokens[8:11]] + [[t] for t in tokens[11:]]):
        forward_step(backend, cache, chunk, past, all_rows=True,
                     trace=lambda stage, name, a, i=i: out.__setitem__((i, stage, name), a.copy()))
        past += len(chunk)
    return out


def test_window_input_graphs_equal_the_default_ones(npu_graphs):
    import onnx

    tokens = list(range(2000, 2040))  # 40 positions: windows 8, 16, 32 and 64 all run
    ref, got = traced(npu_graphs["default"], tokens), traced(npu_graphs["window"], tokens)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], v) for k, v in ref.items())
    g = onnx.load(str(npu_graphs["window"] / "decode" / "block0_c16.onnx"), load_external_data=False)
    past = next(i for i in g.graph.input if i.name == "past_key")
    assert [d.dim_value for d in past.type.tensor_type.shape.dim] == [2, 1, 2, 16, 64]  # (Lk,1,KV,W,D)


def test_rope_input_graphs_equal_the_default_ones(npu_graphs, prompt_set, tmp_path):
    import onnx

    from tests.run_helpers import run_stage

    tokens = list(range(2000, 2040))
    ref, got = traced(npu_graphs["default"], tokens), traced(npu_graphs["rope"], tokens)
    for key, want in ref.items():  # numpy's cos/sin against onnxruntime's Cos/Sin: float rounding apart
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=str(key))
    g = onnx.load(str(npu_graphs["rope"] / "prefill" / "block1.onnx"), load_external_data=False)
    assert not {"Cos", "Sin", "Cast"} & {n.op_type for n in g.graph.node}
    assert [i.name for i in g.graph.input if i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT] == []
    # through run_auto: the tokens of the default graphs' run of this prompt; the block stage reads cos.npy/sin.npy
    run = tmp_path / "rope"
    run_doit("--onnx_dir", npu_graphs["rope"], "--run_root", run, "--prompt", PROMPTS[0]["prompt"], "--steps",
             PROMPTS[0]["steps"], "--ignore_eos")
    assert set_run_tokens(run) == set_tokens(prompt_set)[0]
    step = run / "step_0000"
    assert np.load(step / "cos.npy").shape == (8, 64) and np.load(step / "sin.npy").dtype == np.float32
    # the block stage by hand on a copy of step 0 (a fresh cache is what it saw): run_auto's bytes; then with an
    # edited sin.npy: the stage reads the file (and its digest notices the edit)
    import shutil

    copy = tmp_path / "hand" / "step_0000"
    shutil.copytree(step, copy)
    (copy / "hidden_block1.npy").unlink()
    run_stage("block", "--block", 0, "--step_dir", copy, "--onnx_dir", npu_graphs["rope"], "--kv_dir",
              tmp_path / "hand" / "kv")
    assert (copy / "hidden_block1.npy").read_bytes() == (step / "hidden_block1.npy").read_bytes()
    np.save(copy / "sin.npy", np.zeros((8, 64), np.float32))
    run_stage("block", "--block", 0, "--step_dir", copy, "--onnx_dir", npu_graphs["rope"], "--kv_dir",
              tmp_path / "hand" / "kv")
    assert not np.allclose(np.load(copy / "hidden_block1.npy"), np.load(step / "hidden_block1.npy"))


def set_run_tokens(run: Path) -> list[int]:
    return json.loads((run / "summary.json").read_text())["generated_token_ids"]


# -- the trained demo model: real structure, where precision loss means something -------------------------------
CODE_PROMPTS = [{"prompt": "def bubble_sort(items):\n", "steps": 16, "ignore_eos": True},
                {"prompt": "class Stack:\n    def __init__(self):\n", "steps": 12, "ignore_eos": True},
                {"prompt": "import os\n\n\ndef list_files(path, suffix):\n    \"\"\"Return the files under path.\"\"\"\n",
                 "steps": 24, "ignore_eos": True}]


@pytest.fixture(scope="module")
def trained_qdq(tmp_path_factory):
    """QDQ w8a16 and w8a8 of the trained demo model (2 blocks, T=8, C=64), calibrated on two code prompts' runs
    and measured on the third's."""
    from pipeline.convert.onnx_dir import convert
    from pipeline.demo.checkpoint import write_trained_demo
    from pipeline.npu.quantize import quantize

    root = tmp_path_factory.mktemp("trained_qdq")
    write_trained_demo(root / "ckpt")
    convert(root / "ckpt", root / "fp32", blocks=2, max_input_len=8, max_cache_len=64, cache_windows=[],
            log=lambda *a: None)
    proc = subprocess.run(run_set_cmd(write_prompts(root / "prompts.jsonl", CODE_PROMPTS), root / "set", root / "fp32"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {scheme: quantize(root / "fp32", root / "set", scheme, root / scheme, "mask,rope,norms", stages="blocks",
                             heldout=1, log=lambda *a: None) for scheme in ("w8a16", "w8a8")}


def test_trained_model_qdq_keeps_the_logits(trained_qdq):
    w8a16, w8a8 = trained_qdq["w8a16"]["logits"], trained_qdq["w8a8"]["logits"]
    assert trained_qdq["w8a16"]["heldout_runs"] == ["run_0002"]
    assert w8a16["cosine_mean"] >= 0.99, w8a16
    assert w8a8["cosine_mean"] >= 0.98, w8a8  # the README's stated figure for w8a8 on the trained model
    assert w8a16["top1"] >= 0.9, w8a16
