"""Time run_auto against the in-memory loop, the by-hand stage processes and onnxruntime-genai, on one checkpoint.

    python -m benchmarks.bench [--small | --model_path CKPT] [--new_tokens 32] [--precision fp32] [...]
    doit bench [--small] [--model_path CKPT] [--new_tokens 32] [--precision fp32]

Default checkpoint: a random-weight bf16 checkpoint shaped like Qwen3-0.6B (models/bench-qwen3-0.6b, written if
missing by benchmarks/convert_bench.py's writer, plus Qwen3 tokenizer files); --small uses the tiny demo checkpoint
(models/demo-qwen3) for a quick smoke run. The checkpoint is converted to onnx/bench-... unless that is current.
Then, for one prompt of --prompt_len tokens and --new_tokens greedy new tokens (end-of-sequence ignored), each
method runs in a fresh child process:

  run_auto    the real `python -m doit -f dodo.py run_auto ... --clean --ignore_eos` command; TTFT and decode tok/s
              from its summary.json (stage seconds as run_auto records them), plus the command's wall clock and
              the rates seen from outside (step file times, so doit/hashing/file overhead included)
  in-memory   pipeline.generate.generate with OnnxBackend; sessions created first and timed apart
  by-hand     one `python -m stages.*` process per stage per step (the README's by-hand path) for the prompt
              step and --hand_steps decode steps; decode tok/s is extrapolated from those steps
  genai       onnxruntime-genai (optional extra), its model built from the same checkpoint by its model builder
              (fp32 and int4), greedy search with min_length = max_length so it runs all the new tokens

Peak RSS is each command's own: a small stdlib-only launcher (`python -S`) forks and execs the command and takes
os.wait4's rusage of it (which also covers the processes the command waited for). Measuring from this process
instead would be wrong twice over: getrusage(RUSAGE_CHILDREN).ru_maxrss is the maximum over all children so far,
and Linux starts a child's ru_maxrss at the RSS of the process it was forked from, so every child would look at
least as big as this process (several GiB, had it written the checkpoint itself). The launcher adds <= ~10 MiB.
Results: a table on stdout and runs/bench/bench.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # python benchmarks/bench.py
    sys.path.insert(0, str(REPO))

from pipeline.core.cli_args import ArgumentParser  # noqa: E402
from pipeline.core import layout  # noqa: E402
from pipeline.core.atomic import write_json  # noqa: E402
from pipeline.core.errors import StagepipeError, cli_entry  # noqa: E402

BENCH_MODEL = Path("models/bench-qwen3-0.6b")
RUN_ROOT = Path("runs/bench")
MIB = 1 << 20
GENAI_EXTRA = ("pip install -e '.[bench]' (onnxruntime-genai>=0.18; its model builder also imports onnx-ir, torch "
               "and transformers)")
PROMPT_SOURCE = ("Large language models are neural networks trained on vast amounts of text to predict the next "
                 "word in a sentence. They learn grammar, facts about the world and some reasoning ability, and "
                 "can write, translate, summarize and answer questions about almost anything you ask them. Most "
                 "of them are built from a stack of transformer decoder layers that attend to earlier tokens.")


# -- the checkpoint ----------------------------------------------------------------------------------------------
def write_bench_checkpoint(out_dir) -> None:
    """benchmarks/convert_bench.py's random Qwen3-0.6B-shaped bf16 checkpoint, plus the Qwen3 tokenizer files
    (that checkpoint has none; run_auto tokenizes the prompt and the genai builder loads a tokenizer)."""
    from benchmarks.convert_bench import write_checkpoint
    from pipeline.demo.tokenizer_files import write_qwen3_tokenizer

    out_dir = Path(out_dir)
    if not (out_dir / "model.safetensors").exists():
        write_checkpoint(out_dir)
    if not (out_dir / "tokenizer.json").exists():
        write_qwen3_tokenizer(out_dir)


def ensure_checkpoint(a, log) -> Path:
    if a.small:
        from pipeline.demo.checkpoint import write_trained_demo
        from pipeline.run.model_source import DEMO_MODEL

        if write_trained_demo(DEMO_MODEL):
            log(f"wrote the demo checkpoint to {DEMO_MODEL}")
        return DEMO_MODEL
    path = Path(a.model_path) if a.model_path else BENCH_MODEL
    if a.model_path and path.resolve() != BENCH_MODEL.resolve():
        if not (path / "config.json").exists():
            raise StagepipeError(f"--model_path {path}: no config.json there")
    elif not (path / "config.json").exists() or not (path / "tokenizer.json").exists():
        log(f"writing a random Qwen3-0.6B-shaped bf16 checkpoint to {path} ...")
        # in a child: this process stays small (its children's RSS would start from its size)
        child = run_child([sys.executable, "-m", "benchmarks.bench", "--write_checkpoint", path],
                          RUN_ROOT / "logs" / "write_checkpoint.log", a.timeout)
        _require_ok(child, "writing the checkpoint")
        log(f"  done in {child.wall_s:.1f}s")
    return path


# -- child processes ---------------------------------------------------------------------------------------------
@dataclass
class Child:
    rc: int
    wall_s: float
    peak_rss_mib: float
    log: Path
    started_at: float  # time.time() just before the child was started
    cpu_s: float = 0.0  # user + system CPU seconds

    def tail(self, n=15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# Runs argv[2:] and writes its exit code, wall time and peak RSS (its wait4 rusage) to argv[1] as JSON. It imports
# only the standard library (run with -S), so the child it forks starts from a small RSS.
LAUNCHER = """
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
started_at, t0 = time.time(), time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "maxrss_kib": usage.ru_maxrss,
               "cpu_s": usage.ru_utime + usage.ru_stime, "started_at": started_at}, f)
