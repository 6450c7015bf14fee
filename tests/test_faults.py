"""Fault injection: kills at many points, damaged files of every kind, a full disk, links out of the run folder.
Every outcome is the uninterrupted run's tokens and files, or one clear error line; never a traceback, never
exit 0 with other tokens, never a write outside the run folder. The full campaign (>= 100 kills, every damage
case) is `python -m benchmarks.fault_campaign --kills 100`; this file runs a small one."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import fault_campaign as fc
from pipeline.core.errors import StagepipeError
from pipeline.core.layout import StepPaths


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The demo checkpoint converted small, and an uninterrupted run of it (what every case must repeat)."""
    return fc.make_sandbox(tmp_path_factory.mktemp("faults"))


def test_kills_at_many_points_then_the_same_command_gives_the_uninterrupted_run(sandbox):
    figures = fc.kill_campaign(sandbox, kills=10, seed=1, log=lambda line: None)
    assert figures["kills"] == 10
    assert figures["final_outcomes"] == {"identical": figures["chains"]}, figures
    assert figures["killed_runs_with_traceback_or_unclean_sigint"] == 0, figures["unclean"]
    assert figures["chains_writing_outside"] == 0
    assert len(figures["by_signal"]) == 3 and len(figures["by_phase"]) >= 4, figures


def test_every_kind_of_damage_is_repaired_or_refused_in_one_line(sandbox):
    figures = fc.damage_campaign(sandbox, quick=True, log=lambda line: None, full_disk=False)
    outcomes = {r["case"]: r["outcome"] for r in figures["results"]}
    assert set(outcomes) == set(fc.QUICK)
    assert figures["writes_outside"] == 0
    assert (sandbox.outside / "canary.txt").read_text() == "must never change\n"
    refused = {"truncate kv_cache/past_key_block1.npy", "edited manifest.json: mask_value 0",
               "swapped graph prefill/block1_c16.onnx", "symlink kv_cache/past_key_block0.npy"}
    assert outcomes == {case: "clear error" if case in refused else "identical" for case in outcomes}, \
        [r for r in figures["results"] if r["outcome"] != ("clear error" if r["case"] in refused else "identical")]
    lines = {r["case"]: r["line"] for r in figures["results"]}
    assert "(truncated or damaged); delete it" in lines["truncate kv_cache/past_key_block1.npy"]
    assert "block1_c16.onnx: its content differs" in lines["swapped graph prefill/block1_c16.onnx"]


def test_full_disk_is_one_line_naming_the_file_then_the_run_resumes(sandbox):
    results = fc.full_disk_cases(sandbox, log=lambda line: None, limits=(300_000,))
    assert [r["outcome"] for r in results[:2]] == ["clear error", "identical"], results
    assert "file too large" in results[0]["line"] and ".npy" in results[0]["line"]
    if len(results) > 2:  # a small tmpfs could be mounted: a real ENOSPC, then a read-only folder
        assert [r["outcome"] for r in results[2:]] == ["clear error", "identical", "clear error"], results
        assert "no space left on device" in results[2]["line"] and ".npy" in results[2]["line"]
        assert "read-only file system" in results[4]["line"]


def test_an_unreadable_record_is_discarded_with_a_notice(tmp_path, capsys):
    from doit.dependency import JSONCodec

    from pipeline.run.doit_support import AtomicJsonDB

    for junk in (b"", b"\x00\xff not json", b'{"task": 3}'):
        (tmp_path / ".doit.db").write_bytes(junk)
        assert AtomicJsonDB(str(tmp_path / ".doit.db"), JSONCodec())._db == {}
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "doit's record is unreadable" in err[0] and "discarded" in err[0]


def test_folders_that_are_not_step_folders_are_ignored(sandbox, tmp_path):
    from pipeline.core.layout import step_dirs

    run = tmp_path / "run"
    shutil.copytree(sandbox.reference, run)
    shutil.copytree(run / "step_0003", run / "step_0003.bak")
    (run / "step_03").mkdir()
    (run / "step_9999").write_text("a file, not a folder")
    assert [d.name for d in step_dirs(run)] == [d.name for d in step_dirs(sandbox.reference)]


RECORD_WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from doit.dependency import JSONCodec, JsonDB
from pipeline.run.doit_support import AtomicJsonDB
db = (AtomicJsonDB if sys.argv[3] == "atomic" else JsonDB)(sys.argv[2], JSONCodec())
for i in range(150_000):
    db.set(f"task{i}", "deps:", ["x" * 40, i])
