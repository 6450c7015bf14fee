"""The architecture holds: sub-packages import only lower layers, one module spells the file names, and dodo.py
only describes tasks (listing them is instant and writes nothing)."""
from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# a package may import itself and the packages of lower rank; equal ranks do not import each other
RANK = {"core": 0, "checkpoint": 1, "convert": 2, "runtime": 2, "demo": 2, "run": 3, "tools": 4, "web": 5, "npu": 5}
ALLOWED_SIDEWAYS = {("demo", "runtime")}  # the demo writes tokenizer files with the runtime's byte-level table


def imported_modules(path: Path) -> set[str]:
    """Every pipeline.* module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("pipeline.")}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in RANK else None


def test_no_upward_or_sideways_imports():
    bad = []
    for path in sorted((REPO / "pipeline").glob("*/*.py")):
        here = path.parent.name
        for module in imported_modules(path):
            there = package_of(module)
            if there is None or there == here or (here, there) in ALLOWED_SIDEWAYS:
                continue
            if RANK[there] >= RANK[here]:
                bad.append(f"{path.relative_to(REPO)} imports {module} ({here} -> {there})")
    assert not bad, "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pipeline.run.run_auto import Run\n")
    assert {package_of(m) for m in imported_modules(probe)} == {"run"}


def test_no_torch_or_transformers_outside_tests_and_training():
    users = [p for p in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "stages").rglob("*.py"), REPO / "dodo.py"]
             if {"torch", "transformers"} & {m.split(".")[0] for m in _all_imports(p)}]
    assert users == []


def _all_imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
    return mods


@pytest.mark.parametrize("name", ["meta.json", "run.json", "summary.json", "cache.json", "next_token_id.txt",
                                  "attention_mask.npy", "manifest.json"])
def test_file_names_are_spelled_only_in_the_layout_module(name):
    spelled = [str(p.relative_to(REPO)) for p in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "stages").rglob("*.py")]
               if f'"{name}"' in p.read_text() and p.name != "layout.py"]
    assert spelled == []


def _tree_state() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if "__pycache__" not in line and ".pytest_cache" not in line}


@pytest.mark.parametrize("args", [["list"], ["help", "run_auto"]])
def test_doit_list_and_help_are_instant_and_write_nothing(args):
    before = _tree_state()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "doit", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    assert "run_auto" in proc.stdout
    assert elapsed < 5  # 0.2 s here; generous for a loaded CI machine
    assert _tree_state() == before
