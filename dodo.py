"""stagepipe tasks. `doit list` shows them; `doit help TASK` shows a task's options and their defaults.

    doit run_auto [--prompt ...]         generate through the stage pipeline (the demo model by default)
    doit run_set --prompts P.jsonl [-n 2]   one run folder per prompt, side by side (or on Ray: --ray)
    doit chat [--run_root runs/chat]     talk to the model in the terminal (a conversation over one KV cache)
    doit convert --model_path M --onnx_dir O [...]
    doit demo_model                      write the demo checkpoint to models/demo-qwen3
    doit inspect --path runs/demo        look inside a run, step or kv_cache folder
    doit serve [--runs runs] [--port 8000]   web pages on 127.0.0.1: browse runs, compare them, chat
    doit bench [--small]                 time run_auto against onnxruntime-genai

Task creators only describe; the work happens in the actions (pipeline.run.main, the tools' main functions),
so listing or asking for help never converts or writes anything.
"""
import sys

from pipeline.run import interrupts

interrupts.install()  # Ctrl-C from here on: one line and exit code 130, never a traceback

from doit import task_params  # noqa: E402

from pipeline.convert.options import ConvertOptions  # noqa: E402
from pipeline.core.options import doit_params, to_argv  # noqa: E402
from pipeline.run.chat import chat_params  # noqa: E402
from pipeline.run.doit_support import QuietReporter, friendly_task_option_errors  # noqa: E402
from pipeline.run.options import RunOptions  # noqa: E402
from pipeline.run.run_set import PER_RUN, RunSetOptions  # noqa: E402
from pipeline.web.options import ServeOptions  # noqa: E402

# doit's record of these tasks (they always run: it holds nothing a run needs). sqlite3 commits atomically and
# locks, so commands started side by side in this folder, or killed while saving, never leave it unreadable
# (the json backend rewrites its file in place). Each run keeps its own record in its run folder.
DOIT_CONFIG = {"default_tasks": ["run_auto"], "verbosity": 2, "reporter": QuietReporter, "backend": "sqlite3",
               "dep_file": ".doit-tasks.sqlite3"}
friendly_task_option_errors()


def _python_module(module: str, argv: list) -> dict:
    return {"actions": [[sys.executable, "-m", module, *map(str, argv)]], "uptodate": [False], "verbosity": 2}


@task_params(doit_params(RunOptions))
def task_run_auto(**params):
    """Generate through the stage pipeline: one task per (step, stage); resumes and branches from saved steps."""
    from pipeline.run.main import run_auto_action

    return {"actions": [(run_auto_action, [], params)], "uptodate": [False], "verbosity": 2}


@task_params(doit_params(RunSetOptions) + doit_params(RunOptions, skip=PER_RUN))
def task_run_set(**params):
    """Run a prompts.jsonl set: one resumable run folder per prompt, in parallel processes or on Ray."""
    from pipeline.run.run_set import run_set_action

    return {"actions": [(run_set_action, [], params)], "uptodate": [False], "verbosity": 2}
@task_params(chat_params())
def task_chat(**params):
    """Talk to the model in the terminal: each turn is steps over the run's KV cache (/exit, /reset, /save FILE)."""
    from pipeline.run.chat import chat_action

    return {"actions": [(interrupts.command(chat_action), [], params)], "uptodate": [False], "verbosity": 2}


@task_params(doit_params(ConvertOptions))
def task_convert(**params):
    """Convert a Qwen2/Qwen3 checkpoint to split static-shape ONNX graphs (python -m pipeline.convert)."""
    return _python_module("pipeline.convert", to_argv(ConvertOptions, params))


def task_demo_model():
    """Write the trained demo Qwen3 checkpoint (real Qwen tokenizer) to models/demo-qwen3."""
    return _python_module("pipeline.demo", ["--out", "models/demo-qwen3"])


@task_params([{"name": "path", "long": "path", "type": str, "default": "runs/demo",
               "help": "run, step or kv_cache folder (default: runs/demo)"},
              {"name": "json", "long": "json", "type": bool, "default": False, "help": "JSON instead of tables"}])
def task_inspect(path, json):
    """Show a run's steps and summary, or a step's tensors and meta.json (python -m pipeline.inspect)."""
    return _python_module("pipeline.inspect", [path] + (["--json"] if json else []))


@task_params(doit_params(ServeOptions))
def task_serve(**params):
    """Web pages on 127.0.0.1: the runs under --runs, their steps and tensors, compare views, chat (stagepipe serve)."""
    from pipeline.web.serve import serve_action

    return {"actions": [(serve_action, [], params)], "uptodate": [False], "verbosity": 2}


@task_params([{"name": "model_path", "long": "model_path", "type": str, "default": "",
               "help": "checkpoint (default: random Qwen3-0.6B-shaped models/bench-qwen3-0.6b, written if missing)"},
              {"name": "small", "long": "small", "type": bool, "default": False,
               "help": "the tiny demo checkpoint: a quick smoke run"},
              {"name": "new_tokens", "long": "new_tokens", "type": int, "default": 32, "help": "greedy new tokens"},
              {"name": "precision", "long": "precision", "type": str, "default": "fp32",
               "help": "fp32, fp16, int8 or int4 graphs"},
              {"name": "wait_idle", "long": "wait_idle", "type": float, "default": 0.0,
               "help": "seconds to wait for idle CPUs before each method (default 0: no wait)"},
              {"name": "prompt_len", "long": "prompt_len", "type": int, "default": 16, "help": "prompt tokens"},
              {"name": "repeat", "long": "repeat", "type": int, "default": 1, "help": "interleaved rounds (medians)"}])
def task_bench(model_path, small, new_tokens, precision, wait_idle, prompt_len, repeat):
    """Time run_auto vs the in-memory loop, by-hand stages and onnxruntime-genai (python -m benchmarks.bench)."""
    argv = ["--new_tokens", new_tokens, "--precision", precision, "--wait_idle", wait_idle, "--prompt_len", prompt_len,
            "--repeat", repeat] + (["--model_path", model_path] if model_path else [])
    return _python_module("benchmarks.bench", argv + (["--small"] if small else []))
