"""doit as run_auto's engine: the per-run task graph executes through doit's API with its record inside the run
folder, so runs side by side never share state and nothing parses doit's command line."""
from __future__ import annotations

import os

from doit.cmd_base import ModuleTaskLoader
from doit.dependency import MD5Checker
from doit.doit_cmd import DoitMain
from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter

from pipeline.core import layout
from pipeline.core.errors import StagepipeError


class TolerantMD5Checker(MD5Checker):
    """MD5 checking, except that a missing file_dep after a task ran records nothing instead of crashing:
    the steps planned past an end-of-sequence token run as no-ops and their inputs never exist."""

    def get_state(self, dep, current_state):
        if not os.path.exists(dep):
            return None
        return super().get_state(dep, current_state)


class QuietReporter(ConsoleReporter):
    """doit's console reporter without a line per task (each command prints its own output, and JSON output
    stays pure JSON) and with each failure as one line."""

    def execute_task(self, task):
        pass

    def skip_uptodate(self, task):
        pass

    def add_failure(self, task, fail):
        message = fail.get_msg().strip().splitlines()
        self.outstream.write(f"\nerror: {message[-1] if message else fail}\n")
        self.failures.append({"task": task, "exception": fail})

    def complete_run(self):
        self.failures = []  # already printed, one line each
        super().complete_run()


class Guard:
    """Makes doit python-actions that turn StagepipeError into a one-line task failure instead of a traceback,
    and remembers that the failure was the user's input (exit code 2), not a bug."""

    def __init__(self):
        self.input_error = False

    def __call__(self, fn, *args):
        def action():
            try:
                fn(*args)
            except StagepipeError as e:
                self.input_error = True
                return TaskFailed(str(e))

        action.__name__ = getattr(fn, "__name__", "action")
        return (action, [], {})


def run_task_graph(run) -> int:
    """Execute run.tasks() with doit, the record in the run folder. -> 0, 2 (bad input) or 1 (a task failed)."""
    guard = Guard()

    def task_run_auto():
        yield from run.tasks(guard)

    config = {"dep_file": str(run.dir / layout.DOIT_DB), "backend": "json", "reporter": QuietReporter,
              "check_file_uptodate": TolerantMD5Checker, "verbosity": 2}
    code = DoitMain(ModuleTaskLoader({"task_run_auto": task_run_auto, "DOIT_CONFIG": config}),
                    config_filenames=()).run([])
    return 0 if code == 0 else (2 if guard.input_error else 1)


def friendly_task_option_errors():
    """`doit run_auto --stpes 5` or `--steps abc`: one `error:` line naming the option (with a did-you-mean) and
    exit 2, instead of doit's line listing every option object. doit offers no hook for this, so its task-option
    parser is wrapped; dodo.py calls this once."""
    import re
    import sys

    from doit.cmdparse import CmdParseError, TaskParse

    from pipeline.core.cli_args import unknown_option_message

    if getattr(TaskParse.parse, "_stagepipe", False):
        return
    original = TaskParse.parse

    def parse(self, in_args):
        try:
            return original(self, in_args)
        except CmdParseError as e:
            text = str(e)
            known = [f"--{o.long}" for o in self.options if o.long]
            if m := re.search(r"option (\S+) not recognized", text):
                message = unknown_option_message(m.group(1), known, "doit help TASK")
            elif m := re.search(r"option (\S+) requires argument", text):
                message = f"option {m.group(1)} needs a value"
            elif m := re.search(r"Error parsing parameter '(\w+)' <class '(\w+)'>.\n(.*)", text):
                message = f"--{m.group(1)}: expected {'an integer' if m.group(2) == 'int' else 'a number'} " \
                          f"({m.group(3).strip()})"
            else:
                message = text.strip().splitlines()[0]
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    parse._stagepipe = True
    TaskParse.parse = parse
