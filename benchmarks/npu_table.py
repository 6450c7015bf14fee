"""The NPU quantization table: every precision of one model on the same held-out prompts.

    python -m benchmarks.npu_table --model_path CKPT --out runs/npu_table/NAME [--blocks 4] [--max_cache_len 256]
                                   [--cache_windows none] [--prompts P.jsonl] [--rounds 3] [--speed_steps 32]
                                   [--mixed_target "top1>=0.98,cosine>=0.995"] [--code]
                                   [--perplexity_text FILE ... | --perplexity_held_out]

Converts fp32, fp16, int8, int4 (MatMulNBits) onnx_dirs; runs the prompt set on fp32 (python -m pipeline.run_set;
the last two prompts are held out); makes QDQ w8a8, w8a16, w4a16 graphs (python -m pipeline.quantize, calibrated on
the others; and w8a8 with onnxruntime's default settings, nothing kept in float) and the mixed assignment over fp32/int8/int4 (python -m pipeline.mixed). For each: model size (graphs
and weights, decode's copies once), logits cosine and top-1 agreement against fp32 on every held-out position,
perplexity (benchmarks/perplexity.py, 4096 tokens of --perplexity_text or the trained demo's held-out files), and decode tokens/s of run_auto on this
CPU: --rounds interleaved rounds (every dir once per round, under nice), medians. Writes OUT/table.json and
OUT/table.md. Every onnx_dir lands in OUT (reused when present).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.core.atomic import write_json  # noqa: E402
from pipeline.core.errors import cli_entry  # noqa: E402

PROMPTS = [
    "Explain how a neural processing unit runs a transformer layer.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List five uses of the Python standard library module itertools, with an example each.",
    "What is the difference between static and dynamic quantization?",
    "Describe the water cycle to a ten year old.",
    "Summarize the plot of a detective novel set in a small mountain village.",
    "Give three tips for writing readable code and explain why they help.",
    "Why do compilers need an intermediate representation? Answer in a paragraph.",
]
# (row, scheme, --keep_float): the last is onnxruntime's default settings (mask, RoPE and norms quantized too)
QDQ = [("qdq-w8a8", "w8a8", "mask,rope,norms"), ("qdq-w8a16", "w8a16", "mask,rope,norms"),
       ("qdq-w4a16", "w4a16", "mask,rope,norms"), ("qdq-w8a8-default", "w8a8", "none")]
# the trained demo model writes Python (--code): its prompts are the beginnings of code
CODE_PROMPTS = [
    "def bubble_sort(items):\n",
    "class Stack:\n    \"\"\"A last-in, first-out container.\"\"\"\n\n    def __init__(self):\n",
    "import os\n\n\ndef list_files(path, suffix):\n",
    "def read_config(filename):\n    \"\"\"Read a key = value file into a dict.\"\"\"\n",
    "class Point:\n    def __init__(self, x, y):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
    "def fibonacci(n):\n",
    "    def __repr__(self):\n",
]
SPEED_PROMPT = "Tell me about NPUs and how they run language models on small devices."


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def convert_all(model: Path, out: Path, a) -> dict[str, Path]:
    from pipeline.convert.onnx_dir import convert
    from pipeline.convert.options import parse_cache_windows

    dirs = {}
    for precision in ("fp32", "fp16", "int8", "int4"):
        dirs[precision] = out / precision
        if not (dirs[precision] / "manifest.json").exists():
            log(f"converting {precision} ...")
            convert(model, dirs[precision], blocks=a.blocks, max_input_len=16, max_cache_len=a.max_cache_len,
                    precision=precision, cache_windows=parse_cache_windows(a.cache_windows), log=lambda *x: None)
    return dirs


def python(*args):
    subprocess.run(["nice", "-n", "5", sys.executable, *map(str, args)], cwd=REPO, check=True)


def decode_rate(onnx_dir: Path, run_root: Path, steps: int) -> float:
    python("-m", "pipeline.cli", "run", "--onnx_dir", onnx_dir, "--run_root", run_root, "--prompt", SPEED_PROMPT,
           "--steps", steps, "--ignore_eos", "--clean")
    return json.loads((run_root / "summary.json").read_text())["decode_tokens_per_s"]


def perplexity(onnx_dir: Path, texts: list[str] | None):
    from benchmarks.perplexity import perplexity as score

    return score(onnx_dir, texts, 4096)["perplexity"] if texts else None


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.npu_table", description=__doc__.split("\n")[0])
    p.add_argument("--model_path", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--max_cache_len", type=int, default=256)
    p.add_argument("--cache_windows", default="none")
    p.add_argument("--prompts", type=Path, default=None, help="JSON Lines prompts (default: 8 built-in, 24 steps)")
    p.add_argument("--steps", type=int, default=24, help="new tokens per prompt of the run set")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--speed_steps", type=int, default=32)
    p.add_argument("--mixed_target", default="top1>=0.98,cosine>=0.995")
    p.add_argument("--code", action="store_true", help="Python code prompts (the trained demo model)")
    ppl = p.add_mutually_exclusive_group()
    ppl.add_argument("--perplexity_text", type=Path, nargs="+", default=None, help="text files to score (4096 tokens)")
    ppl.add_argument("--perplexity_held_out", action="store_true", help="the trained demo's held-out stdlib files")
    a = p.parse_args(argv)
    if a.perplexity_held_out:
        from benchmarks.perplexity import held_out_texts
        texts = held_out_texts()
    else:
        texts = [f.read_text(encoding="utf-8") for f in a.perplexity_text or []]
    from pipeline.npu.evaluate import LogitsQuality
    from pipeline.npu.qdq_dir import onnx_dir_bytes
    from pipeline.npu.quantize import split_runs
    from pipeline.npu.samples import open_run_set
    from pipeline.runtime.backends import OnnxBackend

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    dirs = convert_all(a.model_path, out, a)
    prompts = a.prompts
    if prompts is None:
        prompts = out / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": t, "steps": a.steps, "ignore_eos": True}) + "\n"
                                   for t in (CODE_PROMPTS if a.code else PROMPTS)))
    log("run set on fp32 ...")
    python("-m", "pipeline.run_set", "--prompts", prompts, "--run_root", out / "set", "--onnx_dir", dirs["fp32"],
           "-n", "2")
    for name, scheme, keep_float in QDQ:
        dirs[name] = out / name
        if not (dirs[name] / "manifest.json").exists():
            log(f"quantize {name} ...")
            python("-m", "pipeline.quantize", "--onnx_dir", dirs["fp32"], "--calibration", out / "set", "--scheme",
                   scheme, "--keep_float", keep_float, "--out", dirs[name], "--heldout", 2)
    log("mixed ...")
    python("-m", "pipeline.mixed", "--onnx_dirs", f"fp32={dirs['fp32']},int8={dirs['int8']},int4={dirs['int4']}",
           "--calibration", out / "set", "--target", a.mixed_target, "--out", out / "mixed", "--heldout", 2)
    dirs["mixed"] = out / "mixed"
    _, held = split_runs(open_run_set(out / "set"), 2)
    quality = LogitsQuality(held, OnnxBackend(dirs["fp32"]))
    rows = {}
    for name, d in dirs.items():
        log(f"quality {name} ...")
        rows[name] = {"onnx_dir": str(d), "bytes": onnx_dir_bytes(d), **quality.measure(OnnxBackend(d)),
                      "perplexity": perplexity(d, texts), "decode_tok_s": []}
    for r in range(a.rounds):  # interleaved: every dir once per round, so a busy spell hits them alike
        for name, d in dirs.items():
            log(f"speed round {r + 1} {name} ...")
            rows[name]["decode_tok_s"].append(decode_rate(d, out / "speed" / name, a.speed_steps))
    for row in rows.values():
        row["decode_tok_s_median"] = statistics.median(row["decode_tok_s"])
    mixed = json.loads((out / "mixed" / "assignment.json").read_text())
    result = {"model_path": str(a.model_path), "max_cache_len": a.max_cache_len, "cache_windows": a.cache_windows,
              "heldout_runs": [r.dir.name for r in held], "rounds": a.rounds, "speed_steps": a.speed_steps,
              "mixed_assignment": mixed["assignment"], "rows": rows}
    write_json(out / "table.json", result)
    (out / "table.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    fp32 = r["rows"]["fp32"]["decode_tok_s_median"]
    lines = ["| scheme | model size MiB | logits cosine mean (min) | top-1 agreement | perplexity | decode tok/s "
             "(vs fp32) |", "|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        ppl = "-" if row["perplexity"] is None else f"{row['perplexity']:.3f}"
        rate = row["decode_tok_s_median"]
        lines.append(f"| {name} | {row['bytes'] / 2**20:.0f} | {row['cosine_mean']:.5f} ({row['cosine_min']:.4f}) | "
                     f"{row['top1']:.1%} | {ppl} | {rate:.2f} ({rate / fp32:.2f}x) |")
    assignment = ", ".join(f"{s}={p}" for s, p in r["mixed_assignment"].items())
    return "\n".join(lines) + f"\n\nmixed: {assignment}; {r['rows']['fp32']['positions']} held-out positions " \
                              f"({', '.join(r['heldout_runs'])})\n"


if __name__ == "__main__":
    main()
