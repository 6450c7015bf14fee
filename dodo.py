"""stagepipe tasks. `doit list` shows them; `doit help TASK` shows a task's options.

    doit demo_model                      random-weight Qwen3 checkpoint in models/demo-qwen3
    doit convert --model_path M --onnx_dir O [...]
    doit run_auto [--prompt ...]         generate through the stage pipeline, one task per (step, stage)
"""
import sys

from doit import create_after, task_params

from pipeline.run.doit_support import StepReporter, TolerantMD5Checker, dep_file_for, exit_on_error

DOIT_CONFIG = {
    "default_tasks": ["run_auto"],
    "reporter": StepReporter,
    "check_file_uptodate": TolerantMD5Checker,
    "dep_file": dep_file_for(sys.argv),  # each run folder keeps its own doit record
    "backend": "json",
}


def task_demo_model():
    """Write the random-weight demo Qwen3 checkpoint (real Qwen tokenizer) to models/demo-qwen3."""
    from pipeline.demo.checkpoint import write_demo_checkpoint
    from pipeline.run.model_source import DEMO_MODEL

    return {"actions": [(write_demo_checkpoint, [DEMO_MODEL])], "uptodate": [False], "verbosity": 2}


CONVERT_PARAMS = [
    {"name": "model_path", "long": "model_path", "type": str, "default": "", "help": "HF checkpoint folder"},
    {"name": "onnx_dir", "long": "onnx_dir", "type": str, "default": "", "help": "output folder"},
    {"name": "blocks", "long": "blocks", "type": int, "default": 0, "help": "decoder blocks (default 4)"},
    {"name": "layer_split", "long": "layer_split", "type": str, "default": "", "help": "layers per block: 7,7,7,7"},
    {"name": "max_input_len", "long": "max_input_len", "type": int, "default": 16, "help": "prefill tokens T"},
    {"name": "max_cache_len", "long": "max_cache_len", "type": int, "default": 1024, "help": "KV cache slots C"},
    {"name": "precision", "long": "precision", "type": str, "default": "fp32", "help": "fp32, fp16, int8 or int4"},
    {"name": "kv_dtype", "long": "kv_dtype", "type": str, "default": "auto", "help": "auto, float16 or float32"},
    {"name": "cache_windows", "long": "cache_windows", "type": str, "default": "auto",
     "help": "attention windows with block graphs: auto, none or 128,256,512"},
]


@task_params(CONVERT_PARAMS)
def task_convert(model_path, onnx_dir, blocks, layer_split, max_input_len, max_cache_len, precision, kv_dtype,
                 cache_windows):
    """Convert a Qwen2/Qwen3 checkpoint to split static-shape ONNX graphs (python -m pipeline.convert)."""
    argv = ["--model_path", model_path, "--onnx_dir", onnx_dir, "--max_input_len", str(max_input_len),
            "--max_cache_len", str(max_cache_len), "--precision", precision, "--kv_dtype", kv_dtype,
            "--cache_windows", cache_windows]
    argv += ["--blocks", str(blocks)] if blocks else []
    argv += ["--layer_split", layer_split] if layer_split else []
    return {"actions": [[sys.executable, "-m", "pipeline.convert", *argv]], "uptodate": [False], "verbosity": 2}


