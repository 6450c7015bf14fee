"""The runs folder the web app serves, and the only way its handlers reach files: names from requests become paths
here, and a path that would leave the folder (`..`, an absolute name, a symlink pointing out) is refused."""
from __future__ import annotations

import re
from pathlib import Path

from pipeline.core import layout
from pipeline.core.layout import looks_like_run_dir, step_number

CHATS = "chats"  # the chat page's conversations: the only run folders the app writes (through run_auto)
LIST_DEPTH = 2  # runs/x and runs/group/x are listed
_TENSOR = re.compile(r"[A-Za-z0-9_.-]+\.npy")


class RequestError(Exception):
    """A request the app cannot serve: shown as an error page (or JSON for /api/), with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RunsFolder:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    # -- names -> paths ----------------------------------------------------------------------------------------------
    def inside(self, path: Path) -> Path:
        """path with its symlinks resolved, if that stays inside the runs folder."""
        real = Path(path).resolve()
        if real != self.root and not real.is_relative_to(self.root):
            raise RequestError(403, f"{self.name_of(path)}: leads outside the runs folder (a symlink?); not served")
        return real

    def path(self, name: str | None) -> Path:
        """A relative name under the runs folder ("x", "chats/20260101-120000"): no '..', no hidden parts."""
        if not name:
            raise RequestError(400, "no run named: add ?run=NAME (a folder under the runs folder)")
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or "\x00" in name or any(p in ("", ".", "..") or p.startswith(".")
                                                                             for p in parts):
            raise RequestError(400, f"{name!r}: not a name under the runs folder (no '..', absolute or hidden parts)")
        return self.inside(self.root.joinpath(*parts))

    def run(self, name: str | None) -> Path:
        path = self.path(name)
        if not looks_like_run_dir(path):
            raise RequestError(404, f"{name}: no such run under {self.root} (a run folder holds run.json or "
                                    "step_NNNN/)")
        self.check_links(path)
        return path

    def step(self, run_dir: Path, step: str | None) -> Path:
        if not step or step_number(step) is None:
            raise RequestError(400, f"{step!r}: not a step folder name (step_0000, step_0001, ...)")
        path = run_dir / step
        if not path.is_dir():
            raise RequestError(404, f"{self.name_of(run_dir)}/{step}: no such step folder")
        return self.inside(path)

    def tensor(self, step_dir: Path, file: str | None) -> Path:
        if not file or not _TENSOR.fullmatch(file) or not (step_dir / file).is_file():
            raise RequestError(404, f"{self.name_of(step_dir)}/{file}: no such tensor file")
        return self.inside(step_dir / file)

    def check_links(self, run_dir: Path):
        """Every symlink in the run folder, its step folders and its kv_cache stays inside the runs folder."""
        for entry in run_dir.iterdir():
            if entry.is_symlink():
                self.inside(entry)
            if entry.is_dir() and not entry.is_symlink():
                for child in entry.iterdir():
                    if child.is_symlink():
                        self.inside(child)

    def name_of(self, path: Path) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    # -- listing -------------------------------------------------------------------------------------------------------
    def run_names(self) -> list[str]:
        """Run folders up to LIST_DEPTH below the root (not following symlinks), by name."""
        if not self.root.is_dir():
            return []
        found, todo = [], [(self.root, 0)]
        while todo:
            folder, depth = todo.pop()
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
                    continue
                if step_number(entry.name) is not None or entry.name == layout.KV_DIR:
                    continue
                if looks_like_run_dir(entry):
                    found.append(self.name_of(entry))
                elif depth + 1 < LIST_DEPTH:
                    todo.append((entry, depth + 1))
        return sorted(found)

    def is_chat_folder(self, name: str) -> bool:
        return name.split("/")[0] == CHATS and name.count("/") == 1
