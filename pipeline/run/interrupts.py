"""Ctrl-C anywhere in a doit command: one line, exit code 130, never a traceback.

While a command's own work runs (`with interruptible():`, or an action wrapped by `command`) Ctrl-C raises
KeyboardInterrupt as usual, and the command handles it: what is being written is cleaned up (atomic writes
remove their temp file), doit saves its record, run_auto prints its line and exits 130, doit chat stops a reply.
Outside that work (doit starting up or finishing) Ctrl-C exits at once with the same line: every file a run
writes is crash-safe, so stopping anywhere loses only unfinished work.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading

from pipeline.core.errors import INTERRUPTED

_depth = 0  # > 0 while a command's own work runs


def _on_sigint(signum, frame):
    if _depth:
        raise KeyboardInterrupt
    os.write(2, f"\n{INTERRUPTED}\n".encode())  # not print(): the handler may interrupt a print to stderr
    os._exit(130)


def install():
    """Handle Ctrl-C for the whole process (dodo.py installs it when doit loads it, run_auto when it starts)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) in (
            signal.default_int_handler, _on_sigint):
        signal.signal(signal.SIGINT, _on_sigint)


@contextlib.contextmanager
def interruptible():
    """Ctrl-C during the block raises KeyboardInterrupt, for the block's own code to handle."""
    global _depth
    install()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def command(action):
    """A doit action run as interruptible() work (its Ctrl-C handling is its own)."""

    @functools.wraps(action)
    def run(*args, **kwargs):
        with interruptible():
            return action(*args, **kwargs)

    return run
