"""run_auto as one call: resolve the model, reconcile the run folder, execute the step tasks. `doit run_auto`
calls it; so can any Python code. Exit codes: 0 ok, 1 a task failed, 2 bad input or a damaged folder, 130
interrupted."""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.errors import StagepipeError
from pipeline.run.options import RunOptions

INTERRUPTED = "interrupted: finished work is saved; run the same command to resume"


def open_run(options: RunOptions, log=print):
    """A Run for these options (converting the model first when needed)."""
    from pipeline.run.model_source import resolve_onnx_dir
    from pipeline.run.run_auto import Run

    onnx_dir = resolve_onnx_dir(Path(options.model_path) if options.model_path else None,
                                Path(options.onnx_dir) if options.onnx_dir else None,
                                options.max_input_len or None, options.max_cache_len or None, log=log)
    return Run(options, onnx_dir)


def run_auto(options: RunOptions) -> int:
    from pipeline.run.doit_support import run_task_graph

    try:
        run = open_run(options)
        run.prepare()
        run.announce()
        return run_task_graph(run)
    except StagepipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    """stagepipe run: run_auto's options parsed with argparse."""
    from pipeline.core.cli_args import ArgumentParser
    from pipeline.core.options import add_arguments, from_values

    p = ArgumentParser(prog="stagepipe run", description="Generate through the stage pipeline.")
    add_arguments(p, RunOptions)
    try:
        options = from_values(RunOptions, vars(p.parse_args(argv)))
    except StagepipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_auto(options)


def run_auto_action(**params):
    """doit action for `doit run_auto`: the process exits with run_auto's code."""
    from pipeline.core.options import from_values

    code = run_auto(from_values(RunOptions, params))
    if code:
        sys.exit(code)