print("writing", flush=True)
db.dump()
"""


@pytest.mark.parametrize("backend", ["atomic", "doit_json"])
def test_a_kill_while_the_record_is_written_leaves_it_readable(tmp_path, backend):
    """doit's json backend truncates its file before writing; ours writes a new file and renames it. Killed in
    the middle of writing a large record, ours is always the old or the new one; doit's is left unreadable."""
    from doit.dependency import JSONCodec, JsonDB

    record = tmp_path / ".doit.db"
    unreadable = 0
    for delay in (0.0, 0.02, 0.05):
        record.write_text(json.dumps({"old": {"deps:": []}}))
        proc = subprocess.Popen([sys.executable, "-c", RECORD_WRITER, str(fc.REPO), str(record),
                                 "atomic" if backend == "atomic" else "json"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        try:
            data = JsonDB(str(record), JSONCodec())._db
            assert "old" in data or "task149999" in data
        except Exception:
            unreadable += 1
    if backend == "atomic":
        assert unreadable == 0
    else:
        assert unreadable > 0, "the harness did not catch doit's json backend mid-write; it proves nothing"


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_is_one_line_then_the_run_resumes(sandbox, tmp_path, sig, code):
    run_dir = tmp_path / "run"
    proc = sandbox.spawn(run_dir)
    deadline = time.time() + 120
    while not (run_dir / "step_0002" / "hidden_block1.npy").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code and "Traceback" not in out + err
    assert err.strip().splitlines()[-1] == "interrupted; run the same command to resume"
    assert fc.classify(sandbox.run(run_dir), run_dir, sandbox) == "identical"


def test_fsync_run_gives_the_same_run(sandbox, tmp_path):
    proc = subprocess.run(sandbox.command(tmp_path / "run") + ["--fsync"], cwd=fc.REPO, capture_output=True,
                          text=True, timeout=300)
    assert fc.classify(proc, tmp_path / "run", sandbox) == "identical", proc.stderr


@pytest.mark.parametrize("args,expected", [
    (["--steps", "abc"], "--steps: expected an integer"),
    (["--prompt", "\udcff\udcfe hello"], "--prompt: not UTF-8 text"),
    (["--run_root", "{file}"], "is a file, not a folder"),
])
def test_bad_input_is_one_line_and_exit_2(sandbox, tmp_path, args, expected):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cmd = sandbox.command(tmp_path / "run") + [arg.format(file=a_file) for arg in args]
    proc = subprocess.run(cmd, cwd=fc.REPO, capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8:surrogateescape"})
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.strip()] == [next(
        line for line in err.splitlines() if line.startswith("error:"))]
    assert expected in err


# -- in process: the mechanisms one by one -----------------------------------------------------------------------
def test_a_stage_rerun_by_hand_says_why_it_did_nothing_and_redoes_damaged_work(sandbox, tmp_path):
    from pipeline.runtime.backends import OnnxBackend
    from pipeline.runtime.kv_cache import KVCacheDir
    from pipeline.runtime.stage_ops import block, output

    run = tmp_path / "run"
    shutil.copytree(sandbox.reference, run)
    backend = OnnxBackend(sandbox.onnx)
    kv = KVCacheDir(run / "kv_cache", backend.manifest).open()
    paths = StepPaths(run / "step_0003")
    said = []
    block(backend, paths, 1, *kv.past(1), on_skip=said.append)
    slot = json.loads(paths.meta.read_text())["past_len"]
    assert len(said) == 1 and "block1 already done" in said[0] and f"cache slots {slot}..{slot}" in said[0]
    before = paths.hidden(2).read_bytes()
    paths.hidden(2).unlink()  # an output gone: the stage redoes its work
    said.clear()
    block(backend, paths, 1, *kv.past(1), on_skip=said.append)
    assert not said and paths.hidden(2).read_bytes() == before
    key, value = kv.past(0)
    key[:, :, :, slot] = 0  # the slots it wrote, damaged: redone too
    block(backend, paths, 0, key, value, on_skip=said.append)
    assert not said and np.any(key[:, :, :, slot] != 0)
    paths.logits.write_bytes(paths.logits.read_bytes()[:-4])  # a truncated output
    output(backend, paths, on_skip=said.append)
    assert not said and paths.logits.read_bytes() == (sandbox.reference / "step_0003" / "logits.npy").read_bytes()


def test_a_step_allocates_its_cache_slots_before_writing_and_files_are_never_resized(tmp_path):
    from pipeline.runtime.kv_cache import (RESERVE_AHEAD, create_cache_file, open_cache_file, reserve_slots,
                                           store_slots)

    path, shape = tmp_path / "k.npy", (2, 1, 2, 512, 16)
    create_cache_file(path, shape, "float32")
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    assert path.stat().st_blocks * 512 < size // 4  # sparse: nothing allocated yet
    cache = open_cache_file(path, shape, "float32")
    reserve_slots(cache, 3)  # what store_slots does first
    slot_bytes = 16 * 4
    # the blocks behind slots [0, 3 + RESERVE_AHEAD) of each of the 4 (layer, head) rows: a full disk fails there
    # with an error naming the file, never as a SIGBUS when the write lands in a hole
    assert path.stat().st_blocks * 512 >= 4 * (3 + RESERVE_AHEAD) * slot_bytes
    assert path.stat().st_mtime_ns == mtime  # allocating changed no byte
    store_slots(cache, 0, 3, np.ones((2, 1, 2, 8, 16), np.float32))
    cache.flush()
    assert np.load(path)[:, :, :, :3].sum() == 2 * 2 * 3 * 16 and not np.load(path)[:, :, :, 3:].any()
    del cache
    os.truncate(path, size - 100)
    with pytest.raises(StagepipeError, match=r"has \d+ bytes, its header says \d+ \(truncated or damaged\)"):
        open_cache_file(path, shape, "float32")
    assert path.stat().st_size == size - 100
    link = tmp_path / "link.npy"
    link.symlink_to(path)
    with pytest.raises(StagepipeError, match="is a symbolic link"):
        open_cache_file(link, shape, "float32")


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(mask_value=0), "mask_value 0.0 must be finite and <= -1000"),
    (lambda m: m.update(blocks=[]), "blocks is empty"),
    (lambda m: m.update(max_input_len=0), "field 'max_input_len'"),
    (lambda m: m.update(max_cache_len=4), "max_cache_len 4 is smaller than max_input_len 8"),
    (lambda m: m["blocks"][1].update(layer_start=3), r"blocks\[1\] .* does not continue"),
    (lambda m: m["model"].update(num_layers=6), "blocks cover layers 0..4, the model has 6"),
    (lambda m: m["graphs"]["decode"]["block0"].update(file="../x.onnx"), "not a plain relative path"),
    (lambda m: m["files"].update({"/etc/passwd": m["files"]["decode/embed.onnx"]}), "not a plain relative path"),
    (lambda m: m.update(cache_windows=[16, 8, 64]), "cache_windows"),
    (lambda m: m["graphs"]["prefill"].pop("output"), "has no output graph"),
])
def test_manifest_values_are_validated(sandbox, tmp_path, edit, message):
    from pipeline.core.jsonfile import load_manifest

    manifest = json.loads((sandbox.onnx / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StagepipeError, match=message):
        load_manifest(tmp_path)


def test_interrupted_conversions_are_cleaned_up_when_their_process_is_gone(sandbox, tmp_path):
    from pipeline.convert.onnx_dir import convert

    target = tmp_path / "onnx"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = [tmp_path / f".onnx.converting-{gone.pid}", tmp_path / f".onnx.old-{gone.pid}"]
        busy = tmp_path / f".onnx.converting-{alive.pid}"
        for d in (*left, busy):
            (d / "prefill").mkdir(parents=True)
        said = []
        convert(sandbox.root / "model", target, blocks=2, max_input_len=fc.T, max_cache_len=fc.C, log=said.append)
        assert not any(d.exists() for d in left) and busy.exists()
        assert sum("left by an interrupted conversion" in line for line in said) == 2
    finally:
        alive.kill()


def test_an_onnx_dir_changed_on_purpose_is_recorded_with_a_new_fingerprint(sandbox, tmp_path):
    from pipeline.convert.records import record
    from pipeline.core.jsonfile import load_manifest
    from pipeline.runtime.graph_files import GraphFiles

    onnx = tmp_path / "onnx"
    shutil.copytree(sandbox.onnx, onnx, copy_function=os.link)
    fc._flip_byte(onnx / "decode" / "output.data")  # a weights file edited by a tool of the user's
    with pytest.raises(StagepipeError, match=r"output.data: its content differs .* pipeline.convert.records"):
        GraphFiles(onnx, load_manifest(onnx)).check("decode/output.data")
    old, new = record(onnx)
    assert new.graphs_fingerprint != old.graphs_fingerprint  # runs made with the old weights are told apart
    GraphFiles(onnx, load_manifest(onnx)).check("decode/output.data")
    assert record(onnx)[1].graphs_fingerprint == new.graphs_fingerprint  # nothing changed since: the same
