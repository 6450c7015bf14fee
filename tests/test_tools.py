"""The debugging tools: pipeline.inspect, pipeline.compare, pipeline.ops (and `doit inspect`).

One small model (the demo checkpoint: real Qwen3 tokenizer, 4 layers of width 128, converted to 2 blocks, T=8,
C=64, float32 KV) and two runs of a 10-token prompt (two prefill chunks, so step_0001 has padding
rows) are made once per session: the ONNX run through the real `doit run_auto` command, the numpy reference run
by executing run_auto's task actions in this process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.run_helpers import one_line_error

from pipeline.core.jsonfile import load_manifest
from pipeline.tools import compare as compare_mod
from pipeline.tools import inspect as inspect_mod
from pipeline.tools import ops as ops_mod

REPO = Path(__file__).resolve().parents[1]
STEPS = 5  # new tokens; 10 prompt tokens in chunks of 8 -> step folders 0..5
PROMPT = "Give me a short introduction to large language models."  # 10 tokens


def cli(module: str, *args, cwd=REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", ".doit*"))
    return dst


def run_in_process(onnx_dir: Path, run_root: Path, backend: str):
    """pipeline.run_auto without doit: the same task actions, in the order run_auto yields them."""
    from pipeline.run.doit_support import Guard
    from pipeline.run.main import open_run
    from pipeline.run.options import RunOptions

    run = open_run(RunOptions(onnx_dir=str(onnx_dir), run_root=str(run_root), steps=STEPS, ignore_eos=True,
                              backend=backend, prompt=PROMPT))
    run.prepare()
    for task in run.tasks(Guard()):
        for action, args, kwargs in task["actions"]:
            assert action(*args, **kwargs) is None, task["name"]


@pytest.fixture(scope="session")
def small(tmp_path_factory, small_onnx):
    tmp = tmp_path_factory.mktemp("tools")
    _, onnx_dir = small_onnx
    onnx_run, ref_run = tmp / "run_onnx", tmp / "run_ref"
    # the real command; cwd = the repo (where dodo.py is), so doit keeps its record inside the run folder
    proc = cli("doit", "run_auto", "--onnx_dir", onnx_dir, "--run_root", onnx_run, "--steps", STEPS, "--ignore_eos",
               "--prompt", PROMPT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_in_process(onnx_dir, ref_run, "reference")
    return {"tmp": tmp, "onnx_dir": onnx_dir, "onnx_run": onnx_run, "ref_run": ref_run}


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def main_error(main, args, capsys, *needles: str):
    """main(args) in this process: a one-line error on stderr and exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    one_line_error(subprocess.CompletedProcess([], exc.value.code, "", err), *needles)


