"""Ctrl-C (and SIGTERM) anywhere in a doit command: one line, exit code 130 (143), never a traceback.

While a command's own work runs (`with interruptible():`, or an action wrapped by `command`) Ctrl-C raises
KeyboardInterrupt as usual, and the command handles it: what is being written is cleaned up (atomic writes
remove their temp file), doit saves its record, run_auto prints its line and exits 130, doit chat stops a reply.
SIGTERM unwinds the same way as Terminated, which ends the command (exit 143). Outside that work (doit
starting up or finishing) either signal exits at once with the same line: every file a run writes is
crash-safe, so stopping anywhere loses only unfinished work.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading

from pipeline.core.errors import INTERRUPTED

TERMINATED_EXIT = 128 + signal.SIGTERM
_depth = 0  # > 0 while a command's own work runs


class Terminated(BaseException):
    """SIGTERM: like KeyboardInterrupt, but a command never takes it for a Ctrl-C to carry on after."""


def _on_signal(signum, frame):
    if _depth:
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated
    os.write(2, f"\n{INTERRUPTED}\n".encode())  # not print(): the handler may interrupt a print to stderr
    os._exit(130 if signum == signal.SIGINT else TERMINATED_EXIT)


def install():
    """Handle Ctrl-C and SIGTERM for the whole process (dodo.py installs it when doit loads it, run_auto when it
    starts). A signal the process was started ignoring (a background job's SIGINT) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _on_signal):
        signal.signal(signal.SIGINT, _on_signal)
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _on_signal):
        signal.signal(signal.SIGTERM, _on_signal)


@contextlib.contextmanager
def interruptible():
    """Ctrl-C during the block raises KeyboardInterrupt and SIGTERM Terminated, for the block's own code to
    handle."""
    global _depth
    install()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def command(action):
    """A doit action run as interruptible() work (its Ctrl-C handling is its own); SIGTERM ends it with one
    line and exit code 143."""

    @functools.wraps(action)
    def run(*args, **kwargs):
        try:
            with interruptible():
                return action(*args, **kwargs)
        except Terminated:
            print(f"\n{INTERRUPTED}", file=sys.stderr, flush=True)
            sys.exit(TERMINATED_EXIT)

    return run