RUN_PARAMS = [
    {"name": "prompt", "long": "prompt", "type": str, "default": "", "help": "prompt text (default: a demo prompt)"},
    {"name": "model_path", "long": "model_path", "type": str, "default": "", "help": "checkpoint: converts if needed"},
    {"name": "onnx_dir", "long": "onnx_dir", "type": str, "default": "", "help": "converted model folder"},
    {"name": "run_root", "long": "run_root", "type": str, "default": "runs/demo", "help": "the run's folder"},
    {"name": "steps", "long": "steps", "type": int, "default": 32, "help": "new tokens to generate at most"},
    {"name": "max_input_len", "long": "max_input_len", "type": int, "default": 0, "help": "T when converting"},
    {"name": "max_cache_len", "long": "max_cache_len", "type": int, "default": 0, "help": "C when converting"},
    {"name": "greedy", "long": "greedy", "type": bool, "default": False, "help": "argmax (default unless "
                                                                                  "--temperature/top_k/top_p)"},
    {"name": "temperature", "long": "temperature", "type": float, "default": 0.0, "help": "sampling temperature"},
    {"name": "top_k", "long": "top_k", "type": int, "default": 0, "help": "sample among the k best (0: all)"},
    {"name": "top_p", "long": "top_p", "type": float, "default": 0.0, "help": "nucleus sampling mass"},
    {"name": "seed", "long": "seed", "type": int, "default": 0, "help": "sampling seed"},
    {"name": "chat", "long": "chat", "type": bool, "default": False, "help": "wrap the prompt in the chat template"},
    {"name": "no_think", "long": "no_think", "type": bool, "default": False, "help": "Qwen3: empty think block"},
    {"name": "backend", "long": "backend", "type": str, "default": "onnx", "help": "onnx or reference"},
    {"name": "provider", "long": "provider", "type": str, "default": "cpu", "help": "onnxruntime: cpu or cuda"},
    {"name": "ignore_eos", "long": "ignore_eos", "type": bool, "default": False, "help": "do not stop at EOS"},
    {"name": "from_step", "long": "from_step", "type": int, "default": -1, "help": "discard steps >= K, redo them"},
    {"name": "clean", "long": "clean", "type": bool, "default": False, "help": "start the run folder over"},
    {"name": "reset_kv", "long": "reset_kv", "type": bool, "default": False, "help": "new KV cache, recompute all"},
    {"name": "full_logits", "long": "full_logits", "type": bool, "default": False,
     "help": "prefill steps keep logits for all T rows (default: the last real row only)"},
]


@create_after()  # build the step tasks only when run_auto itself runs (not for `doit convert`)
@task_params(RUN_PARAMS)
def task_run_auto(**params):
    """Generate through the stage pipeline: one task per (step, stage); resumes and branches from saved steps."""
    from pipeline.run.run_auto import open_run

    with exit_on_error():
        run = open_run(params)
    yield from run.tasks()


INSPECT_PARAMS = [
    {"name": "path", "long": "path", "type": str, "default": "runs/demo", "help": "run, step or kv_cache folder"},
    {"name": "as_json", "long": "json", "type": bool, "default": False, "help": "print JSON instead of tables"},
]


@task_params(INSPECT_PARAMS)
def task_inspect(path, as_json):
    """Show a run's steps and summary, or a step's tensors and meta.json (python -m pipeline.inspect)."""
    argv = [path] + (["--json"] if as_json else [])
    return {"actions": [[sys.executable, "-m", "pipeline.inspect", *argv]], "uptodate": [False], "verbosity": 2}


BENCH_PARAMS = [
    {"name": "model_path", "long": "model_path", "type": str, "default": "",
     "help": "checkpoint (default: random Qwen3-0.6B-shaped models/bench-qwen3-0.6b, written if missing)"},
    {"name": "small", "long": "small", "type": bool, "default": False, "help": "the tiny demo checkpoint: smoke run"},
    {"name": "new_tokens", "long": "new_tokens", "type": int, "default": 32, "help": "greedy new tokens"},
    {"name": "precision", "long": "precision", "type": str, "default": "fp32",
     "help": "fp32, fp16, int8 or int4 graphs"},
]


@task_params(BENCH_PARAMS)
def task_bench(model_path, small, new_tokens, precision):
    """Time run_auto vs the in-memory loop, by-hand stages and onnxruntime-genai (python -m benchmarks.bench)."""
    argv = ["--new_tokens", str(new_tokens), "--precision", precision]
    argv += ["--model_path", model_path] if model_path else []
    argv += ["--small"] if small else []
    return {"actions": [[sys.executable, "-m", "benchmarks.bench", *argv]], "uptodate": [False], "verbosity": 2}
