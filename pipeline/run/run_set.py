"""Prompt sets: one resumable run folder per prompt, run side by side in processes on this machine or as Ray tasks.

    doit run_set --prompts prompts.jsonl --run_root runs/set [-n 2] [run_auto options: the defaults of every run]
    python -m pipeline.run_set --prompts prompts.jsonl --run_root runs/set [-n 2] [--ray local|ADDRESS]

prompts.jsonl holds one JSON object per line: {"prompt": "...", "chat": true, "steps": 16, "temperature": 0.7}; its
keys besides "prompt" (schemas/run.py PromptEntry) override the command's options for that prompt. Prompt i runs in
RUN_ROOT/run_000i (a plain run folder: inspect, compare and replay take it) as one run_auto call whose output goes
to RUN_ROOT/logs/run_000i.log, so a set resumes like a run: the same command again finishes what was unfinished
and finds the rest already complete. run_set.json records the prompts, set_summary.json how each run ended.

Locally the runs go to a process pool (concurrent.futures, a fresh process per run). With --ray they are Ray
tasks: on a Ray instance started here ("local") or on a cluster ("auto", "ray://HEAD:10001"), whose nodes must see
RUN_ROOT and the onnx_dir at the same paths (a shared filesystem) and import stagepipe.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import ValidationError

import pipeline
from pipeline.core import layout
from pipeline.core.atomic import write_text
from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import load_model_file
from pipeline.core.options import option
from pipeline.core.table import fmt_num, format_table
from pipeline.run.options import RunOptions
from schemas.run import PromptEntry, RunSetRecord, RunSummary, SetRunResult, SetSummary

# RunOptions a set sets per run itself; the others are every run's defaults
PER_RUN = ("prompt", "prompt_file", "run_root")


@dataclass(frozen=True)
class RunSetOptions:
    prompts: str = option("", "JSON Lines file: one {\"prompt\": ...} object per line (optional keys: chat, "
                              "no_think, steps, greedy, temperature, top_k, top_p, seed, ignore_eos)")
    run_root: str = option("runs/set", "the set's folder: run_0000, run_0001, ... one run folder per prompt")
    jobs: int = option(2, "runs at once on this machine (Ray: tasks in flight)", short="n")
    ray: str = option("", "run the prompts as Ray tasks: 'local' (a Ray instance in this process) or a cluster "
                          "address ('auto', 'ray://HEAD:10001'); needs pip install -e '.[ray]'")


def read_prompts(path: Path) -> list[PromptEntry]:
    """The prompts file's entries; a bad line is one error naming the line and the field."""
    from pipeline.core.cli_args import read_text_file

    if not str(path):
        raise StagepipeError("--prompts: give a JSON Lines file, one {\"prompt\": ...} object per line")
    entries = []
    for n, line in enumerate(read_text_file(Path(path), "--prompts").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(PromptEntry.model_validate_json(line))
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "(line)"
            raise StagepipeError(f"{path} line {n}: field '{field}': {err['msg']}; each line is one JSON object "
                                 "like {\"prompt\": \"...\", \"steps\": 16}") from None
    if not entries:
        raise StagepipeError(f"--prompts {path}: no prompts in it")
    return entries


def check_record(root: Path, entries: list[PromptEntry], clean: bool):
    """run_set.json: written on the first run; a rerun with other prompts is refused (runs are matched by number)."""
    path = root / layout.RUN_SET_JSON
    record = RunSetRecord(prompts=entries)
    if path.exists() and not clean and load_model_file(path, RunSetRecord).prompts != entries:
        raise StagepipeError(f"{path}: this set was made with other prompts; use another --run_root, or --clean "
                             "to start every run over")
    write_text(path, record.model_dump_json(indent=2, exclude_none=True) + "\n")


def run_options(base: RunOptions, entry: PromptEntry, run_dir: Path) -> RunOptions:
    own = entry.model_dump(exclude_none=True, exclude={"prompt"})
    return replace(base, **own, prompt=entry.prompt, prompt_file="", run_root=str(run_dir.resolve()))


def with_model_resolved(base: RunOptions) -> RunOptions:
    """Find or convert the model once, here, so the runs never convert side by side; they get its onnx_dir."""
    from pipeline.run.main import model_dir

    return replace(base, onnx_dir=str(model_dir(base).resolve()), model_path="", max_input_len=0, max_cache_len=0)


def run_one(options: RunOptions, log_path: str) -> int:
    """One prompt's run_auto in this process, its stdout and stderr appended to log_path; -> its exit code."""
    from pipeline.run.main import run_auto

    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            return run_auto(options)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class Progress:
    """One overall line on stderr: runs done, running, new tokens so far (step files), elapsed time."""

    def __init__(self, root: Path, total: int):
        self.root, self.total, self.started, self.shown = root, total, time.perf_counter(), ""
        self.tty = sys.stderr.isatty()

    def tokens(self) -> int:
        return sum(1 for _ in self.root.glob(f"run_*/step_*/{layout.NEXT_TOKEN_ID}"))

    def update(self, done: int, running: int, final: bool = False):
        line = f"[set {self.root}: {done}/{self.total} runs done, {running} running, {self.tokens()} tokens]"
        if line != self.shown:
            elapsed = f" {time.perf_counter() - self.started:.0f}s"
            print(("\r" if self.tty else "") + line + elapsed, end="" if self.tty else "\n", file=sys.stderr,
                  flush=True)
            self.shown = line
        if final and self.tty:
            print(file=sys.stderr)


def run_local(jobs: int, tasks: list[tuple[int, RunOptions, str]], progress: Progress) -> dict[int, int]:
    codes: dict[int, int] = {}
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold onnxruntime threads
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1)
    try:
        pending = {pool.submit(run_one, options, log): i for i, options, log in tasks}
        while pending:
            done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                codes[pending.pop(future)] = future.result()
            progress.update(len(codes), min(jobs, len(pending)))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return codes


