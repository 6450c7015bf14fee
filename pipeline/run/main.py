"""run_auto as one call: resolve the model, reconcile the run folder, execute the step tasks. `doit run_auto`
calls it; so can any Python code. Exit codes (pipeline.core.errors): 0 ok, 1 a task failed unexpectedly, 2 bad
input, a damaged folder or a file the system refused (full disk, ...), 130 interrupted."""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.errors import INTERRUPTED, StagepipeError, os_error_text
from pipeline.run.interrupts import TERMINATED_EXIT, Terminated, interruptible
from pipeline.run.options import RunOptions


def model_dir(options: RunOptions, log=print) -> Path:
    """The onnx_dir these options run (converting the model first when needed)."""
    from pipeline.run.model_source import resolve_onnx_dir

    return resolve_onnx_dir(Path(options.model_path) if options.model_path else None,
                            Path(options.onnx_dir) if options.onnx_dir else None,
                            options.max_input_len or None, options.max_cache_len or None, log=log)


def open_run(options: RunOptions, log=print, backend=None):
    """A Run for these options; with --reply / --messages, a conversation (settings not given: the run's)."""
    from pipeline.run.conversation import conversation_options
    from pipeline.run.run_auto import Run

    onnx_dir = model_dir(options, log)
    options, request, old = conversation_options(options)
    sampling = old.sampling if old is not None and not options.sampling_given() else None
    return Run(options, onnx_dir, sampling=sampling, request=request, backend=backend)


def run_turns(run) -> int:
    """Execute the run's task graph, then once more for each user turn it still has to add."""
    from pipeline.run.doit_support import run_task_graph

    def graph() -> int:
        run.announce()
        return run_task_graph(run)

    # a finished last turn is not run again before the next one (whose graph holds its steps anyway)
    code = 0 if run.pending and run.last_turn_done() else graph()
    while code == 0 and run.pending:
        run.add_turn(run.pending.pop(0))
        code = graph()
    return code


def exit_code(work, *args) -> int:
    """work(*args)'s exit code, bad input as one error line (2) and Ctrl-C as the interrupted line (130)."""
    try:
        with interruptible():
            return work(*args)
    except StagepipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_text(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED}", file=sys.stderr, flush=True)
        return 130
    except Terminated:
        print(f"\n{INTERRUPTED}", file=sys.stderr, flush=True)
        return TERMINATED_EXIT


def run_auto(options: RunOptions) -> int:
    def work():
        run = open_run(options)
        run.prepare()
        return run_turns(run)

    return exit_code(work)


def main(argv=None) -> int:
    """stagepipe run: run_auto's options parsed with argparse."""
    return command_main(run_auto, "stagepipe run", "Generate through the stage pipeline.", argv)


def command_main(command, prog: str, description: str, argv=None, skip=(), **defaults) -> int:
    """command(RunOptions) with the options parsed from argv by argparse (skip: options it does not take)."""
    from pipeline.core.cli_args import ArgumentParser
    from pipeline.core.options import add_arguments, from_values

    p = ArgumentParser(prog=prog, description=description)
    add_arguments(p, RunOptions, skip=skip)
    for action in p._actions:  # another default: the help says so too
        if action.dest in defaults:
            action.default = defaults[action.dest]
            action.help = f"{action.help.split(' (default:')[0]} (default: {action.default})"
    try:
        options = from_values(RunOptions, vars(p.parse_args(argv)))
    except StagepipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return command(options)


def options_or_exit(params: dict) -> RunOptions:
    """RunOptions from doit's parameters; a bad value is one error line and exit 2."""
    from pipeline.core.options import from_values

    try:
        return from_values(RunOptions, params)
    except StagepipeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_auto_action(**params):
    """doit action for `doit run_auto`: the process exits with run_auto's code."""
    code = run_auto(options_or_exit(params))
    if code:
        sys.exit(code)
