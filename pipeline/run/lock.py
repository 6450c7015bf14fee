"""One run_auto per run folder at a time: an exclusive, non-blocking flock held for the process's life."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pipeline.core.errors import StagepipeError, with_filename
from pipeline.core.layout import LOCK_FILE

_held: dict[Path, int] = {}


def lock_run_dir(run_dir: Path):
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise StagepipeError(f"--run_root {run_dir}: is a file, not a folder; choose another --run_root")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    try:  # never through a link: the lock is written (the owner's pid)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise with_filename(e, path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StagepipeError(f"{run_dir} is in use by another run (pid {owner}); wait for it to finish or use "
                             "another --run_root") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[run_dir] = fd  # released by the OS when the process exits, however it exits
