"""Ctrl-C anywhere in `doit run_auto`: one line, exit code 130, never a traceback.

Inside run_auto's work (`with interruptible():`) the first Ctrl-C raises KeyboardInterrupt, so that what is
being written is cleaned up (atomic writes remove their temp file) and doit saves its record. Any other Ctrl-C
(doit starting up or finishing, a second one while the first unwinds) exits at once: every file a run writes
is crash-safe, so stopping anywhere loses only unfinished work.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

from pipeline.core.errors import INTERRUPTED

_inside = False
_interrupted = False


def _on_sigint(signum, frame):
    global _interrupted
    if _inside and not _interrupted:
        _interrupted = True
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
    """The block's work stops on Ctrl-C with a KeyboardInterrupt (the first one only)."""
    global _inside, _interrupted
    install()
    _inside, _interrupted = True, False
    try:
        yield
    finally:
        _inside = False