"""


def run_child(cmd: list, log_path: Path, timeout_s: float, env=None) -> Child:
    """Run cmd in the repo with output to log_path: its exit code, wall time and own peak RSS (via LAUNCHER)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stats_path = log_path.with_name(log_path.name + ".rusage.json")
    stats_path.unlink(missing_ok=True)
    cmd = [str(c) for c in cmd]
    if not os.path.isabs(cmd[0]):
        cmd[0] = shutil.which(cmd[0]) or cmd[0]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(stats_path), *cmd], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

        def kill():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout_s, kill)
        timer.daemon = True
        timer.start()
        try:
            proc.wait()
        except BaseException:
            kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
    try:
        st = json.loads(stats_path.read_text())
    except (OSError, ValueError):  # killed (timeout) before it could write
        return Child(proc.returncode or -9, float(timeout_s), 0.0, log_path, time.time())
    return Child(st["rc"], st["wall_s"], st["maxrss_kib"] / 1024, log_path, st["started_at"], st["cpu_s"])


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes) or lost to the hypervisor (steal: a VM's
    vCPU left waiting while the host runs something else), from /proc/stat; 0.0 where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    # user, nice, system, irq, softirq and steal (fields 0-2, 5-7)
    return (sum(fields[:8]) - sum(fields[3:5])) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_s: float, log) -> bool:
    """Wait (at most max_s) until the CPUs were >= 90% idle over two 5-second windows in a row."""
    deadline, quiet, ncpu = time.monotonic() + max_s, 0, os.cpu_count() or 1
    said = False
    while time.monotonic() < deadline:
        b0 = busy_cpu_s()
        time.sleep(5)
        quiet = quiet + 1 if busy_cpu_s() - b0 < 0.1 * 5 * ncpu else 0
        if quiet >= 2:
            return True
        if not said:
            log(f"  waiting (up to {max_s:.0f}s) for other processes to leave the CPUs idle ...")
            said = True
    return max_s <= 0


def _require_ok(child: Child, what: str):
    if child.rc != 0:
        raise StagepipeError(f"{what} failed (exit {child.rc}); last lines of {child.log}:\n{child.tail()}")


# -- model folders -----------------------------------------------------------------------------------------------
def onnx_dir_for(model_path: Path, a) -> Path:
    kv = {"float16": "kv16", "float32": "kv32"}[a.kv_dtype]
    blocks = f"-b{a.blocks}" if a.blocks else ""
    windows = "" if a.cache_windows == "auto" else f"-w{a.cache_windows.replace(',', '_')}"
    name = model_path.name.removeprefix("bench-")
    return Path("onnx") / f"bench-{name}-{a.precision}-{kv}-T{a.max_input_len}-C{a.max_cache_len}{blocks}{windows}"


def ensure_onnx(model_path: Path, onnx_dir: Path, a, log) -> dict:
    from pipeline.convert.options import parse_cache_windows, resolve_cache_windows
    from pipeline.core.jsonfile import load_manifest
    from pipeline.convert.staleness import staleness

    windows = resolve_cache_windows(parse_cache_windows(a.cache_windows), a.max_input_len, a.max_cache_len)
    wanted = {"max_input_len": a.max_input_len, "max_cache_len": a.max_cache_len, "precision": a.precision,
              "kv_dtype": a.kv_dtype, "cache_windows": windows}
    reason = staleness(onnx_dir, model_path, wanted)
    if reason is None and a.blocks and len(load_manifest(onnx_dir).blocks) != a.blocks:
        reason = f"not {a.blocks} blocks"
    if reason is None and (model_path / layout.TOKENIZER_JSON).exists() and not (onnx_dir / layout.TOKENIZER_JSON).exists():
        reason = "converted before the checkpoint had tokenizer files"
    if reason is None:
        log(f"{onnx_dir} is current")
        return {"converted": False}
    log(f"converting {model_path} -> {onnx_dir} ({reason}) ...")
    cmd = [sys.executable, "-m", "pipeline.convert", "--model_path", model_path, "--onnx_dir", onnx_dir,
           "--max_input_len", a.max_input_len, "--max_cache_len", a.max_cache_len, "--precision", a.precision,
           "--kv_dtype", a.kv_dtype, "--cache_windows", a.cache_windows] + (["--blocks", a.blocks] if a.blocks else [])
    child = run_child(cmd, RUN_ROOT / "logs" / "convert.log", a.timeout)
    _require_ok(child, "pipeline.convert")
    log(f"  converted in {child.wall_s:.1f}s, peak RSS {child.peak_rss_mib:.0f} MiB")
    return {"converted": True, "convert_s": child.wall_s, "convert_peak_rss_mib": child.peak_rss_mib}


def model_sizes(onnx_dir: Path) -> dict:
    """Weight bytes of the graphs (each .data file once: decode/ links prefill/'s) and the run's KV cache bytes."""
    from pipeline.runtime.kv_cache import block_shape
    from pipeline.core.jsonfile import load_manifest

    m = load_manifest(onnx_dir)
    data_files, graph_files = {}, 0
    for stages in m.graphs.values():
        for spec in stages.values():
            graph_files += (onnx_dir / spec.file).stat().st_size
            for rel in spec.weights_files:
                data_files[Path(rel).name] = (onnx_dir / rel).stat().st_size
    itemsize = np.dtype(m.kv_dtype).itemsize
    kv = sum(2 * math.prod(block_shape(m, k)) * itemsize for k in range(len(m.blocks)))
    return {"weights_bytes": sum(data_files.values()), "kv_cache_bytes": kv, "graph_proto_bytes": graph_files,
            "weights_files": data_files, "blocks": len(m.blocks), "precision": m.precision, "kv_dtype": m.kv_dtype,
            "max_input_len": m.max_input_len, "max_cache_len": m.max_cache_len,
            "layers": m.model.num_layers, "hidden_size": m.model.hidden_size, "vocab_size": m.model.vocab_size}


