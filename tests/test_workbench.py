"""The porting workbench: teacher-forced replay, hybrid runs, the conformance suite and the repro pack.

The tools run as subprocesses: they put onnxruntime sessions on the process-wide thread pool, which would refuse
later sessions with their own threads in the test process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from pipeline.core.errors import StagepipeError
from pipeline.runtime.backends import OnnxBackend
from tests.run_helpers import PROMPT, REPO, make_small_onnx, one_line_error, run_doit, step_files, summary

T, C, BLOCKS, PERTURBED = 8, 64, 4, 1
TOL = "0.01"


def tool(module: str, *args, check_rc=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"pipeline.{module}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if check_rc is not None and proc.returncode != check_rc:
        raise AssertionError(f"{module} exited {proc.returncode}, expected {check_rc}:\n{proc.stdout}\n{proc.stderr}")
    return proc


class DropsEdgeSlot(OnnxBackend):
    """A port that is wrong only past a window edge: when a step runs a larger window's graphs, the last cache
    slot of the window below is lost (zeroed), as an off-by-one copy between window buffers would."""

    name = "drops-edge-slot"

    def block(self, k, hidden, attention_mask, position_ids, past_key, past_value):
        smaller = [w for w in self.manifest.windows() if w < self.block_window(hidden, attention_mask)]
        if smaller:
            past_key, past_value = np.array(past_key), np.array(past_value)
            past_key[:, :, :, smaller[-1] - 1] = 0
            past_value[:, :, :, smaller[-1] - 1] = 0
        return super().block(k, hidden, attention_mask, position_ids, past_key, past_value)


def perturbed_copy(onnx_dir, out, block: int, scale=0.02):
    """onnx_dir with multiplicative noise on block K's weights (prefill/ and decode/ .data are one file)."""
    shutil.copytree(onnx_dir, out)
    data = out / "prefill" / f"block{block}.data"
    w = np.fromfile(data, dtype=np.float32)
    w *= (1 + scale * np.random.default_rng(1).standard_normal(w.size)).astype(np.float32)
    w.tofile(data)
    (out / "decode" / f"block{block}.data").unlink()
    os.link(data, out / "decode" / f"block{block}.data")
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_small_onnx(tmp_path_factory.mktemp("wb"), max_input_len=T, max_cache_len=C, blocks=BLOCKS)[1]


