"""doit as run_auto's engine: the per-run task graph executes through doit's API with its record inside the run
folder, so runs side by side never share state and nothing parses doit's command line.

The record is crash-safe: doit's json backend rewrites its file in place, so a kill or a full disk during that
write left it empty and every later run died on it. Here it is written atomically (a whole new file renamed
over the old), and a record that cannot be read anyway is discarded with a one-line notice: the stages' own
records (input and output digests in each meta.json) decide what is done, doit's record only saves checking.
"""
from __future__ import annotations

import os
import sys

from doit.cmd_base import ModuleTaskLoader
from doit.dependency import JsonDB, MD5Checker
from doit.doit_cmd import DoitMain
from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter

from pipeline.core import layout
from pipeline.core.atomic import write_text
from pipeline.core.errors import StagepipeError, os_error_text


class TolerantMD5Checker(MD5Checker):
    """MD5 checking, except that a missing file_dep after a task ran records nothing instead of crashing:
    the steps planned past an end-of-sequence token run as no-ops and their inputs never exist."""

    def get_state(self, dep, current_state):
        if not os.path.exists(dep):
            return None
        return super().get_state(dep, current_state)


class AtomicJsonDB(JsonDB):
    """doit's json backend, written atomically; an unreadable file is discarded with a one-line notice."""

    desc = "json, written atomically"

    def _load(self):
        try:
            db = super()._load()
            if isinstance(db, dict) and all(isinstance(v, dict) for v in db.values()):
                return db
            reason = "not a record of tasks"
        except Exception as e:  # doit's DatabaseException, a decoding error, an unreadable file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"note: {self.name}: doit's record is unreadable ({reason}); discarded: the steps' own records "
              "decide what is done", file=sys.stderr)
        return {}

    def dump(self):
        try:
            write_text(self.name, self.codec.encode(self._db))
        except OSError as e:  # a full disk: losing doit's shortcut is safe, a traceback is not
            print(f"note: could not save doit's record ({os_error_text(e)}); the next run checks the steps' own "
                  "records instead", file=sys.stderr)


RECORD_BACKEND = "atomic_json"
PLUGINS = {"BACKEND": {RECORD_BACKEND: f"{__name__}:AtomicJsonDB"}}


class QuietReporter(ConsoleReporter):
    """doit's console reporter without a line per task (each command prints its own output, and JSON output
    stays pure JSON) and with each failure as one line, on stderr like every other error line."""

    def execute_task(self, task):
        pass

    def skip_uptodate(self, task):
        pass

    def add_failure(self, task, fail):
        message = fail.get_msg().strip().splitlines()
        sys.stdout.flush()  # the error line goes to stderr, after the text streamed so far
        sys.stderr.write(f"\nerror: {message[-1] if message else fail}\n")
        self.failures.append({"task": task, "exception": fail})

    def complete_run(self):
        self.failures = []  # already printed, one line each
        super().complete_run()


class Guard:
    """Makes doit python-actions that turn StagepipeError or a refused file operation (a full disk, ...) into a
    one-line task failure instead of a traceback, and remembers that the failure was the user's input or
    system (exit code 2), not a bug."""

    def __init__(self):
        self.input_error = False

    def __call__(self, fn, *args):
        def action():
            try:
                fn(*args)
            except StagepipeError as e:
                self.input_error = True
                return TaskFailed(str(e))
            except OSError as e:
                self.input_error = True
                return TaskFailed(os_error_text(e))

        action.__name__ = getattr(fn, "__name__", "action")
        return (action, [], {})


def run_task_graph(run) -> int:
    """Execute run.tasks() with doit, the record in the run folder. -> 0, 2 (bad input) or 1 (a task failed)."""
    guard = Guard()

    def task_run_auto():
        yield from run.tasks(guard)

    config = {"dep_file": str(run.dir / layout.DOIT_DB), "backend": RECORD_BACKEND, "reporter": QuietReporter,
              "check_file_uptodate": TolerantMD5Checker, "verbosity": 2}
    code = DoitMain(ModuleTaskLoader({"task_run_auto": task_run_auto, "DOIT_CONFIG": config}),
                    config_filenames=(), extra_config=PLUGINS).run([])
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
                if any("=" in arg for arg in sys.argv):  # doit took the value as a NAME=VALUE variable of its own
                    message += (f" (doit takes a word with '=' as its own variable: write {m.group(1)}=\"...\", "
                                "or use stagepipe run)")
            elif m := re.search(r"Error parsing parameter '(\w+)' <class '(\w+)'>.\n(.*)", text):
                message = f"--{m.group(1)}: expected {'an integer' if m.group(2) == 'int' else 'a number'} " \
                          f"({m.group(3).strip()})"
            else:
                message = text.strip().splitlines()[0]
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    parse._stagepipe = True
    TaskParse.parse = parse