def make_prompt(onnx_dir: Path, n: int) -> tuple[str, list[int]]:
    """A plain-English prompt of exactly n tokens (the text round-trips to the same ids)."""
    from pipeline.runtime.tokenizer import Tokenizer

    tok = Tokenizer.load(onnx_dir)
    words = " ".join([PROMPT_SOURCE] * (1 + n // 40)).split()
    for k in range(1, len(words) + 1):
        text = " ".join(words[:k])
        ids = tok.encode(text)
        if len(ids) == n:
            return text, ids
        if len(ids) > n:
            break
    ids = tok.encode(" ".join(words))[:n]
    text = tok.decode(ids)
    if tok.encode(text) != ids:
        raise StagepipeError(f"could not make a {n}-token prompt; try another --prompt_len")
    return text, ids


# -- methods -----------------------------------------------------------------------------------------------------
def _step_dirs(root: Path) -> list[Path]:
    from pipeline.core.layout import step_dirs

    return step_dirs(root)


def bench_run_auto(ctx) -> dict:
    a = ctx["args"]
    root = Path(a.runs_dir) / "run_auto"
    cmd = [sys.executable, "-m", "doit", "-f", "dodo.py", "run_auto", "--onnx_dir", ctx["onnx_dir"],
           "--run_root", root, "--clean", "--ignore_eos", "--steps", a.new_tokens, "--prompt", ctx["prompt"],
           "--provider", a.provider]
    child = run_child(cmd, RUN_ROOT / "logs" / "run_auto.log", a.timeout)
    _require_ok(child, "doit run_auto")
    s = json.loads((root / layout.SUMMARY_JSON).read_text())
    if s["prompt_token_ids"] != ctx["prompt_ids"]:
        raise StagepipeError(f"run_auto tokenized the prompt to {len(s['prompt_token_ids'])} other ids")
    n_chunks = -(-len(ctx["prompt_ids"]) // ctx["sizes"]["max_input_len"])
    stage_s: dict[str, list[float]] = {}
    step_s, token_times = [], []
    for d in _step_dirs(root):
        meta = json.loads((d / layout.META).read_text())
        seconds = {k: v["seconds"] for k, v in meta["stages"].items()}
        step_s.append(sum(seconds.values()))
        if int(d.name[5:]) >= n_chunks:
            for k, v in seconds.items():
                stage_s.setdefault(k, []).append(v)
        if (d / layout.NEXT_TOKEN_ID).exists():
            token_times.append((d / layout.NEXT_TOKEN_ID).stat().st_mtime)
    decode = step_s[n_chunks:]
    steady = decode[1:]  # the first decode step is the decode graphs' first run (and creates their sessions where
    # the backend opens sessions lazily)
    out = {"ttft_s": s["time_to_first_token_s"], "decode_tok_s": s["decode_tokens_per_s"],
           "peak_rss_mib": child.peak_rss_mib, "wall_s": child.wall_s, "cpu_s": child.cpu_s,
           "tokens": s["generated_token_ids"],
           "stop_reason": s["stop_reason"], "steps": s["steps"],
           "first_decode_step_s": decode[0] if decode else None,
           "steady_decode_tok_s": len(steady) / sum(steady) if steady and sum(steady) > 0 else None,
           "decode_stage_mean_s": {k: float(np.mean(v)) for k, v in stage_s.items()},
           "decode_stage_mean_s_excl_first": {k: float(np.mean(v[1:])) for k, v in stage_s.items() if len(v) > 1},
           "note": "TTFT and decode tok/s: summary.json (the sum of the steps' stage seconds, as run_auto records "
                   "them: not doit's bookkeeping between stages); wall_*: from outside, by file times"}
    if len(token_times) >= 2:  # from outside: the times next_token_id.txt files were written
        out["wall_ttft_s"] = token_times[0] - child.started_at
        out["wall_decode_tok_s"] = (len(token_times) - 1) / (token_times[-1] - token_times[0])
        per_step = np.diff(token_times)
        out["wall_decode_step_s"] = float(np.mean(per_step))
        if len(per_step) > 1:
            out["wall_steady_decode_tok_s"] = float(len(per_step) - 1) / float(np.sum(per_step[1:]))
    return out


def _worker_cmd(kind: str, spec: dict, name: str) -> tuple[list, Path]:
    spec_path = RUN_ROOT / "work" / f"{name}.spec.json"
    spec = dict(spec, result=str(RUN_ROOT / "work" / f"{name}.result.json"))
    Path(spec["result"]).unlink(missing_ok=True)
    write_json(spec_path, spec)
    return [sys.executable, "-m", "benchmarks.bench", "--worker", kind, "--spec", spec_path], Path(spec["result"])


def bench_in_memory(ctx) -> dict:
    a = ctx["args"]
    cmd, result = _worker_cmd("inmemory", {"onnx_dir": str(ctx["onnx_dir"]), "prompt_ids": ctx["prompt_ids"],
                                           "new_tokens": a.new_tokens, "threads": a.threads, "provider": a.provider,
                                           "warmup": a.warmup},
                                  "in_memory")
    child = run_child(cmd, RUN_ROOT / "logs" / "in_memory.log", a.timeout)
    _require_ok(child, "in-memory worker")
    return {**json.loads(result.read_text()), "peak_rss_mib": child.peak_rss_mib, "wall_s": child.wall_s,
            "cpu_s": child.cpu_s}


def bench_by_hand(ctx) -> dict:
    """The README's by-hand commands: one process per stage per step, for the prompt and a few decode steps."""
    a, onnx_dir = ctx["args"], ctx["onnx_dir"]
    root = Path(a.runs_dir) / "by_hand"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ids_file = root / "prompt_ids.txt"
    ids_file.write_text(" ".join(map(str, ctx["prompt_ids"])) + "\n")
    T, n_blocks = ctx["sizes"]["max_input_len"], ctx["sizes"]["blocks"]
    n_prompt = len(ctx["prompt_ids"])
    n_chunks = -(-n_prompt // T)
    decode_steps = max(0, min(a.hand_steps, a.new_tokens - 1))
    common = ["--onnx_dir", onnx_dir, "--provider", a.provider]
    step_walls, peak, stage_walls, tokens, cpu = [], 0.0, {}, [], 0.0
    for s in range(n_chunks + decode_steps):
        step = root / layout.step_name(s)
        if s < n_chunks:
            embed = ["--past_len", s * T, "--tokens_file", ids_file]
        else:
            embed = ["--past_len", n_prompt + s - n_chunks, "--prev_step", root / layout.step_name(s - 1)]
        procs = [("embed", "token_embed", embed)]
        procs += [(f"block{k}", "block", ["--block", k, "--kv_dir", root / layout.KV_DIR]) for k in range(n_blocks)]
        procs.append(("output", "output", []))
        wall = 0.0
        for name, module, args in procs:
            child = run_child([sys.executable, "-m", f"stages.{module}", "--step_dir", step, *common, *args],
                              RUN_ROOT / "logs" / "by_hand" / f"{step.name}_{name}.log", a.timeout)
            _require_ok(child, f"stages.{module} ({step.name})")
            wall += child.wall_s
            cpu += child.cpu_s
            peak = max(peak, child.peak_rss_mib)
            if s >= n_chunks:
                stage_walls.setdefault(name, []).append(child.wall_s)
        step_walls.append(wall)
        if (step / layout.NEXT_TOKEN_ID).exists():
            tokens.append(layout.read_token_file(step / layout.NEXT_TOKEN_ID))
    decode_wall = sum(step_walls[n_chunks:])
    return {"ttft_s": sum(step_walls[:n_chunks]), "decode_tok_s": decode_steps / decode_wall if decode_wall else None,
            "peak_rss_mib": peak, "wall_s": sum(step_walls), "cpu_s": cpu, "tokens": tokens,
            "decode_steps_timed": decode_steps,
            "processes": len(step_walls) * (n_blocks + 2),
            "decode_stage_mean_s": {k: float(np.mean(v)) for k, v in stage_walls.items()},
            "note": f"one process per stage per step; decode tok/s extrapolated from {decode_steps} decode steps; "
                    "peak RSS is the largest single stage process"}


def stage_hf_dir(model_path: Path) -> Path:
    """The checkpoint as the genai builder reads it: links to its files, plus Qwen3 tokenizer files if it has none."""
    from pipeline.demo.tokenizer_files import write_qwen3_tokenizer

    src = RUN_ROOT / "genai_src" / model_path.name
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for f in sorted(model_path.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            os.symlink(f.resolve(), src / f.name)
    if not (src / "tokenizer.json").exists():
        write_qwen3_tokenizer(src)
    return src


def _source_stamp(model_path: Path, precision: str, provider: str) -> dict:
    files = sorted(p for p in model_path.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file())
    return {"source": str(model_path.resolve()), "precision": precision, "provider": provider,
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def ensure_genai_model(model_path: Path, precision: str, a, log) -> tuple[Path, dict]:
    suffix = "" if a.provider == "cpu" else f"-{a.provider}"
    out = Path("onnx") / f"bench-genai-{model_path.name.removeprefix('bench-')}-{precision}{suffix}"
    stamp_path = out / "stagepipe_bench_source.json"
    stamp = _source_stamp(model_path, precision, a.provider)
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        log(f"{out} is current")
        return out, {"built": False}
    log(f"building the onnxruntime-genai model {out} ({precision}) with its model builder ...")
    src = stage_hf_dir(model_path)
    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", src, "-o", tmp, "-p", precision,
           "-e", a.provider, "-c", RUN_ROOT / "genai_cache"]
    child = run_child(cmd, RUN_ROOT / "logs" / f"genai_build_{precision}.log", a.timeout)
    _require_ok(child, f"onnxruntime-genai model builder ({precision})")
    write_json(tmp / stamp_path.name, stamp)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx"))
    log(f"  built in {child.wall_s:.1f}s (peak RSS {child.peak_rss_mib:.0f} MiB, model {size / MIB:.0f} MiB)")
    return out, {"built": True, "build_s": child.wall_s, "build_peak_rss_mib": child.peak_rss_mib}


def bench_genai(ctx, precision: str) -> dict:
    a, log = ctx["args"], ctx["log"]
    genai_dir, build = ensure_genai_model(ctx["model_path"], precision, a, log)
    cmd, result = _worker_cmd("genai", {"genai_dir": str(genai_dir), "prompt_ids": ctx["prompt_ids"],
                                        "new_tokens": a.new_tokens, "warmup": a.warmup}, f"genai_{precision}")
    child = run_child(cmd, RUN_ROOT / "logs" / f"genai_{precision}.log", a.timeout)
    _require_ok(child, f"genai {precision} worker")
    size = sum(p.stat().st_size for p in genai_dir.iterdir() if p.name.startswith("model.onnx"))
    return {**json.loads(result.read_text()), "peak_rss_mib": child.peak_rss_mib, "wall_s": child.wall_s,
            "cpu_s": child.cpu_s, "model_dir": str(genai_dir), "model_bytes": size, **build}


# -- workers (run inside the child processes) --------------------------------------------------------------------
def worker_in_memory(spec: dict) -> dict:
    from pipeline.runtime.backends import OnnxBackend
    from pipeline.runtime.generate import generate, generation_steps
    from pipeline.runtime.sampling import SamplingSettings

    t = time.perf_counter()
    backend = OnnxBackend(Path(spec["onnx_dir"]), provider=spec.get("provider", "cpu"), threads=spec.get("threads", 0),
                          process_pool=True)  # as run_auto's
    m = backend.manifest
    backend.open_all(generation_steps(m, len(spec["prompt_ids"]), spec["new_tokens"]))  # as run_auto does
    session_s = time.perf_counter() - t
    stamps = []
    timed_output = backend.output

    def output(hidden):
        logits = timed_output(hidden)
        stamps.append(time.perf_counter())
        return logits

    backend.output = output
    ids = spec["prompt_ids"]
    if spec.get("warmup"):  # one untimed generation first: first-run costs (CUDA kernels, handles) kept out
        generate(backend, ids, 2, SamplingSettings(greedy=True), stop_ids=frozenset())
        stamps.clear()
    t0 = time.perf_counter()
    tokens = generate(backend, ids, spec["new_tokens"], SamplingSettings(greedy=True), stop_ids=frozenset())
    t_end = time.perf_counter()
    n_chunks = -(-len(ids) // m.max_input_len)
    first = stamps[n_chunks - 1]
    decode_s = t_end - first
    return {"ttft_s": first - t0, "decode_tok_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 else None,
            "setup_s": session_s, "tokens": tokens,
            "note": "sessions (prefill + decode graphs) created before timing; setup_s is that"}


def worker_genai(spec: dict) -> dict:
    import onnxruntime_genai as og

    t = time.perf_counter()
    model = og.Model(spec["genai_dir"])
    load_s = time.perf_counter() - t
    ids, n = spec["prompt_ids"], spec["new_tokens"]
    total = len(ids) + n
    if spec.get("warmup"):  # as the in-memory worker: one untimed short generation first
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + 2, min_length=len(ids) + 2)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray([ids], dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
    t0 = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([ids], dtype=np.int32))  # the prompt's forward pass
    gen.generate_next_token()  # picks the first new token from those logits
    t1 = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()  # forward pass of the previous token, then pick the next
    t2 = time.perf_counter()
    tokens = [int(x) for x in gen.get_sequence(0)[len(ids):]]
    return {"ttft_s": t1 - t0, "decode_tok_s": (len(tokens) - 1) / (t2 - t1) if len(tokens) > 1 else None,
            "setup_s": load_s, "tokens": tokens, "genai_version": getattr(og, "__version__", "?"),
            "note": "og.Model load timed apart (setup_s); greedy, min_length = max_length"}


WORKERS = {"inmemory": worker_in_memory, "genai": worker_genai}


# -- report ------------------------------------------------------------------------------------------------------
def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def _ratio(a, b):
    return a / b if a is not None and b else None


def _fx(x):
    return "-" if x is None else f"{x:.3f}x" if x < 0.1 else f"{x:.2f}x"


def _agree(tokens, ref) -> str:
    if not tokens or not ref:
        return "-"
    n = min(len(tokens), len(ref))
    same = next((i for i in range(n) if tokens[i] != ref[i]), n)
    return f"{same}/{n}"


def report(results: dict, sizes: dict, lines: list):
    ra = results.get("run_auto", {})
    gp = sizes["precision"]  # compare with genai at the same precision
    gf = results.get(f"genai_{gp}", {})
    rows = []
    labels = {"run_auto": "run_auto (doit, summary.json)", "in_memory": "in-memory generate()",
              "by_hand": "by-hand stage processes", "genai_fp32": "onnxruntime-genai fp32",
              "genai_fp16": "onnxruntime-genai fp16", "genai_int4": "onnxruntime-genai int4"}
    for key, label in labels.items():
        r = results.get(key)
        if r is None:
            continue
        if "error" in r or "skipped" in r:
            rows.append((label, r.get("error") or r.get("skipped")))
            continue
        if key == "by_hand":
            label += f" ({r['decode_steps_timed']} decode steps, extrapolated)"
        rows.append((label, r))
        if key == "run_auto" and "wall_decode_tok_s" in r:
            rows.append(("run_auto, seen from outside (file times)",
                         {"ttft_s": r["wall_ttft_s"], "decode_tok_s": r["wall_decode_tok_s"],
                          "peak_rss_mib": None, "wall_s": None, "tokens": None}))

    def prefill_rate(r):  # prompt tokens per second of time to first token
        return sizes["prompt_tokens"] / r["ttft_s"] if sizes.get("prompt_tokens") and r.get("ttft_s") else None

    header = (f"{'method':<56} {'TTFT s':>8} {'prefill tok/s':>13} {'decode tok/s':>12} {'peak RSS MiB':>12} {'wall s':>8} {'CPU s':>7}"
              f" {'setup s':>8} {'tok/s vs genai':>14} {'TTFT vs genai':>13} {'tokens=run_auto':>15}")
    lines += [header, "-" * len(header)]
    for label, r in rows:
        if isinstance(r, str):
            lines.append(f"{label:<56} {r}")
            continue
        lines.append(f"{label:<56} {_f(r['ttft_s']):>8} {_f(prefill_rate(r), '{:.1f}'):>13} "
                     f"{_f(r['decode_tok_s'], '{:.2f}'):>12} "
                     f"{_f(r['peak_rss_mib'], '{:.0f}'):>12} {_f(r.get('wall_s'), '{:.1f}'):>8} "
                     f"{_f(r.get('cpu_s'), '{:.1f}'):>7} "
                     f"{_f(r.get('setup_s'), '{:.2f}'):>8} "
                     f"{_fx(_ratio(r['decode_tok_s'], gf.get('decode_tok_s'))):>14} "
                     f"{_fx(_ratio(r['ttft_s'], gf.get('ttft_s'))):>13} "
                     f"{_agree(r.get('tokens'), ra.get('tokens')):>15}")
    busy = [(labels[k], r["other_cpu_share"]) for k, r in results.items() if r.get("other_cpu_share", 0) > BUSY_SHARE]
    if busy:
        lines.append("note: other processes (or the hypervisor) kept the CPUs busy during "
                     + ", ".join(f"{k} ({v:.0%})" for k, v in busy)
                     + ": those timings are slowed by them (rerun on an idle machine)")
    repeated = {k: r["repeats"] for k, r in results.items() if r.get("repeats")}
    if repeated:
        lines.append(f"medians of {len(next(iter(repeated.values())))} interleaved rounds; per round (TTFT s / "
                     "decode tok/s):")
        lines += [f"  {labels[k]}: " + ", ".join(f"{_f(x['ttft_s'])}/{_f(x['decode_tok_s'], '{:.2f}')}" for x in v)
                  for k, v in repeated.items()]
    w, kv = sizes["weights_bytes"], sizes["kv_cache_bytes"]
    lines += ["", f"graph weights {w / MIB:.0f} MiB (each .data file once) + KV cache {kv / MIB:.0f} MiB "
                  f"({sizes['blocks']} blocks, C={sizes['max_cache_len']}, {sizes['kv_dtype']}) = "
                  f"{(w + kv) / MIB:.0f} MiB; 1.3x = {1.3 * (w + kv) / MIB:.0f} MiB"]
    if "steady_decode_tok_s" in ra:
        lines.append(f"run_auto: first decode step {_f(ra['first_decode_step_s'])}s (the decode graphs' first run); "
                     f"decode excluding it {_f(ra['steady_decode_tok_s'], '{:.2f}')} tok/s (stage seconds), "
                     f"{_f(ra.get('wall_steady_decode_tok_s'), '{:.2f}')} tok/s (file times)")
        per = ra.get("decode_stage_mean_s_excl_first") or ra["decode_stage_mean_s"]
        lines.append("run_auto decode stage seconds (mean, excl. first decode step): "
                     + ", ".join(f"{k} {v * 1000:.1f}ms" for k, v in per.items())
                     + f"; step total {sum(per.values()) * 1000:.1f}ms vs {_f(ra.get('wall_decode_step_s'), '{:.4f}')}"
                     "s per step seen from outside")
    bh = results.get("by_hand", {})
    if "decode_stage_mean_s" in bh:
        lines.append("by-hand decode process wall seconds (mean): "
                     + ", ".join(f"{k} {v:.2f}s" for k, v in bh["decode_stage_mean_s"].items()))
    targets = {}

    def target(name, ok, text):
        targets[name] = {"met": ok, "detail": text}
        lines.append(f"  [{'MET' if ok else 'NOT MET' if ok is False else 'n/a'}] {name}: {text}")

    if sizes.get("small"):  # the tiny smoke model says nothing about targets set for the 0.6B shape
        return targets
    lines += ["", "targets:"]
    rd, gd = ra.get("decode_tok_s"), gf.get("decode_tok_s")
    if rd and gd:
        target("decode", rd >= 0.9 * gd, f"run_auto {rd:.2f} tok/s vs 0.9 x genai {gp} {gd:.2f} = {0.9 * gd:.2f}")
    else:
        target("decode", None, f"needs run_auto and genai {gp} results")
    rt, gt = ra.get("ttft_s"), gf.get("ttft_s")
    # a long prompt (4+ chunks; 480 tokens at T=16) must not be slower than genai's one big prefill
    limit = 1.0 if sizes.get("prompt_tokens", 0) >= 4 * sizes["max_input_len"] else 1.2
    if rt and gt:
        target("ttft", rt <= limit * gt, f"run_auto {rt:.3f}s vs {limit} x genai {gp} {gt:.3f}s = {limit * gt:.3f}s")
    else:
        target("ttft", None, f"needs run_auto and genai {gp} results")
    hd = bh.get("decode_tok_s")
    if rd and hd:
        target("vs_by_hand", rd >= 20 * hd, f"run_auto decode {rd:.2f} tok/s = {rd / hd:.1f}x by-hand "
                                            f"{hd:.3f} tok/s (need >= 20x); TTFT {bh['ttft_s'] / rt:.1f}x faster")
    else:
        target("vs_by_hand", None, "needs run_auto and by-hand results")
    rp = ra.get("peak_rss_mib")
    if rp:
        limit = 1.3 * (w + kv) / MIB
        target("memory", rp <= limit, f"run_auto peak RSS {rp:.0f} MiB vs 1.3 x (weights + KV cache) = {limit:.0f} MiB"
                                      f" ({rp * MIB / (w + kv):.2f}x)")
    else:
        target("memory", None, "needs the run_auto result")
    return targets


# -- main --------------------------------------------------------------------------------------------------------
BUSY_SHARE = 0.10  # a method during which other processes took more of the CPUs than this is rerun (--retries)


def measure(runner, ctx, log) -> dict:
    """One method's result, with how much CPU other processes took meanwhile (they slow the timings)."""
    busy0, own0, t0 = busy_cpu_s(), time.process_time(), time.perf_counter()
    try:
        r = runner(ctx)
    except StagepipeError as e:
        log(f"  failed: {e}")
        return {"error": str(e).splitlines()[0]}
    span = time.perf_counter() - t0
    # what the machine spent busy, less this process and the method's own processes
    other = max(0.0, busy_cpu_s() - busy0 - (time.process_time() - own0) - r.get("cpu_s", 0.0))
    r["other_cpu_s"], r["other_cpu_share"] = other, other / (span * (os.cpu_count() or 1))
    log(f"  TTFT {_f(r['ttft_s'])}s, decode {_f(r['decode_tok_s'], '{:.2f}')} tok/s, peak RSS "
        f"{r['peak_rss_mib']:.0f} MiB, wall {r['wall_s']:.1f}s; other processes (or the hypervisor) took "
        f"{r['other_cpu_share']:.0%} of the CPUs meanwhile")
    return r


def combine_repeats(runs: list[dict]) -> dict:
    """One method's result over --repeat runs: TTFT and decode tok/s are the medians, peak RSS the largest; the
    other fields come from the run with the median decode rate."""
    ok = sorted((r for r in runs if r.get("decode_tok_s") is not None), key=lambda r: r["decode_tok_s"])
    if len(runs) == 1 or not ok:
        return runs[-1]
    out = dict(ok[(len(ok) - 1) // 2])
    ttfts = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    out |= {"ttft_s": float(np.median(ttfts)) if ttfts else None,
            "decode_tok_s": float(np.median([r["decode_tok_s"] for r in ok])),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
            "repeats": [{k: r.get(k) for k in ("ttft_s", "decode_tok_s", "peak_rss_mib")} for r in runs]}
    return out


METHODS = ("run_auto", "in_memory", "by_hand", "genai_fp32", "genai_fp16", "genai_int4")
DEFAULT_METHODS = ("run_auto", "in_memory", "by_hand", "genai_fp32", "genai_int4")


def parse_args(argv):
    p = ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model_path", default="", help=f"HF checkpoint (default {BENCH_MODEL}, written if missing)")
    p.add_argument("--small", action="store_true", help="the tiny demo checkpoint (models/demo-qwen3): a smoke run")
    p.add_argument("--onnx_dir", default="", help="converted folder (default onnx/bench-<model>-<settings>)")
    p.add_argument("--prompt_len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--new_tokens", type=int, default=32, help="greedy new tokens (default 32)")
    p.add_argument("--max_input_len", type=int, default=16)
    p.add_argument("--max_cache_len", type=int, default=1024)
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4"], default="fp32",
                   help="the converted graphs' precision; the 'vs genai' ratios and targets use genai at the same "
                        "precision (genai_fp32, genai_fp16 or genai_int4)")
    p.add_argument("--kv_dtype", choices=["auto", "float16", "float32"], default="auto",
                   help="as pipeline.convert's (auto: float16 for fp16, else float32)")
    p.add_argument("--cache_windows", default="auto", help="as pipeline.convert's: auto, none or 128,256,512")
    p.add_argument("--blocks", type=int, default=0, help="decoder blocks (default: the converter's, 4)")
    p.add_argument("--hand_steps", type=int, default=4, help="decode steps timed by hand (default 4)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="onnxruntime execution provider for every method (cuda: onnxruntime-gpu and, for genai, "
                        "onnxruntime-genai-cuda)")
    p.add_argument("--warmup", action="store_true",
                   help="in-memory and genai: one untimed short generation before the timed one (run_auto and "
                        "by-hand are whole commands and always pay their first run)")
    p.add_argument("--threads", type=int, default=0, help="in-memory loop's intra-op threads (0: onnxruntime's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds any one child process may take")
    p.add_argument("--wait_idle", type=float, default=0,
                   help="before each method wait up to this many seconds for idle CPUs (default 0: do not wait)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of all methods, interleaved; TTFT and tok/s are then the medians (this VM's speed "
                        "drifted by ~25%% between minutes, so one round can compare a fast minute with a slow one)")
    p.add_argument("--retries", type=int, default=2,
                   help=f"rerun a method up to this many times if other processes (or the hypervisor) took more than "
                        f"{BUSY_SHARE * 100:.0f}%% of the CPUs")
    p.add_argument("--runs_dir", default=str(RUN_ROOT),
                   help="where run_auto and the by-hand stages write their run folders (default runs/bench); "
                        "a tmpfs such as /dev/shm/stagepipe-bench takes the disk out of their timings")
    p.add_argument("--out", default=str(RUN_ROOT / "bench.json"), help="results JSON")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    p.add_argument("--write_checkpoint", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def filesystem_of(path: Path) -> str:
    """The type of the filesystem `path` is on (Linux /proc/mounts; 'unknown' elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    best, fs = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, kind = line.split()[:3]
            if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, fs = mount, kind
    except OSError:
        pass
    return fs


# the SIMD extensions onnxruntime's CPU kernels pick their code paths by (int8/int4 results differ between them)
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")


def cpu_info() -> dict:
    """The CPU model and which of CPU_FLAGS it has (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", "?"), "flags": [f for f in CPU_FLAGS if f in flags]}


def _versions() -> dict:
    import onnxruntime

    v = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
         "onnxruntime_providers": onnxruntime.get_available_providers(),
         "cpu_count": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
         "cpu": cpu_info()}
    try:
        import onnxruntime_genai

        v["onnxruntime_genai"] = getattr(onnxruntime_genai, "__version__", "?")
    except ImportError:
        v["onnxruntime_genai"] = None
    return v


def _code_state() -> dict:
    """The commit measured, and which files differed from it (the numbers belong to that code)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"),
            "changed": git("status", "--porcelain", "--", "pipeline", "stages", "schemas", "dodo.py").splitlines()}


def _genai_missing() -> str | None:
    import importlib.util

    for mod in ("onnxruntime_genai", "onnx_ir", "torch", "transformers"):
        if importlib.util.find_spec(mod) is None:
            return f"skipped: {mod} not importable; install the optional extra: {GENAI_EXTRA}"
    return None


@cli_entry
def main(argv=None):
    a = parse_args(argv)
    if a.kv_dtype == "auto":
        from pipeline.convert.options import default_kv_dtype

        a.kv_dtype = default_kv_dtype(a.precision)
    if a.write_checkpoint:
        write_bench_checkpoint(a.write_checkpoint)
        return 0
    if a.worker:
        spec = json.loads(Path(a.spec).read_text())
        write_json(spec["result"], WORKERS[a.worker](spec))
        return 0
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise StagepipeError(f"--methods: unknown {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    if a.new_tokens < 2:
        raise StagepipeError("--new_tokens must be at least 2 (one prefill token and one decode step)")
    if a.provider == "cuda":  # before any work: converting and timing on a machine without CUDA wastes minutes
        from pipeline.runtime.backends import onnx_providers

        onnx_providers("cuda")
    if a.model_path:
        a.model_path = str(Path(a.model_path).resolve())
    out_path = Path(a.out).resolve()
    a.runs_dir = str(Path(a.runs_dir).resolve())
    onnx_arg = Path(a.onnx_dir).resolve() if a.onnx_dir else None
    os.chdir(REPO)

    def log(msg):
        print(msg, flush=True)

    model_path = ensure_checkpoint(a, log)
    model_path = Path(os.path.relpath(model_path.resolve(), REPO)) if model_path.resolve().is_relative_to(REPO) \
        else model_path.resolve()
    onnx_dir = onnx_arg or onnx_dir_for(model_path, a)
    if onnx_dir.is_absolute() and onnx_dir.is_relative_to(REPO):
        onnx_dir = Path(os.path.relpath(onnx_dir, REPO))
    convert_info = ensure_onnx(model_path.resolve(), onnx_dir, a, log)
    sizes = model_sizes(onnx_dir)
    prompt, ids = make_prompt(onnx_dir, a.prompt_len)
    sizes["prompt_tokens"] = len(ids)
    if len(ids) + a.new_tokens > sizes["max_cache_len"]:
        raise StagepipeError(f"{len(ids)} prompt + {a.new_tokens} new tokens do not fit the "
                             f"{sizes['max_cache_len']}-slot cache")
    log(f"model {model_path} -> {onnx_dir}: {sizes['layers']} layers in {sizes['blocks']} blocks, hidden "
        f"{sizes['hidden_size']}, {sizes['precision']}, KV {sizes['kv_dtype']}, T={sizes['max_input_len']}, "
        f"C={sizes['max_cache_len']}")
    log(f"prompt ({len(ids)} tokens): {prompt!r}; {a.new_tokens} greedy new tokens, EOS ignored")
    ctx = {"args": a, "log": log, "model_path": model_path, "onnx_dir": onnx_dir, "sizes": sizes,
           "prompt": prompt, "prompt_ids": ids}
    runners = {"run_auto": bench_run_auto, "in_memory": bench_in_memory, "by_hand": bench_by_hand,
               "genai_fp32": lambda c: bench_genai(c, "fp32"), "genai_fp16": lambda c: bench_genai(c, "fp16"),
               "genai_int4": lambda c: bench_genai(c, "int4")}
    genai_missing = _genai_missing()
    code = _code_state()
    runs, results = {}, {}
    for round_ in range(a.repeat):  # rounds of every method, interleaved: slow drifts of the VM hit all alike
        if a.repeat > 1:
            log(f"round {round_ + 1}/{a.repeat}")
        for name in METHODS:
            if name not in methods:
                continue
            if name.startswith("genai") and genai_missing:
                results[name] = {"skipped": genai_missing}
                if not round_:
                    log(f"{name}: {genai_missing}")
                continue
            for attempt in range(1 + a.retries):
                log(f"{name} ..." + (f" (again: other processes were busy, attempt {attempt + 1})" if attempt else ""))
                if a.wait_idle > 0:
                    wait_for_idle(a.wait_idle, log)
                r = measure(runners[name], ctx, log)
                if r.get("other_cpu_share", 0) <= BUSY_SHARE or attempt == a.retries:
                    runs.setdefault(name, []).append(r)
                    break
    results |= {name: combine_repeats(method_runs) for name, method_runs in runs.items()}
    runs_fs, cpu = filesystem_of(Path(a.runs_dir)), cpu_info()
    lines = ["", f"stagepipe benchmark: {model_path} ({sizes['layers']} layers, hidden {sizes['hidden_size']}), "
                 f"{len(ids)}-token prompt, {a.new_tokens} new tokens, {os.cpu_count()} CPUs "
                 f"({cpu.get('model', '?')}, {' '.join(cpu.get('flags', []))}); run folders on "
                 f"{runs_fs} ({a.runs_dir})"]
    targets = report(results, sizes | {"small": a.small}, lines)
    print("\n".join(lines), flush=True)
    write_json(out_path, {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(), "code": code,
                          "model_path": str(model_path), "onnx_dir": str(onnx_dir), "settings": vars(a) | {
                              "worker": None}, "prompt": prompt, "prompt_token_ids": ids, "sizes": sizes,
                          "convert": convert_info, "runs_filesystem": runs_fs, "results": results,
                          "targets": targets, "table": lines})
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    main()
