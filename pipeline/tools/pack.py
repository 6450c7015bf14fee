"""Repro pack: one .tar.gz holding what a vendor ticket needs to reproduce a run's problem.

    python -m pipeline.pack RUN [--compare OTHER] [--onnx_dir CANDIDATE | --backend NAME] [--steps 0-3]
                            [--allow npu_ops.txt] -o pack.tar.gz

    pack/PACK.md                 what is in the pack and the commands that reproduce it
    pack/pack.json               every file with its size and sha256; fingerprints (graphs, source weights, KV
                                 cache); tool and library versions; the command
    pack/run/                    run.json (prompt and settings), summary.json, the steps asked for (--steps;
                                 default: the first step compare flags, else all) with every tensor, and
                                 kv_cache/ with the slots after the last packed step zeroed: the cache each
                                 packed step read is in it (slots >= a step's past_len are masked)
    pack/onnx/                   the run's onnx_dir manifest.json, config.json, generation_config.json (graphs
                                 and weights stay out: their fingerprints identify them)
    pack/other/                  --compare: the other run's run.json, summary.json, the same steps, its cache
    pack/reports/compare.*       --compare OTHER: pipeline.compare OTHER RUN (RUN is the reference), text and JSON
    pack/reports/replay.*        --onnx_dir/--backend: pipeline.replay RUN on that candidate (OTHER as its
                                 free-running run when given), text and JSON
    pack/reports/ops.*           pipeline.ops on the run's onnx_dir, checked against --allow (packed too)

Exit status: 0 when the pack is written (whatever the reports in it say), 2 for bad input.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.core import layout
from pipeline.core.atomic import atomic_write_path
from pipeline.core.cli_args import ArgumentParser
from pipeline.core.errors import StagepipeError, cli_entry
from pipeline.core.jsonfile import load_manifest
from pipeline.tools import compare as compare_tool
from pipeline.tools import ops as ops_tool
from pipeline.tools import replay as replay_tool
from pipeline.tools.candidate import add_candidate_arguments, open_candidate, parse_steps, step_selected
from pipeline.tools.run_reading import find_onnx_dir, read_json
from pipeline.tools.report import dump_json

ROOT = "pack"
LIBRARIES = ("numpy", "onnx", "onnxruntime", "pydantic", "tokenizers", "doit", "jinja2")


def versions() -> dict:
    import importlib.metadata

    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            libs[name] = None
    return {"stagepipe": __version__, "stagepipe_commit": _git_commit(), "python": platform.python_version(),
            "platform": platform.platform(), "machine": platform.machine(), "libraries": libs}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class PackWriter:
    """Files into a tar.gz under pack/, each recorded with its size and sha256."""

    def __init__(self, tar: tarfile.TarFile):
        self.tar, self.files = tar, {}

    def add_bytes(self, name: str, data: bytes):
        info = tarfile.TarInfo(f"{ROOT}/{name}")
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        self.tar.addfile(info, io.BytesIO(data))
        self.files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def add_file(self, name: str, path: Path):
        self.add_bytes(name, Path(path).read_bytes())

    def add_text(self, name: str, text: str):
        self.add_bytes(name, text.encode())


def packed_steps(run: Path, chosen, first_failure: str | None) -> list[Path]:
    dirs = layout.step_dirs(run)
    if chosen is None and first_failure:
        return [d for d in dirs if d.name == first_failure]
    return [d for d in dirs if step_selected(chosen, layout.step_number(d.name))]


def add_run(w: PackWriter, run: Path, prefix: str, steps: list[str]) -> int:
    """run.json, summary.json, the named steps and the KV cache up to the last of them. -> slots kept."""
    for name in (layout.RUN_JSON, layout.SUMMARY_JSON):
        if (run / name).is_file():
            w.add_file(f"{prefix}/{name}", run / name)
    keep = 0
    for name in steps:
        d = run / name
        if not d.is_dir():
            continue
        for f in sorted(p for p in d.iterdir() if p.is_file()):
            w.add_file(f"{prefix}/{name}/{f.name}", f)
        meta = read_json(d / layout.META)
        keep = max(keep, int(meta.get("next_past_len", 0)) if meta else 0)
    kv = run / layout.KV_DIR
    if kv.is_dir():
        if (kv / layout.CACHE_JSON).is_file():
            w.add_file(f"{prefix}/{layout.KV_DIR}/{layout.CACHE_JSON}", kv / layout.CACHE_JSON)
        for path in layout.kv_files(kv):
            cache = np.array(np.load(path, mmap_mode="r"))
            cache[:, :, :, keep:] = 0  # later steps' slots: not what the packed steps read
            buf = io.BytesIO()
            np.save(buf, cache)
            w.add_bytes(f"{prefix}/{layout.KV_DIR}/{path.name}", buf.getvalue())
    return keep


def captured(fn, *args) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    return out.getvalue()


def pack(run: Path, out: Path, other: Path | None = None, candidate=None, steps: str | None = None,
         allow: Path | None = None, command: list[str] | None = None) -> dict:
    run = Path(run)
    if not layout.looks_like_run_dir(run):
        raise StagepipeError(f"{run}: not a run folder (run.json, step_NNNN/)")
    settings = read_json(run / layout.RUN_JSON)
    onnx_dir = find_onnx_dir(run, settings)
    reports, checks = {}, {}
    if other is not None:
        r = compare_tool.compare(other, run)
        reports["compare"] = (r, captured(compare_tool.print_report, r))
        first = r["first_failure"]
        checks["compare"] = "ok" if r["ok"] else f"FAIL: first failure {first['path']}" if first else "FAIL"
    if candidate is not None:
        r = replay_tool.replay(run, candidate, other)
        reports["replay"] = (r, captured(replay_tool.print_report, r))
        w = r["worst_stage"]
        checks["replay"] = "ok" if r["ok"] else f"FAIL: {w['stage']} introduces rel err {w['rel_err']:.3g}"
    if onnx_dir is not None:
        r = ops_tool.ops_report(onnx_dir, allow)
        reports["ops"] = (r, captured(ops_tool.print_report, r))
        checks["ops"] = "ok" if r["ok"] else f"FAIL: ops not allowed: {', '.join(r['disallowed_ops'])}"
    first_failure = reports["compare"][0]["first_failure"]["step"] if "compare" in reports and \
        reports["compare"][0]["first_failure"] else None
    names = [d.name for d in packed_steps(run, parse_steps(steps), first_failure)]
    if not names:
        raise StagepipeError(f"{run}: no step folder" + (f" in --steps {steps}" if steps else ""))
    with atomic_write_path(out) as tmp, tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        w = PackWriter(tar)
        slots = add_run(w, run, "run", names)
        if other is not None:
            add_run(w, Path(other), "other", names)
        fingerprints = {"run_onnx_fingerprint": (settings or {}).get("onnx_fingerprint")}
        if onnx_dir is not None:
            m = load_manifest(onnx_dir)
            fingerprints.update(graphs_fingerprint=m.graphs_fingerprint, source_fingerprint=m.source_fingerprint,
                                precision=m.precision, graph_format=m.graph_format)
            for name in (layout.MANIFEST, layout.MODEL_CONFIG, layout.GENERATION_CONFIG):
                if (onnx_dir / name).is_file():
                    w.add_file(f"onnx/{name}", onnx_dir / name)
        if allow is not None:
            w.add_file(f"reports/{Path(allow).name}", allow)
        for name, (report, text) in reports.items():
            w.add_text(f"reports/{name}.txt", text)
            w.add_text(f"reports/{name}.json", dump_json(report) + "\n")
        w.add_text("PACK.md", readme(run, other, names, slots, checks, command))
        manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command, "run": str(run),
                    "other": str(other) if other else None, "steps": names, "kv_slots_kept": slots,
                    "checks": checks, "fingerprints": fingerprints, "versions": versions(), "files": w.files}
        w.add_text("pack.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def readme(run: Path, other: Path | None, steps: list[str], slots: int, checks: dict, command) -> str:
    lines = ["# stagepipe repro pack", "", f"Made by: `{' '.join(command or ['python -m pipeline.pack'])}`", "",
             f"- `run/`: {run} (run.json = prompt and settings), steps {', '.join(steps)}, and its KV cache with "
             f"slots {slots} and later zeroed (what those steps read and wrote).",
             "- `onnx/`: the graphs' manifest and config; `pack.json` has the graphs' fingerprints, the "
             "tool and library versions and every file's sha256."]
    if other:
        lines.append(f"- `other/`: {other}, the same steps, compared against `run/` in `reports/compare.txt`.")
    lines += ["", "## Checks", ""] + [f"- {name}: {result}" for name, result in checks.items()]
    lines += ["", "## Reproduce a step", "",
              "With stagepipe installed and the same onnx_dir (check `graphs_fingerprint` in its manifest.json):",
              "", "```bash", "tar xzf pack.tar.gz && S=pack/run/" + steps[0],
              "python -m stages.block --block 0 --step_dir $S --onnx_dir ONNX_DIR "
              "--past_key pack/run/kv_cache/past_key_block0.npy --past_value pack/run/kv_cache/past_value_block0.npy "
              "--hidden_out /tmp/hidden_block1.npy",
              "python -m pipeline.compare pack/other pack/run      # when other/ is packed", "```", ""]
    return "\n".join(lines)


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="python -m pipeline.pack", description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="the run folder to pack (the golden run, for --compare)")
    p.add_argument("-o", "--out", type=Path, required=True, help="the .tar.gz to write")
    p.add_argument("--compare", type=Path, default=None, metavar="OTHER",
                   help="another run (a board's dumps) compared against RUN; its steps are packed too")
    add_candidate_arguments(p, "the run's onnx_dir")
    p.add_argument("--steps", default=None, help="steps to pack, e.g. 0-3 (default: compare's first failing "
                                                 "step, else all)")
    p.add_argument("--allow", type=Path, default=None, help="op allow file for the ops report (packed too)")
    a = p.parse_args(argv)
    default_dir = find_onnx_dir(a.run, read_json(a.run / layout.RUN_JSON)) if a.run.is_dir() else None
    candidate = open_candidate(a, default_dir)
    manifest = pack(a.run, a.out, a.compare, candidate, a.steps, a.allow,
                    command=["python", "-m", "pipeline.pack", *map(str, argv if argv is not None else sys.argv[1:])])
    size = a.out.stat().st_size
    print(f"{a.out}: {len(manifest['files'])} files, {size / 1e6:.1f} MB; steps {', '.join(manifest['steps'])}")
    for name, result in manifest["checks"].items():
        print(f"  {name}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
