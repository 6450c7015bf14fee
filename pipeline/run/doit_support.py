"""Small adapters between stagepipe and doit: where the dependency record lives, a quiet reporter, and a
file checker that lets the steps after an end-of-sequence stop stand without their inputs."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from doit.dependency import MD5Checker
from doit.reporter import ConsoleReporter

from pipeline.core.errors import StagepipeError


# doit's own options that take a value (so the value is not mistaken for a task name)
_DOIT_VALUE_OPTIONS = {"-f", "--file", "-d", "--dir", "--db-file", "--backend", "--check_file_uptodate", "-k",
                       "--seek-file", "-n", "--process", "-P", "--parallel-type", "-r", "--reporter",
                       "--output-file", "-o", "--verbosity", "-v", "--failure-verbosity"}


def dep_file_for(argv: list[str]) -> str:
    """doit's record of what is up to date: inside the run folder for run_auto, so runs never mix."""
    args, tasks = argv[1:], []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a in _DOIT_VALUE_OPTIONS:
            skip = True
        elif not a.startswith("-"):
            tasks.append(a)
    if "run_auto" not in tasks and any(t not in ("run",) for t in tasks):
        return ".doit.db"
    run_root = "runs/demo"
    for i, a in enumerate(args):
        if a == "--run_root" and i + 1 < len(args):
            run_root = args[i + 1]
        elif a.startswith("--run_root="):
            run_root = a.split("=", 1)[1]
    Path(run_root).mkdir(parents=True, exist_ok=True)
    return os.path.join(run_root, ".doit.db")


class TolerantMD5Checker(MD5Checker):
    """MD5 checking, except that a missing file_dep after a task ran records nothing instead of crashing:
    the steps planned past an end-of-sequence token run as no-ops and their inputs never exist."""

    def get_state(self, dep, current_state):
        if not os.path.exists(dep):
            return None
        return super().get_state(dep, current_state)


class StepReporter(ConsoleReporter):
    """doit's console reporter, minus a line per run_auto sub-task (the text streams instead) and with failures as one line."""

    def execute_task(self, task):
        if not task.name.startswith("run_auto:"):
            super().execute_task(task)

    def skip_uptodate(self, task):
        if not task.name.startswith("run_auto:"):
            super().skip_uptodate(task)

    def add_failure(self, task, fail):
        message = fail.get_msg().strip().splitlines()
        self.outstream.write(f"\nerror: {message[-1] if message else fail}\n  (task {task.name}; rerun the same "
                             "command to resume once fixed)\n")
        self.failures.append({"task": task, "exception": fail})

    def complete_run(self):
        self.failures = []  # already printed, one line each
        super().complete_run()


@contextlib.contextmanager
def exit_on_error():
    """For code that runs while doit loads tasks: a user error prints one line and exits 2."""
    try:
        yield
    except StagepipeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
