"""One error type for everything a user can get wrong, and the CLI wrapper that prints it as one line."""
from __future__ import annotations

import contextlib
import functools
import os
import sys


class StagepipeError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, never a traceback."""

    exit_code = 2


def cli_entry(main):
    """Wrap a CLI main(argv) so StagepipeError (and Ctrl-C) become one line on stderr and a non-zero exit."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except StagepipeError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper


@contextlib.contextmanager
def stdout_may_close():
    """Printing a report: `... | head` may close stdout early; stop quietly instead of a traceback."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's last flush is quiet too
