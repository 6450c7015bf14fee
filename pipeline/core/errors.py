"""One error type for everything a user can get wrong, and the CLI wrapper that prints it as one line.

Exit codes of every command: 0 done; 1 a check failed (or an unexpected failure, named in one line);
2 bad input, a damaged folder, or a file the system refused (full disk, permissions, read-only folder);
130 interrupted (Ctrl-C; 143 for SIGTERM): finished work is kept, the same command resumes.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys

INTERRUPTED = "interrupted; run the same command to resume"

_OS_ERROR_FIXES = {
    errno.ENOSPC: "no space left on device; free some space, then run the same command to resume",
    errno.EDQUOT: "no space left on device (disk quota exceeded); free some space, then run the same command "
                  "to resume",
    errno.EFBIG: "file too large (over this process's file size limit, ulimit -f); raise the limit, then run the "
                 "same command to resume",
    errno.EROFS: "read-only file system; choose a writable folder",
    errno.EACCES: "permission denied; make it writable (or readable) or choose another folder",
    errno.EPERM: "operation not permitted; make it writable or choose another folder",
    errno.EEXIST: "exists and is not a folder; remove it or choose another path",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
    errno.EISDIR: "is a folder where a file is expected; remove it or choose another path",
    errno.ELOOP: "is a symbolic link; stagepipe does not write through links: remove the link",
}


class StagepipeError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, never a traceback."""

    exit_code = 2


def os_error_text(e: OSError) -> str:
    """One line for a refused file operation: the file, then the cause and what to do."""
    where = e.filename if e.filename is not None else "a file"
    cause = _OS_ERROR_FIXES.get(e.errno, e.strerror or str(e))
    return f"{where}: {cause}"


def with_filename(e: OSError, path) -> OSError:
    """`e` naming `path` (an OSError raised on a file descriptor names no file)."""
    if e.filename is None and e.errno is not None:
        return OSError(e.errno, e.strerror, str(path))
    return e


def cli_entry(main):
    """Wrap a CLI main(argv) so StagepipeError, a refused file operation and Ctrl-C become one line on stderr and
    a non-zero exit."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except StagepipeError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except OSError as e:
            print(f"error: {os_error_text(e)}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
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