@pytest.fixture(scope="module")
def golden(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("golden") / "run"
    run_doit("--onnx_dir", small, "--run_root", root, "--prompt", PROMPT, "--steps", 8, "--ignore_eos")
    return root


@pytest.fixture(scope="module")
def perturbed(small, golden, tmp_path_factory):
    """(onnx_dir with block PERTURBED's weights perturbed, its free-running run)."""
    tmp = tmp_path_factory.mktemp("perturbed")
    onnx_dir = perturbed_copy(small, tmp / "onnx", PERTURBED)
    run = tmp / "run"
    run_doit("--onnx_dir", onnx_dir, "--run_root", run, "--prompt", PROMPT, "--steps", 8, "--ignore_eos")
    return onnx_dir, run


# -- replay ---------------------------------------------------------------------------------------------------------
def test_final_cache_is_the_cache_before_every_step(small):
    """A step writes only slots [past_len, next_past_len): the final cache with slots >= past_len zeroed equals
    the cache as it was before that step, bit for bit (what replay feeds each step)."""
    from pipeline.runtime.generate import MemoryKVCache, forward_step, prompt_chunks

    backend = OnnxBackend(small)
    cache, past, before = MemoryKVCache(backend.manifest), 0, []
    ids = list(range(1000, 1000 + T + 3))
    steps = prompt_chunks(ids, T) + [[7], [8], [9]]
    for chunk in steps:
        before.append((past, [a.copy() for a in cache.keys + cache.values]))
        forward_step(backend, cache, chunk, past)
        past += len(chunk)
    assert len({p for p, _ in before}) == len(steps)
    for past_len, snapshot in before:
        for final, then in zip(cache.keys + cache.values, snapshot):
            rebuilt = final.copy()
            rebuilt[:, :, :, past_len:] = 0
            assert np.array_equal(rebuilt, then)


def test_replay_of_the_golden_graphs_is_exact(small, golden, tmp_path):
    out = tmp_path / "r.json"
    tool("replay", golden, "--onnx_dir", small, "--json", out, check_rc=0)
    r = json.loads(out.read_text())
    errors = [e["rel_err"] for s in r["steps"] for cell in s["stages"].values() for e in cell["introduced"].values()]
    assert len(errors) == len(r["steps"]) * (1 + 3 * BLOCKS + 1)
    assert max(errors) == 0.0  # the same graphs on the golden inputs and "before" caches: every output identical
    assert [s["verdict"] for s in r["stages"]] == ["ok"] * (BLOCKS + 2)


def test_replay_names_the_perturbed_block(golden, perturbed, tmp_path):
    onnx_dir, run = perturbed
    out, heat = tmp_path / "r.json", tmp_path / "heat.png"
    proc = tool("replay", golden, "--onnx_dir", onnx_dir, "--candidate_run", run, "--max_rel_err", TOL,
                "--json", out, "--plot", heat, check_rc=1)
    assert f"FAIL: block{PERTURBED} introduces the largest error" in proc.stdout
    r = json.loads(out.read_text())
    verdicts = {s["stage"]: s["verdict"] for s in r["stages"]}
    assert verdicts == {"embed": "ok", "block0": "ok", "block1": "INTRODUCES", "block2": "inherits",
                        "block3": "inherits", "output": "inherits"}
    by_stage = {s["stage"]: s for s in r["stages"]}
    assert by_stage["block1"]["introduced"]["rel_err"] > float(TOL)
    for later in ("block2", "block3", "output"):  # unchanged graphs on golden inputs: exact
        assert by_stage[later]["introduced"]["rel_err"] == 0.0
        assert by_stage[later]["received"]["rel_err"] > float(TOL)
    assert by_stage["block0"]["received"]["rel_err"] == 0.0
    assert r["worst_stage"]["stage"] == "block1"
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_from_dumps_only_names_the_first_drifting_stage(golden, perturbed):
    """A board's dumps without a runnable candidate: the stage whose outputs drift while its inputs did not."""
    _, run = perturbed
    proc = tool("replay", golden, "--candidate_run", run, "--steps", "0-2", check_rc=1)
    assert f"FAIL: block{PERTURBED} introduces" in proc.stdout
    assert "candidate run (dumps)" in proc.stdout


def test_replay_refuses_a_candidate_of_another_shape(golden, small, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(small, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["max_input_len"] = T * 2
    (other / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(tool("replay", golden, "--onnx_dir", other), "error: candidate", "max_input_len")


# -- hybrid runs --------------------------------------------------------------------------------------------------------
def test_hybrid_run_with_the_same_graphs_equals_the_plain_run(small, golden, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    run = tmp_path / "hybrid"
    args = ("--onnx_dir", small, "--run_root", run, "--prompt", PROMPT, "--ignore_eos",
            "--stage_onnx", f"block2:{copy},output:{copy}", "--stage_backend", "block0:onnx")
    run_doit(*args, "--steps", 4)
    run_doit(*args, "--steps", 8)  # continues the run: the hybrid resumes like a plain one
    assert step_files(run) == step_files(golden)
    assert summary(run)["generated_token_ids"] == summary(golden)["generated_token_ids"]
    settings = json.loads((run / "run.json").read_text())
    assert sorted(settings["stage_routes"]) == ["block0", "block2", "output"]
    assert settings["stage_routes"]["block2"]["onnx_dir"] == str(copy.resolve())
    plain = json.loads((golden / "run.json").read_text())
    assert settings["onnx_fingerprint"] != plain["onnx_fingerprint"]
    assert settings["backend"].startswith("onnx+block0=onnx@")
    meta = json.loads((run / "step_0003" / "meta.json").read_text())
    assert meta["backend"] == settings["backend"] and meta["onnx_fingerprint"] == settings["onnx_fingerprint"]
    tool("compare", run, golden, check_rc=0)


def test_hybrid_refuses_another_model_shape(small, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(small, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["cache_windows"] = [C]
    (other / "manifest.json").write_text(json.dumps(manifest))
    proc = run_doit("--onnx_dir", small, "--run_root", tmp_path / "run", "--prompt", PROMPT, "--steps", 2,
                    "--stage_onnx", f"block1:{other}", check=False)
    one_line_error(proc, f"error: --stage_onnx block1={other}: has cache_windows [{C}]")
    assert not (tmp_path / "run").exists()


def test_stage_map_parsing():
    from pipeline.runtime.hybrid import parse_stage_map

    stages = ["embed", "block0", "output"]
    assert parse_stage_map("block0=a/b, output:c=d", "--x", stages) == {"block0": "a/b", "output": "c=d"}
    for bad, why in (("block9=x", "stages are"), ("block0", "expected STAGE=VALUE"), ("block0=a,block0=b", "twice")):
        with pytest.raises(StagepipeError, match=why):
            parse_stage_map(bad, "--x", stages)


# -- conformance ------------------------------------------------------------------------------------------------------
def test_conformance_passes_on_the_fp32_graphs(small):
    proc = tool("conformance", "--onnx_dir", small, check_rc=0)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    names = [line.split()[1] for line in lines]
    for expected in ("baseline", "prompt_T-1", "prompt_T", "prompt_T+1", "prompt_2T+1", "window8_W-1",
                     "window8_W", "window8_W+1", "window32_W+1", "cache_C-1", "cache_C", "multiturn", "positions"):
        assert expected in names
    assert all(line.startswith("PASS") for line in lines)


def test_conformance_names_the_case_past_a_window_edge(small):
    proc = tool("conformance", "--backend", "tests.test_workbench:DropsEdgeSlot", "--golden", small,
                "--only", "window8,prompt_T-1", "--json", check_rc=1)
    r = json.loads(proc.stdout)
    passed = {c["case"]: c["passed"] for c in r["cases"]}
    assert passed == {"baseline": True, "prompt_T-1": False, "window8_W-1": True, "window8_W": False,
                      "window8_W+1": False}
    first = next(c for c in r["cases"] if c["case"] == "window8_W")["first_failure"]
    assert (first["stage"], first["tensor"]) == ("block0", "hidden_block1.npy")
    assert r["failed"] == ["prompt_T-1", "window8_W", "window8_W+1"]
    prompt_case = next(c for c in r["cases"] if c["case"] == "prompt_T-1")["first_failure"]
    assert prompt_case["past_len"] == T  # its first two steps stay inside window 8 and pass


# -- repro pack -------------------------------------------------------------------------------------------------------
def test_pack_holds_run_steps_cache_and_reports(golden, perturbed, tmp_path):
    onnx_dir, run = perturbed
    allow = tmp_path / "allow.txt"
    allow.write_text("MatMul\n")
    out = tmp_path / "pack.tar.gz"
    proc = tool("pack", golden, "--compare", run, "--onnx_dir", onnx_dir, "--allow", allow, "-o", out, check_rc=0)
    assert "replay: FAIL: block1 introduces" in proc.stdout
    with tarfile.open(out) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest = json.loads(files["pack/pack.json"])
    assert manifest["steps"] == ["step_0000"]  # compare's first failing step
    for name in ("run/run.json", "run/step_0000/hidden_block2.npy", "other/step_0000/hidden_block2.npy",
                 "run/kv_cache/past_key_block1.npy", "reports/compare.txt", "reports/replay.json", "reports/ops.txt",
                 "reports/allow.txt", "onnx/manifest.json", "PACK.md"):
        assert f"pack/{name}" in files, name
    import hashlib
    for name, entry in manifest["files"].items():
        assert hashlib.sha256(files[f"pack/{name}"]).hexdigest() == entry["sha256"]
    assert manifest["versions"]["libraries"]["onnxruntime"]
    assert manifest["fingerprints"]["graphs_fingerprint"] == json.loads((golden / "run.json").read_text())[
        "onnx_fingerprint"]
    import io
    cache = np.load(io.BytesIO(files["pack/run/kv_cache/past_key_block1.npy"]))
    kept = manifest["kv_slots_kept"]
    assert kept == T and not cache[:, :, :, kept:].any() and cache[:, :, :, :kept].any()