def run_ray(address: str, jobs: int, tasks: list[tuple[int, RunOptions, str]], progress: Progress) -> dict[int, int]:
    """The same runs as Ray tasks (at most `jobs` in flight): Ray places them, on this machine or a cluster."""
    try:
        import ray
    except ImportError:
        raise StagepipeError("--ray: Ray is not installed; pip install -e '.[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
    # workers import this stagepipe (a checkout at the same path on every node, or an installed package)
    code_root = str(Path(pipeline.__file__).resolve().parents[1])
    remote = ray.remote(run_one).options(num_cpus=tasks[0][1].threads if tasks else 1,
                                         runtime_env={"env_vars": {"PYTHONPATH": code_root}})
    codes: dict[int, int] = {}
    queue, in_flight = list(tasks), {}
    while queue or in_flight:
        while queue and len(in_flight) < jobs:
            i, options, log = queue.pop(0)
            in_flight[remote.remote(options, log)] = i
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
        for ref in done:
            codes[in_flight.pop(ref)] = ray.get(ref)
        progress.update(len(codes), len(in_flight))
    return codes


def run_set(o: RunSetOptions, base: RunOptions) -> int:
    started = time.perf_counter()
    entries = read_prompts(Path(o.prompts))
    if o.jobs < 1:
        raise StagepipeError(f"-n/--jobs {o.jobs}: must be at least 1")
    root = Path(o.run_root)
    root.mkdir(parents=True, exist_ok=True)
    check_record(root, entries, base.clean)
    if not base.threads:  # runs side by side share the cores instead of each taking them all; a Ray task
        # takes the CPUs it reserves (--threads, default 1)
        base = replace(base, threads=1 if o.ray else max(1, (os.cpu_count() or 1) // min(o.jobs, len(entries))))
    base = with_model_resolved(base)
    tasks = [(i, run_options(base, e, root / layout.set_run_name(i)), str((root / layout.set_log_file(i)).resolve()))
             for i, e in enumerate(entries)]
    progress = Progress(root, len(tasks))
    where = f"Ray ({o.ray})" if o.ray else f"{min(o.jobs, len(tasks))} processes"
    print(f"[set {root}: {len(tasks)} prompts on {where}; logs in {root / layout.SET_LOGS}]", file=sys.stderr)
    codes = run_ray(o.ray, o.jobs, tasks, progress) if o.ray else run_local(o.jobs, tasks, progress)
    progress.update(len(codes), 0, final=True)
    summary = SetSummary(runs=[result(root, i, e, codes[i]) for i, e in enumerate(entries)],
                         seconds=time.perf_counter() - started)
    write_text(root / layout.SET_SUMMARY_JSON, summary.model_dump_json(indent=2) + "\n")
    print(summary_table(summary, root))
    return set_exit_code(list(codes.values()))


def result(root: Path, i: int, entry: PromptEntry, code: int) -> SetRunResult:
    path = root / layout.set_run_name(i) / layout.SUMMARY_JSON
    summary = load_model_file(path, RunSummary) if path.exists() else None
    return SetRunResult(run=layout.set_run_name(i), prompt=entry.prompt, exit_code=code, summary=summary)


def summary_table(s: SetSummary, root: Path) -> str:
    rows = []
    for r in s.runs:
        m = r.summary
        status = "ok" if r.exit_code == 0 else f"exit {r.exit_code} (see {layout.set_log_file(int(r.run[4:]))})"
        rows.append([r.run, status, _short(r.prompt, 32), len(m.prompt_token_ids) if m else None,
                     len(m.generated_token_ids) if m else None, m.stop_reason if m else None,
                     fmt_num(m.time_to_first_token_s) if m else None,
                     fmt_num(m.decode_tokens_per_s) if m else None, _short(m.text, 40) if m else None])
    table = format_table(["run", "status", "prompt", "prompt tok", "new tok", "stop", "TTFT s", "tok/s", "text"],
                         rows, right={3, 4, 6, 7})
    failed = sum(r.exit_code != 0 for r in s.runs)
    return f"{table}\n[set {root}: {len(s.runs) - failed} of {len(s.runs)} runs complete in {s.seconds:.1f}s; " \
           f"{layout.SET_SUMMARY_JSON} written]"


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[:n - 1] + "…")


def set_exit_code(codes: list[int]) -> int:
    """130 when a run was interrupted, else 2 for bad input, 1 for a failed task, 0 when every run finished."""
    for code in (130, 2, 1):
        if code in codes:
            return code
    return max(codes, default=0)


def main(argv=None) -> int:
    from pipeline.core.cli_args import ArgumentParser
    from pipeline.core.options import add_arguments

    p = ArgumentParser(prog="python -m pipeline.run_set", description=__doc__.split("\n")[0])
    add_arguments(p, RunSetOptions)
    add_arguments(p, RunOptions, skip=PER_RUN)
    return run_set_entry(vars(p.parse_args(argv)))


def run_set_entry(values: dict) -> int:
    from pipeline.core.options import from_values
    from pipeline.run.main import exit_code

    return exit_code(lambda: run_set(from_values(RunSetOptions, values), from_values(RunOptions, values)))


def run_set_action(**params):
    """doit action for `doit run_set`: the process exits with run_set's code."""
    code = run_set_entry(params)
    if code:
        sys.exit(code)
