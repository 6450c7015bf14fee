"""The README's command blocks, run in order on the demo model in a fresh copy of the repository, so the front
door cannot silently rot. A ```bash block preceded by `<!-- readme: skip ... -->` is not run (a real model, a
GPU, minutes of benchmark); a line ending in `# exit N` must exit N; every other line must exit 0. No command may
print a traceback or an error line over 200 characters."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/"  # the venv the tests run in is used


def readme_commands(text: str) -> list[tuple[str, int]]:
    """(command, expected exit code) for every runnable line of the README's bash blocks, in order."""
    commands, skip = [], False
    for block in re.finditer(r"(<!-- readme: skip[^>]*-->\s*\n)?```bash\n(.*?)```", text, re.S):
        if block.group(1):
            continue
        lines = iter(block.group(2).replace("\\\n", " ").splitlines())
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            expected = re.search(r"#\s*exit (\d+)\s*$", line)
            heredoc = re.search(r"<<\s*'?(\w+)'?", line)
            if heredoc:  # the here-document's lines belong to this command
                body = []
                for more in lines:
                    body.append(more)
                    if more.strip() == heredoc.group(1):
                        break
                line = "\n".join([line, *body])
            commands.append((line.replace(SETUP, ""), int(expected.group(1)) if expected else 0))
    return commands


def test_readme_parsing_skips_marked_blocks_and_reads_exit_codes():
    text = ("```bash\necho a   # exit 1\nls \\\n  -l\n```\n<!-- readme: skip (needs a GPU) -->\n```bash\nnvidia-smi\n```\n"
            f"```bash\n{SETUP}doit run_auto\n```\n")
    assert readme_commands(text) == [("echo a   # exit 1", 1), ("ls    -l", 0), ("doit run_auto", 0)]
    heredoc = "```bash\ncat > f <<'EOF'\n{\"a\": 1}\nEOF\nwc -l f\n```\n"
    assert readme_commands(heredoc) == [("cat > f <<'EOF'\n{\"a\": 1}\nEOF", 0), ("wc -l f", 0)]


def test_readme_commands_run_in_order(tmp_path):
    commands = readme_commands((REPO / "README.md").read_text())
    assert len(commands) >= 20 and commands[0][0] == "doit run_auto"
    work = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    script = ["set -u"]
    for i, (command, expected) in enumerate(commands):
        script += [command, f"rc=$?; if [ $rc -ne {expected} ]; then echo \"README command {i} exited $rc, "
                            f"expected {expected}\" >&2; exit 99; fi"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(work))
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    long_errors = [line for line in output.splitlines() if line.startswith("error:") and len(line) > 200]
    assert long_errors == []
    assert (work / "runs" / "demo" / "summary.json").exists()
