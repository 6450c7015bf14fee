"""Before a run trusts its folder: nothing in it is a link out of it, and every finished step still holds what
its stages recorded (the files they wrote, meta.json's step fields, the KV cache slots the blocks filled).

doit's own record only says which tasks ran; it cannot see a truncated logits.npy, a KV cache that was deleted
and recreated, or a meta.json edited by hand. stages_to_redo finds those, and run_auto has doit run the
affected stages again (each stage then redoes its work, as its own check fails too); later stages follow
through doit's file dependencies when what they read changes.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.core import layout
from pipeline.core.errors import StagepipeError
from pipeline.core.layout import StepPaths, step_name
from pipeline.runtime.stage_ops import edited_token, readable_meta, stage_problem


def refuse_links(run_dir: Path):
    """One error line for a symbolic link where a run writes (its files, step folders, the KV cache and the
    files in them): writes never follow a link out of the run folder."""
    run_dir = Path(run_dir)
    places = [run_dir / n for n in (layout.RUN_JSON, layout.SUMMARY_JSON, layout.LOCK_FILE, layout.KV_DIR,
                                    layout.VISION)]
    places += [p for p in _entries(run_dir) if p.name.startswith(layout.DOIT_DB)]
    places += [p for p in _entries(run_dir) if layout.step_number(p.name) is not None]
    for place in places:
        if place.is_symlink():
            raise StagepipeError(f"{place}: is a symbolic link; a run writes only inside its folder: remove the "
                                 "link, then run the same command again")
        if place.is_dir() and place.name not in (layout.KV_DIR, layout.VISION) and \
                layout.step_number(place.name) is None:
            continue
        if place.is_dir():
            for inner in _entries(place):
                if inner.is_symlink():
                    raise StagepipeError(f"{inner}: is a symbolic link; a run writes only inside its folder: "
                                         "remove the link, then run the same command again")


def remove_temp_files(run_dir: Path):
    """Remove the temp files of writes a crash cut short, in the run folder, the KV cache and the step folders
    (never inside a link or another folder)."""
    run_dir = Path(run_dir)
    folders = [run_dir, run_dir / layout.KV_DIR, run_dir / layout.VISION, *layout.step_dirs(run_dir)]
    for folder in folders:
        if folder.is_dir() and not folder.is_symlink():
            for p in _entries(folder):
                if p.name.startswith(".") and p.name.endswith(".tmp") and not p.is_dir():
                    p.unlink(missing_ok=True)


def _entries(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:
        return [Path(e.path) for e in it]


def _note(line: str):
    print(line, file=sys.stderr, flush=True)


def stages_to_redo(run, log=_note) -> set[tuple[int, str]]:
    """(step, stage) pairs whose recorded work does not hold (or that never finished), in steps the run plans;
    one note line when finished work was found damaged. A damaged embed redoes its whole step."""
    stages = run.manifest.stage_names()
    redo: set[tuple[int, str]] = set()
    damaged: list[tuple[int, str]] = []
    edits: list[str] = []
    for d in layout.step_dirs(run.dir):
        s = layout.step_number(d.name)
        if s >= run.n_steps:
            continue
        paths = StepPaths(d)
        meta = readable_meta(paths.meta)
        if meta is None:
            if paths.meta.exists():
                damaged.append((s, f"{paths.meta}: unreadable"))
            redo |= {(s, stage) for stage in stages}
            continue
        for stage in stages:
            past = run.kv.past(int(stage[5:])) if stage.startswith("block") else None
            problem = stage_problem(meta, stage, paths, past)
            if problem is None:
                continue
            if stage in meta.stages:
                damaged.append((s, problem))
            redo |= {(s, other) for other in stages} if stage == "embed" else {(s, stage)}
        token = edited_token(meta, paths)
        if token is not None:
            edits.append(f"note: {paths.next_token_file} holds token {token}, not the {meta.next_token_id} its step "
                         f"sampled: the steps after it follow this edit (to sample again: --from_step {s})")
    if edits:
        log(edits[0] + (f" ({len(edits) - 1} more edited token files)" if len(edits) > 1 else ""))
    if damaged:
        s, problem = damaged[0]  # the first in step and pipeline order
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        log(f"note: {problem}{more}; redoing the work from {step_name(s)} on")
    return redo
