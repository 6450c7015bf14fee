"""The `stagepipe` command: one front door to every tool, with argparse-quality errors.

    stagepipe run [--prompt TEXT | --prompt_file F] [--steps N] ...     (= doit run_auto)
    stagepipe chat [--run_root runs/chat] ...                            (= doit chat)
    stagepipe convert --model_path M --onnx_dir O ...                    (= python -m pipeline.convert)
    stagepipe inspect PATH | compare A B | ops ONNX_DIR | demo --out DIR
    stagepipe replay GOLDEN_RUN --onnx_dir C | conformance --onnx_dir C | pack RUN -o PACK.tar.gz
    stagepipe serve [--runs runs] [--port 8000]                          (= doit serve)
    stagepipe run_set --prompts P.jsonl [-n 2] [--ray local|ADDRESS]    (= doit run_set)
    stagepipe calibration RUN_SET --stage S --out D | quantize ... | mixed ...   (NPU quantization)
    stagepipe stage token_embed|block|output ...                         (= python -m stages.<stage>)
"""
from __future__ import annotations

import importlib
import sys

from pipeline.core.cli_args import did_you_mean

# command -> (module whose main(argv) runs it, one-line help)
COMMANDS = {
    "run": ("pipeline.run.main", "generate through the stage pipeline (resumes, continues, branches)"),
    "chat": ("pipeline.run.chat", "talk to the model in the terminal (a conversation over one KV cache)"),
    "convert": ("pipeline.convert.__main__", "convert a checkpoint into an onnx_dir"),
    "inspect": ("pipeline.tools.inspect", "look inside a run, step or kv_cache folder"),
    "compare": ("pipeline.tools.compare", "compare two runs or steps tensor by tensor"),
    "ops": ("pipeline.tools.ops", "list and check the ops of an onnx_dir's graphs"),
    "replay": ("pipeline.tools.replay", "teacher-forced replay: the error each stage introduces vs inherits"),
    "conformance": ("pipeline.tools.conformance", "static-shape edge cases checked against the fp32 graphs"),
    "pack": ("pipeline.tools.pack", "a repro pack (.tar.gz) of a run for a vendor ticket"),
    "demo": ("pipeline.demo.checkpoint", "write the demo checkpoint"),
    "serve": ("pipeline.web.serve", "web pages on 127.0.0.1: browse runs, compare them, chat"),
    "run_set": ("pipeline.run.run_set", "one run folder per prompt of a JSON Lines file, side by side or on Ray"),
    "calibration": ("pipeline.npu.calibration", "a stage's inputs from a run set, for vendor toolchains"),
    "quantize": ("pipeline.npu.quantize", "static QDQ graphs (w8a8, w8a16, w4a16) calibrated on a run set"),
    "mixed": ("pipeline.npu.mixed", "the cheapest per-stage precision mix meeting a quality target"),
}
STAGES = ("token_embed", "block", "output")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands:\n" + "\n".join(f"  {name:<12}{help_text}" for name, (_, help_text) in COMMANDS.items())
              + "\n  stage       run one stage by hand: token_embed, block, output")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "stage":
        if not rest or rest[0] not in STAGES:
            given = rest[0] if rest else "(none)"
            return _error(f"stage {given}: choose one of {', '.join(STAGES)}{did_you_mean(given, STAGES)}")
        module, rest = f"stages.{rest[0]}", rest[1:]
    elif command in COMMANDS:
        module = COMMANDS[command][0]
    else:
        return _error(f"unknown command {command}{did_you_mean(command, [*COMMANDS, 'stage'])}; "
                      "stagepipe --help lists them")
    code = importlib.import_module(module).main(rest)
    return code or 0


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def entry():
    sys.exit(main())


if __name__ == "__main__":
    entry()