# -- (a) ONNX vs numpy reference ----------------------------------------------------------------------------------
def test_onnx_and_reference_runs_agree(small, tmp_path, capsys):
    """Both backends compute in float32; only accumulation order differs (onnxruntime's Gemm/MatMul/ReduceMean vs
    numpy's BLAS), about 1e-6 relative per op. Hidden states reach |x| ~ 40 and logits ~ 50, so after 4 layers the
    observed max abs error is ~1e-4; the default tolerance (atol 1e-3, rtol 1e-3, cosine >= 0.999) leaves a 10x
    margin and is still far below real bugs (the tamper test's 0.5)."""
    a, b = small["onnx_run"], small["ref_run"]
    assert summary(a)["generated_token_ids"] == summary(b)["generated_token_ids"]
    assert len(summary(a)["generated_token_ids"]) == STEPS
    out = tmp_path / "report.json"
    assert compare_mod.main([str(a), str(b), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "OK: all" in text and "FIRST FAILURE" not in text and "MISMATCH" not in text
    r = json.loads(out.read_text())
    assert r["ok"] and r["tensors_exceeding"] == 0 and r["first_failure"] is None
    assert r["common_steps"] == r["steps_a"] == r["steps_b"] == 6
    assert r["token_mismatches"] == 0 and len(r["tokens"]) == STEPS
    assert [t["token_a"] for t in r["tokens"]] == summary(b)["generated_token_ids"]
    n_blocks = 2
    expected = ["input_ids.npy", "attention_mask.npy", "position_ids.npy"] + \
               [f"hidden_block{k}.npy" for k in range(n_blocks + 1)] + ["logits.npy"]
    for s in r["steps"]:
        assert [e["file"] for e in s["tensors"]] == expected  # pipeline order
        for e in s["tensors"]:
            assert not e["exceeds"], (s["step"], e)
            if e["check"] == "equal":
                assert e["max_abs_err"] == 0
            else:
                assert e["max_abs_err"] < 1e-3 and e["cosine"] > 0.99999, (s["step"], e)
    # prefill chunk 2 has q_len 2 of T=8: only its 2 real rows are compared
    step1 = {e["file"]: e for e in r["steps"][1]["tensors"]}
    assert r["steps"][1]["q_len"] == 2 and step1["hidden_block1.npy"]["real_rows"] == 2
    assert step1["input_ids.npy"]["real_rows"] is None  # inputs: whole tensor, exact


def test_padding_rows_are_not_compared(small, tmp_path, capsys):
    bad = copy_run(small["onnx_run"], tmp_path / "pad")
    path = bad / "step_0001" / "hidden_block2.npy"
    arr = np.load(path)
    arr[:, 2:] += 100.0  # rows q_len..T-1 are padding in this prefill step
    np.save(path, arr)
    assert compare_mod.main([str(bad), str(small["ref_run"])]) == 0
    arr[:, 1] += 1.0  # a real row
    np.save(path, arr)
    assert compare_mod.main([str(bad), str(small["ref_run"])]) == 1
    assert "FIRST FAILURE: step_0001/hidden_block2.npy" in capsys.readouterr().out


def test_full_logits_against_last_row_logits(small, tmp_path, capsys):
    """A prefill step's logits may hold all T rows (1,T,V) or the last real row only (1,1,V): compare lines up
    row q_len-1 instead of calling it a shape mismatch; any other shape difference still fails."""
    full = copy_run(small["onnx_run"], tmp_path / "full")
    last = np.load(full / "step_0001" / "logits.npy")
    q_len = json.loads((full / "step_0001" / "meta.json").read_text())["q_len"]
    if last.shape[1] != 1:  # this run already keeps every row: make the last-row-only one instead
        last = last[:, q_len - 1:q_len].copy()
        np.save(full / "step_0001" / "logits.npy", last)
        full, short = small["onnx_run"], full
    else:
        rows = np.random.default_rng(0).standard_normal((1, 8, last.shape[2])).astype(np.float32)
        rows[:, q_len - 1] = last[:, 0]
        np.save(full / "step_0001" / "logits.npy", rows)
        short = small["onnx_run"]
    out = tmp_path / "r.json"
    assert compare_mod.main([str(full), str(short), "--json", str(out)]) == 0
    entry = next(e for e in json.loads(out.read_text())["steps"][1]["tensors"] if e["file"] == "logits.npy")
    assert entry["note"].startswith("B has the last real row only") and entry["max_abs_err"] == 0
    assert compare_mod.main([str(short), str(full)]) == 0
    assert "A has the last real row only" in capsys.readouterr().out


# -- (b) a tampered run -------------------------------------------------------------------------------------------
def test_tampered_tensor_is_the_first_failure(small, tmp_path):
    bad = copy_run(small["onnx_run"], tmp_path / "bad")
    path = bad / "step_0002" / "hidden_block1.npy"
    np.save(path, np.load(path) + 0.5)
    # later in time (though earlier in the pipeline) and a shape change: failures too, but not the first
    later = bad / "step_0004" / "hidden_block0.npy"
    np.save(later, np.load(later) * 1.01)
    logits = bad / "step_0003" / "logits.npy"
    np.save(logits, np.load(logits)[:, :, :100])
    (bad / "step_0004" / "logits.npy").write_bytes(b"not an npy")  # unreadable: that tensor fails
    shutil.rmtree(bad / "step_0005")  # different step counts: reported, common steps compared
    out = tmp_path / "r.json"
    proc = cli("pipeline.compare", bad, small["ref_run"], "--json", out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FIRST FAILURE: step_0002/hidden_block1.npy" in proc.stdout
    assert "only in run B" in proc.stdout and "6 steps" in proc.stdout and "5 steps" in proc.stdout
    r = json.loads(out.read_text())
    assert r["first_failure"]["path"] == "step_0002/hidden_block1.npy"
    assert r["common_steps"] == 5 and r["steps_only_in_one"] == ["step_0005"]
    failing = [(s["step"], e["file"]) for s in r["steps"] for e in s["tensors"] if e["exceeds"]]
    assert failing == [("step_0002", "hidden_block1.npy"), ("step_0003", "logits.npy"),
                       ("step_0004", "hidden_block0.npy"), ("step_0004", "logits.npy")]
    assert r["steps"][4]["tensors"][-1]["reason"].startswith("unreadable: ")
    first = next(e for e in r["steps"][2]["tensors"] if e["file"] == "hidden_block1.npy")
    assert first["max_abs_err"] == pytest.approx(0.5, abs=1e-3)
    shape_fail = next(e for e in r["steps"][3]["tensors"] if e["file"] == "logits.npy")
    assert shape_fail["reason"].startswith("shape 1x1x100 vs 1x1x151936")
    # one step fewer but nothing else different: exit 0, unless --strict
    short = copy_run(small["onnx_run"], tmp_path / "short")
    shutil.rmtree(short / "step_0005")
    assert compare_mod.main([str(short), str(small["onnx_run"])]) == 0
    assert compare_mod.main([str(short), str(small["onnx_run"]), "--strict"]) == 1


def test_compare_user_errors_and_plot(small, tmp_path, monkeypatch, capsys):
    one_line_error(cli("pipeline.compare", small["onnx_run"], tmp_path / "nope"), "not found")
    main_error(compare_mod.main, [small["onnx_run"], small["onnx_dir"]], capsys, "not a run folder")
    main_error(compare_mod.main, [small["onnx_run"], small["onnx_run"] / "step_0001"], capsys, "two of a kind")
    empty = tmp_path / "empty_run"
    (empty / "step_0042").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        compare_mod.main([str(small["onnx_run"]), str(empty)])
    assert exc.value.code == 2 and "no step folder in common" in capsys.readouterr().err
    png = tmp_path / "plot.png"
    try:
        import matplotlib  # noqa: F401
        has_mpl = True
    except ImportError:
        has_mpl = False
    if has_mpl:
        assert compare_mod.main([str(small["onnx_run"]), str(small["ref_run"]), "--plot", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not list(tmp_path.glob(".plot.png.*"))  # atomic write left no temporary
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        compare_mod.main([str(small["onnx_run"]), str(small["ref_run"]), "--plot", str(tmp_path / "no.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "pip install matplotlib" in err[0]
    assert not (tmp_path / "no.png").exists()


# -- (c) ops ------------------------------------------------------------------------------------------------------
def _ops_json(capsys, *args) -> tuple[int, dict]:
    capsys.readouterr()
    code = ops_mod.main([*map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_ops_reports_exactly_the_ops_in_the_graphs(small, capsys):
    onnx_dir = small["onnx_dir"]
    code, r = _ops_json(capsys, onnx_dir)
    assert code == 0 and r["ok"]
    labels = [g["graph"] for g in r["graphs"]]
    # every graph the manifest lists: the whole-cache sets, then each attention window's block graphs
    windows = sorted(load_manifest(onnx_dir).cache_windows, reverse=True)[1:]
    assert labels == [f"{mode}/{stage}" for mode in ("prefill", "decode")
                      for stage in ("embed", "block0", "block1", "output")] + \
        [f"{mode}/block{k}_c{w}" for w in windows for mode in ("prefill", "decode") for k in (0, 1)]
    assert len(windows) >= 2
    union = Counter()
    for g in r["graphs"]:
        model = onnx.load(g["file"], load_external_data=False)
        real = Counter(n.op_type for n in model.graph.node)
        union.update(real)
        assert g["ops"] == dict(real), g["graph"]
        assert g["node_count"] == len(model.graph.node)
        assert g["opsets"] == {"ai.onnx": 17} and g["node_domains"] == ["ai.onnx"]
        assert g["dynamic_dims"] == [] and g["nonstandard_domains"] == []
        assert all(not v["dynamic"] and all(isinstance(d, int) for d in v["shape"]) for v in g["inputs"] + g["outputs"])
        assert g["initializers"]["count"] == len(model.graph.initializer)
        assert all(f["exists"] and not f["too_short"] for f in g["external_data_files"])
    assert r["all_ops"] == dict(sorted(union.items()))
    assert "Softmax" in r["all_ops"] and "Gemm" in r["all_ops"]
    block = next(g for g in r["graphs"] if g["graph"] == "decode/block0")
    assert {v["name"]: v["shape"] for v in block["inputs"]}["attention_mask"] == [1, 1, 1, 65]
    assert [f["file"] for f in block["external_data_files"]] == ["block0.data"]
    out = next(g for g in r["graphs"] if g["graph"] == "prefill/output")  # tied: reads the embedding table
    assert [f["file"] for f in out["external_data_files"]] == ["embed.data", "output.data"]
    assert r["flagged"] == {"dynamic_dims": 0, "nonstandard_domains": [], "missing_external_files": 0}
    proc = cli("pipeline.ops", onnx_dir)
    assert proc.returncode == 0 and "all graphs, op types: " + " ".join(sorted(union)) in proc.stdout
    assert "dynamic dimensions: 0" in proc.stdout and "DYNAMIC" not in proc.stdout


def _copy_onnx_dir(src: Path, dst: Path) -> Path:
    """Graphs copied, weight files hard-linked (never written through: edited graphs are rewritten whole)."""
    def copy(s, d):
        os.link(s, d) if s.endswith(".data") else shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy)
    return dst


def test_ops_flags_dynamic_dims_domains_and_allow_list(small, tmp_path, capsys):
    onnx_dir = _copy_onnx_dir(small["onnx_dir"], tmp_path / "onnx")
    graph = onnx_dir / "prefill" / "block0.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]  # hidden_states (1, T, H)
    dim.dim_param = "T"
    graph.unlink()
    graph.write_bytes(model.SerializeToString())
    code, r = _ops_json(capsys, onnx_dir)
    assert code == 0  # flagged, not fatal without --strict
    g = next(g for g in r["graphs"] if g["graph"] == "prefill/block0")
    assert g["dynamic_dims"] == ["input hidden_states: dim 1 = 'T'"]
    assert g["inputs"][0]["shape"] == [1, "T", 128] and g["inputs"][0]["dynamic"]
    assert r["flagged"]["dynamic_dims"] == 1
    assert all(not x["dynamic_dims"] for x in r["graphs"] if x is not g)
    assert ops_mod.main([str(onnx_dir), "--strict"]) == 1
    text = capsys.readouterr().out
    assert "FLAG dynamic dimension: input hidden_states: dim 1 = 'T'" in text
    # a single .onnx file works too
    code, single = _ops_json(capsys, graph)
    assert code == 0 and single["graphs"][0]["dynamic_dims"] == ["input hidden_states: dim 1 = 'T'"]

    # allow list without Softmax: named, per block graph, exit 1
    all_ops = sorted(r["all_ops"])
    allow = tmp_path / "allow.txt"
    allow.write_text("# NPU op list\n\n" + "\n".join(f"{op}   # ok" for op in all_ops if op != "Softmax") + "\n")
    proc = cli("pipeline.ops", onnx_dir, "--allow", allow)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL: ops not in" in proc.stdout and proc.stdout.strip().endswith("Softmax")
    code, r2 = _ops_json(capsys, onnx_dir, "--allow", allow)
    assert code == 1 and r2["disallowed_ops"] == ["Softmax"]
    for g in r2["graphs"]:
        n = g["ops"].get("Softmax", 0)  # one per layer: 2 layers per block
        assert g["disallowed_ops"] == ({"Softmax": n} if n else {})
        assert (f"NOT ALLOWED: Softmax ({n})" in proc.stdout) == bool(n)
    flagged = {g["graph"] for g in r2["graphs"] if g["disallowed_ops"]}
    assert flagged == {g["graph"] for g in r2["graphs"] if "/block" in g["graph"]}
    assert {"prefill/block0", "prefill/block1", "decode/block0", "decode/block1"} < flagged
    with allow.open("a") as f:
        f.write("ai.onnx:Softmax\n")  # the domain:Op form
    assert ops_mod.main([str(onnx_dir), "--allow", str(allow)]) == 0
    assert "OK: every op is in" in capsys.readouterr().out

    # a com.microsoft op: flagged as non-standard, and outside the allow list unless named with its domain
    model = onnx.load(str(graph), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type not in ("Identity", "Softmax"))
    op, before = node.op_type, Counter(n.op_type for n in model.graph.node)[node.op_type]
    node.domain = "com.microsoft"
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    graph.unlink()
    graph.write_bytes(model.SerializeToString())
    code, r3 = _ops_json(capsys, onnx_dir, "--allow", allow)
    g = next(g for g in r3["graphs"] if g["graph"] == "prefill/block0")
    assert code == 1 and g["nonstandard_domains"] == ["com.microsoft"]
    assert g["disallowed_ops"] == {f"com.microsoft:{op}": 1} and g["ops"].get(op, 0) == before - 1
    assert r3["disallowed_ops"] == [f"com.microsoft:{op}"]
    with allow.open("a") as f:
        f.write(f"com.microsoft:{op}\n")
    assert ops_mod.main([str(onnx_dir), "--allow", str(allow)]) == 0


def test_ops_user_errors(small, tmp_path, capsys):
    one_line_error(cli("pipeline.ops", tmp_path / "nope"), "not found")
    main_error(ops_mod.main, [small["onnx_dir"], "--allow", tmp_path / "none.txt"], capsys, "--allow", "not found")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00\x01 not protobuf \xff" * 10)
    main_error(ops_mod.main, [broken], capsys, "not a readable ONNX model")
    (tmp_path / "empty").mkdir()
    main_error(ops_mod.main, [tmp_path / "empty"], capsys, "no .onnx files")


# -- (d) inspect --------------------------------------------------------------------------------------------------
def test_inspect_run(small, capsys):
    run = small["onnx_run"]
    s = summary(run)
    settings = json.loads((run / "run.json").read_text())
    assert inspect_mod.main([str(run)]) == 0
    text = capsys.readouterr().out
    for k in range(6):
        assert f"step_{k:04d}" in text
    assert text.count("prefill") >= 2 and text.count("decode") >= 4
    assert "embed ms" in text and "block1 ms" in text and "output ms" in text
    assert "summary (summary.json):" in text and "stop_reason: 'max_steps'" in text and "steps: 6" in text
    assert str(s["generated_token_ids"][-1]) in text

    assert inspect_mod.main([str(run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kind"] == "run" and r["summary"] == s and r["settings"] == settings and r["tokenizer"]
    steps = r["steps"]
    assert [st["step"] for st in steps] == list(range(6))
    assert [st["mode"] for st in steps] == ["prefill", "prefill"] + ["decode"] * 4
    assert [st["past_len"] for st in steps] == [0, 8, 10, 11, 12, 13]
    assert [st["q_len"] for st in steps] == [8, 2, 1, 1, 1, 1]
    assert steps[0]["input_token_ids"] + steps[1]["input_token_ids"] == settings["prompt_token_ids"]
    assert steps[0]["next_token_id"] is None  # a prompt chunk that another chunk follows samples nothing
    assert [st["next_token_id"] for st in steps[1:]] == s["generated_token_ids"]
    assert [st["input_token_ids"] for st in steps[2:]] == [[t] for t in s["generated_token_ids"][:-1]]
    from pipeline.runtime.tokenizer import Tokenizer
    tok = Tokenizer.load(small["onnx_dir"])
    assert [st["next_token_text"] for st in steps[1:]] == [tok.token_text(t) for t in s["generated_token_ids"]]
    for st in steps:
        assert set(st["stages_ms"]) == {"embed", "block0", "block1", "output"} and st["total_ms"] > 0


def test_inspect_step_and_kv_cache(small, capsys):
    run = small["onnx_run"]
    assert inspect_mod.main([str(run / "step_0001"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kind"] == "step"
    meta = json.loads((run / "step_0001" / "meta.json").read_text())
    assert r["meta"] == meta
    files = [t["file"] for t in r["tensors"]]
    assert files == ["input_ids.npy", "attention_mask.npy", "position_ids.npy", "hidden_block0.npy",
                     "hidden_block1.npy", "hidden_block2.npy", "logits.npy"]
    shapes = {t["file"]: (t["shape"], t["dtype"]) for t in r["tensors"]}
    assert shapes["input_ids.npy"] == ([1, 8], "int64")
    # step 1 is the second prompt chunk (past_len 8 + 2 tokens): the 16-slot window of the 64-slot cache
    assert (meta["past_len"], meta["q_len"], meta["attention_window"]) == (8, 2, 16)
    assert shapes["attention_mask.npy"] == ([1, 1, 8, 16 + 8], "float32")
    assert shapes["hidden_block2.npy"] == ([1, 8, 128], "float32")
    settings = json.loads((run / "run.json").read_text())
    logit_rows = 8 if settings.get("full_logits") else 1  # prefill logits: all T rows, or the last real row
    assert shapes["logits.npy"] == ([1, logit_rows, 151936], "float32")
    for t in r["tensors"]:
        assert t["nan"] == 0 and t["inf"] == 0 and t["finite_count"] == t["size"]
        arr = np.load(run / "step_0001" / t["file"]).astype(np.float64)
        assert t["min"] == arr.min() and t["max"] == arr.max()
        assert t["mean"] == pytest.approx(arr.mean(), rel=1e-9, abs=1e-9)
        assert t["std"] == pytest.approx(arr.std(), rel=1e-9, abs=1e-9)
    assert r["next_token_text"] == (run / "step_0001" / "next_token.txt").read_text()

    assert inspect_mod.main([str(run / "step_0003")]) == 0
    text = capsys.readouterr().out
    assert "logits.npy" in text and "1x1x151936" in text and "mode: decode" in text and "past_len: 11" in text
    assert "next_token_id: " + str(summary(run)["generated_token_ids"][2]) in text

    assert inspect_mod.main([str(run / "kv_cache"), "--json"]) == 0
    kv = json.loads(capsys.readouterr().out)
    assert kv["kind"] == "kv_cache" and kv["cache"]["max_cache_len"] == 64 and len(kv["files"]) == 4
    for f in kv["files"]:
        # 10 prompt tokens + 4 decoded tokens fed back in: slots 0..13
        assert f["shape"] == [2, 1, 2, 64, 64] and f["dtype"] == "float32"
        assert f["nonzero_slots"] == 14 and f["last_nonzero_slot"] == 13

    # a NaN in a tensor is counted, not fatal
    assert inspect_mod.main([str(run / "step_0003" / "hidden_block1.npy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensor"]["nan"] == 0


def test_inspect_counts_nan_and_errors_are_one_line(small, tmp_path, capsys):
    bad = copy_run(small["onnx_run"], tmp_path / "bad")
    path = bad / "step_0002" / "hidden_block1.npy"
    arr = np.load(path)
    arr[0, 0, :3] = [np.nan, np.inf, -np.inf]
    np.save(path, arr)
    proc = cli("pipeline.inspect", bad / "step_0002", "--json")
    assert proc.returncode == 0, proc.stderr
    t = next(t for t in json.loads(proc.stdout)["tensors"] if t["file"] == "hidden_block1.npy")
    assert (t["nan"], t["inf"], t["finite_count"]) == (1, 2, 125)
    assert np.isfinite([t["min"], t["max"], t["mean"], t["std"]]).all()

    one_line_error(cli("pipeline.inspect", tmp_path / "missing"), "not found")
    main_error(inspect_mod.main, [small["onnx_dir"]], capsys, "not a run folder")
    (bad / "step_0003" / "meta.json").write_text("{ not json")
    main_error(inspect_mod.main, [bad / "step_0003"], capsys, "meta.json")
    assert inspect_mod.main([str(bad)]) == 0  # the run table still shows every step, and names the bad file
    text = capsys.readouterr().out
    assert "(bad meta.json)" in text and "problem: " + str(bad / "step_0003" / "meta.json") in text
    assert "step_0005" in text


def test_doit_inspect_task(small, tmp_path):
    proc = cli("doit", "--db-file", tmp_path / "doit.db", "inspect", "--path", small["onnx_run"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step_0005" in proc.stdout and "summary (summary.json):" in proc.stdout


def test_compare_metrics_are_chunk_independent(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1, 5, 37)).astype(np.float32)
    b = a + rng.standard_normal(a.shape).astype(np.float32) * 1e-4
    b[0, 3, 11] += 0.25  # the worst element
    tol = compare_mod.Tolerance(1e-3, 1e-3, 0.999)
    whole = compare_mod.metrics(a, b, tol, exact=False)
    monkeypatch.setattr(compare_mod, "CHUNK", 7)
    chunked = compare_mod.metrics(a, b, tol, exact=False)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert whole["worst_index"] == chunked["worst_index"] == [0, 3, 11]
    assert not whole["allclose"] and not chunked["allclose"]
    for m in (whole, chunked):
        assert m["max_abs_err"] == pytest.approx(np.abs(a64 - b64).max(), rel=1e-12)
        assert m["mse"] == pytest.approx(np.mean((a64 - b64) ** 2), rel=1e-9)
        cos = np.dot(a64.ravel(), b64.ravel()) / np.linalg.norm(a64) / np.linalg.norm(b64)
        assert m["cosine"] == pytest.approx(cos, rel=1e-12)
    b[0, 3, 11] = a[0, 3, 11]
    b[0, 4, 36] = np.nan
    m = compare_mod.metrics(a, b, tol, exact=False)
    assert m["worst_index"] == [0, 4, 36] and m["nan_b"] == 1 and not m["allclose"] and np.isnan(m["max_abs_err"])
    ids = np.arange(12).reshape(1, 12)
    other = ids.copy()
    other[0, 9] = 0
    m = compare_mod.metrics(ids, other, tol, exact=True)
    assert not m["allclose"] and m["worst_index"] == [0, 9] and m["max_abs_err"] == 9
    assert compare_mod.metrics(ids, ids.copy(), tol, exact=True)["allclose"]
