"""One message of the chat page, in a child process of the web app: `run_auto --reply` as doit chat sends it. A reply
the stop button cut short (SIGINT: doit chat's Ctrl-C) stays as it is and the next message follows it, instead of
being finished first; a reply stopped before its first token is forgotten with its message.

    python -m pipeline.web.turn --run_root R --reply MESSAGE [run_auto's options: --onnx_dir, sampling, --steps ...]

Exit codes as every command's: 0 done (or stopped), 1 a step failed, 2 bad input (one `error:` line).
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from pipeline.core import layout
from pipeline.core.errors import StagepipeError, cli_entry
from pipeline.run.options import RunOptions


def open_turn(options: RunOptions):
    """The Run that answers options.reply: a new conversation, or the folder's with that message added."""
    from pipeline.run.main import open_run
    from pipeline.run.summary import turn_result

    message = options.reply
    first = replace(options, reply="", prompt=message, chat=True)
    if not (Path(options.run_root) / layout.RUN_JSON).is_file():
        run = open_run(first)
        run.prepare()
        return run
    run = open_run(options)
    run.prepare()
    if run.pending:
        last = run.plan.last
        if not turn_result(run, last).generated:  # stopped before its reply began: forget that message
            if last.index == 0:
                run = open_run(replace(first, clean=True))
                run.prepare()
                return run
            run.drop_last_turn()
        run.add_turn(run.pending.pop(0), interrupted=True)
    return run


@cli_entry
def main(argv=None) -> int:
    from pipeline.core.cli_args import ArgumentParser
    from pipeline.core.options import add_arguments, from_values
    from pipeline.run.chat import ctrl_c_stops
    from pipeline.run.doit_support import run_task_graph

    p = ArgumentParser(prog="python -m pipeline.web.turn", description=__doc__.split("\n")[0])
    add_arguments(p, RunOptions)
    options = from_values(RunOptions, vars(p.parse_args(argv)))
    if not options.reply.strip():
        raise StagepipeError("--reply: the message is empty")
    run = open_turn(options)
    with ctrl_c_stops(run):  # the first SIGINT ends the turn after the step running; its steps stay
        return run_task_graph(run)


if __name__ == "__main__":
    sys.exit(main())
