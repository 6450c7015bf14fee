"""Fault campaign: kill run_auto at many points and damage every kind of file it reads; each outcome must be the
uninterrupted run's tokens and files, or one clear error line.

    python -m benchmarks.fault_campaign --kills 100           # the full campaign (the README's figures)
    python -m benchmarks.fault_campaign --kills 16 --damage quick --json faults.json

On the demo checkpoint converted small (2 blocks, T=8, C=64; 11 steps: 2 prompt chunks, 9 decode steps):
- kills: chains of runs in one folder, each killed (SIGKILL, SIGTERM or SIGINT) at a point drawn from every
  phase: startup, prepare (lock taken: reconciling, cache, sessions), a prefill step, a decode step, and the end
  (after summary.json: doit saving its record, the process exiting: the last milliseconds). SIGINT is sent once
  the process holds the run folder's lock (before that no stagepipe code runs: Python prints its own
  KeyboardInterrupt). Each chain ends with a run left alone, which must equal the uninterrupted run.
- damage: a copy of a finished run (or of the onnx_dir) has one file truncated, deleted, given another dtype or
  shape, its JSON edited, a graph swapped, a symbolic link put in its place, or the disk filled (a file size
  limit; a small tmpfs where a mount namespace is allowed); then the same command runs again.

Outcomes: identical (tokens and every step file, meta.json without timings, equal to the uninterrupted run),
clear error (exit code 2 and exactly one `error:` line), edit followed with a note (a next_token_id.txt that
holds another valid token id is an edit by hand: the run follows it and says so), traceback, silently different
(exit 0 with other tokens or files, no note), other. Every case also checks that nothing outside the run folder changed (the onnx_dir, the
checkpoint, the reference run, files a link points to).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs far away."
NEW_TOKENS, T, C = 10, 8, 64
OUTCOMES = ("identical", "clear error", "edit followed, with a note", "traceback", "silently different", "other")
EDIT_NOTE = "the steps after it follow this edit"
PHASES = ("startup", "prepare", "prefill", "decode", "end")
# a step is over in milliseconds, startup takes a second: the steps are drawn more often
PHASE_WEIGHTS = {"startup": 1, "prepare": 1, "prefill": 2, "decode": 3, "end": 1}
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
INTERRUPTED = "interrupted; run the same command to resume"


@dataclass
class Sandbox:
    root: Path
    onnx: Path
    reference: Path
    outside: Path  # files the damage cases' links point to; they must never change
    reference_state: dict = field(default_factory=dict)

    def command(self, run_root: Path, onnx: Path | None = None) -> list[str]:
        return [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "--dir", str(REPO), "run_auto",
                "--onnx_dir", str(onnx or self.onnx), "--run_root", str(run_root), "--prompt", PROMPT,
                "--steps", str(NEW_TOKENS), "--ignore_eos"]

    def spawn(self, run_root: Path, onnx: Path | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.command(run_root, onnx), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_in_a_terminal)

    def run(self, run_root: Path, onnx: Path | None = None, preexec=None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(run_root, onnx), cwd=REPO, capture_output=True, text=True, timeout=600,
                              preexec_fn=preexec or _ctrl_c_as_in_a_terminal)

    def watched(self) -> dict:
        """What a run must never change: everything of the sandbox outside the run folders."""
        return snapshot([self.onnx, self.root / "model", self.reference, self.outside])


def _ctrl_c_as_in_a_terminal():
    """A command started in the background (`... &` in a script) ignores SIGINT; the runs here must see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_sandbox(root: Path) -> Sandbox:
    from pipeline.convert.onnx_dir import convert
    from pipeline.demo.checkpoint import write_demo_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    write_demo_checkpoint(root / "model", seed=0)
    convert(root / "model", root / "onnx", blocks=2, max_input_len=T, max_cache_len=C, log=lambda *a: None)
    sb = Sandbox(root, root / "onnx", root / "reference", root / "outside")
    sb.outside.mkdir(exist_ok=True)
    (sb.outside / "canary.txt").write_text("must never change\n")
    proc = sb.run(sb.reference)
    if proc.returncode:
        raise SystemExit(f"the uninterrupted run failed:\n{proc.stdout}\n{proc.stderr}")
    sb.reference_state = run_state(sb.reference)
    return sb


def snapshot(paths) -> dict:
    out = {}
    for top in paths:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                out[p] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def run_state(run_dir: Path) -> dict:
    """The generated tokens and every step file (meta.json without stage timings): what a resumed or repaired
    run must repeat exactly."""
    from pipeline.core.layout import META, SUMMARY_JSON, step_dirs

    state = {"tokens": json.loads((run_dir / SUMMARY_JSON).read_text())["generated_token_ids"]}
    for d in step_dirs(run_dir):
        for p in sorted(d.iterdir()):
            if p.name.startswith("."):
                continue
            if p.name == META:
                meta = json.loads(p.read_text())
                for record in meta["stages"].values():
                    record.pop("seconds")
                state[f"{d.name}/{p.name}"] = meta
            else:
                state[f"{d.name}/{p.name}"] = p.read_bytes()
    return state


def classify(proc: subprocess.CompletedProcess, run_dir: Path, sb: Sandbox) -> str:
    if "Traceback" in proc.stdout + proc.stderr:
        return "traceback"
    if proc.returncode == 0:
        try:
            same = run_state(run_dir) == sb.reference_state
        except (OSError, ValueError, KeyError):
            same = False
        if same:
            return "identical"
        # next_token_id.txt holding another valid token id is an edit by hand (README: Edit), which the run
        # follows and says so in a note on every run
        return "edit followed, with a note" if EDIT_NOTE in proc.stderr else "silently different"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return "clear error" if proc.returncode == 2 and len(errors) == 1 else "other"


def last_error(proc, stderr: str | None = None) -> str:
    lines = [line for line in (proc.stderr if stderr is None else stderr).splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- kills -----------------------------------------------------------------------------------------------------
STEP_FILES = ("input_ids.npy", "hidden_block0.npy", "hidden_block1.npy", "hidden_block2.npy", "logits.npy",
              "meta.json", "next_token_id.txt")


def _fresh(path: Path, since_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns >= since_ns
    except FileNotFoundError:
        return False


def _lock_held_by(run_dir: Path, pid: int) -> bool:
    try:
        return (run_dir / ".lock").read_text().strip() == str(pid)
    except (OSError, ValueError):
        return False


def _finished_steps(run_dir: Path) -> int:
    from pipeline.core.layout import step_name

    n = 0
    while True:
        try:
            meta = json.loads((run_dir / step_name(n) / "meta.json").read_text())
        except (OSError, ValueError):
            return n
        if "output" not in meta.get("stages", {}):
            return n
        n += 1


def _pick_kill(rng: random.Random, sig_name: str, done: int, n_chunks: int, n_steps: int, killed=frozenset()):
    """-> (phase, trigger(run_dir, pid, t0_ns) -> bool, delay_s): kill `delay_s` after the trigger holds. Phases
    no kill has hit yet (`killed`: those that have) go first, so that a short campaign covers them all."""
    phases = [p for p in PHASES if not (p == "startup" and sig_name == "SIGINT")
              and not (p == "prefill" and done >= n_chunks) and not (p == "decode" and done >= n_steps)]
    phases = [p for p in phases if p not in killed] or phases
    phase = rng.choices(phases, [PHASE_WEIGHTS[p] for p in phases])[0]
    if phase == "startup":
        return phase, lambda run_dir, pid, t0: True, rng.uniform(0.0, 1.2)
    if phase == "prepare":
        return phase, lambda run_dir, pid, t0: _lock_held_by(run_dir, pid), rng.uniform(0.0, 0.4)
    if phase == "end":
        return phase, lambda run_dir, pid, t0: _fresh(run_dir / "summary.json", t0), rng.choice((0.0, 0.002, 0.005, 0.02)) * rng.random()
    low, high = (max(done, 0), n_chunks) if phase == "prefill" else (max(done, n_chunks), n_steps)
    step, name = rng.randrange(low, high), rng.choice(STEP_FILES)
    if name == "next_token_id.txt" and step < n_chunks - 1:
        name = "logits.npy"  # a prompt chunk followed by another samples nothing
    target = f"step_{step:04d}/{name}"
    return phase, lambda run_dir, pid, t0: _fresh(run_dir / target, t0), rng.uniform(0.0, 0.003)


def kill_once(sb: Sandbox, run_dir: Path, rng: random.Random, signals, n_chunks: int, n_steps: int,
              killed=frozenset()) -> dict:
    sig_name = rng.choice(signals)
    phase, trigger, delay = _pick_kill(rng, sig_name, _finished_steps(run_dir), n_chunks, n_steps, killed)
    t0 = time.time_ns()
    proc = sb.spawn(run_dir)
    fired = False
    while proc.poll() is None:
        if trigger(run_dir, proc.pid, t0):
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(SIGNALS[sig_name])
                fired = True
            break
        time.sleep(0.0005)
    record_saved = _fresh(run_dir / ".doit.db", t0)
    out, err = proc.communicate(timeout=600)
    clean = "Traceback" not in out + err
    expected = {"SIGINT": 130, "SIGTERM": 143}.get(sig_name)
    if expected and fired and proc.returncode != -SIGNALS[sig_name]:
        # Ctrl-C and SIGTERM get their line and exit code 130 / 143; only while the interpreter starts or exits
        # (no stagepipe code running, nothing printed) does the process end by the signal itself
        clean = clean and proc.returncode in (0, expected) and (proc.returncode == 0 or
                                                                 last_error(proc, err) == INTERRUPTED)
    return {"phase": phase, "signal": sig_name, "killed": fired and proc.returncode != 0, "rc": proc.returncode,
            "clean_exit": clean, "record_saved_before_kill": record_saved, "stderr_tail": last_error(proc, err)}


def kill_campaign(sb: Sandbox, kills: int, seed: int, log=print) -> dict:
    from pipeline.core.layout import step_dirs

    rng = random.Random(seed)
    n_steps = len(step_dirs(sb.reference))
    n_chunks = n_steps - (NEW_TOKENS - 1)
    signals = list(SIGNALS)
    records, chains, outcomes = [], 0, Counter()
    outside_changed = 0
    while len(records) < kills:
        chains += 1
        run_dir = sb.root / "kills" / f"chain{chains:03d}"
        before = sb.watched()
        for _ in range(rng.randint(3, 8)):
            if len(records) >= kills:
                break
            if _finished_steps(run_dir) >= n_steps and rng.random() < 0.5:
                break  # a finished run: a kill or two while it is rerun, then a new chain
            r = kill_once(sb, run_dir, rng, signals, n_chunks, n_steps, {r["phase"] for r in records})
            if r["killed"]:
                records.append(r)
        final = sb.run(run_dir)
        outcome = classify(final, run_dir, sb)
        outcomes[outcome] += 1
        changed = sb.watched() != before
        outside_changed += changed
        log(f"  chain {chains}: {len(records)} kills so far; after them: {outcome}"
            f"{' (' + last_error(final) + ')' if outcome != 'identical' else ''}"
            f"{'; WROTE OUTSIDE THE RUN FOLDER' if changed else ''}")
    return {"kills": len(records), "chains": chains, "final_outcomes": dict(outcomes),
            "by_signal": dict(Counter(r["signal"] for r in records)),
            "by_phase": dict(Counter(r["phase"] for r in records)),
            "end_phase_before_record_saved": sum(r["phase"] == "end" and not r["record_saved_before_kill"]
                                                 for r in records),
            "killed_runs_with_traceback_or_unclean_sigint": sum(not r["clean_exit"] for r in records),
            "unclean": [r for r in records if not r["clean_exit"]][:5],
            "chains_writing_outside": outside_changed}


# -- damage ----------------------------------------------------------------------------------------------------
def _own(path: Path) -> Path:
    """Give a file its own inode (onnx_dir copies share the originals' by hard link) before changing it."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def _truncate(path: Path):
    _own(path).write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path):
    data = bytearray(_own(path).read_bytes())
    data[-7] ^= 0x40
    path.write_bytes(bytes(data))


def _edit_json(path: Path, edit):
    data = json.loads(path.read_text())
    edit(data)
    _own(path).write_text(json.dumps(data))


def _retype(path: Path):
    arr = np.load(path)
    np.save(path, arr.astype(np.float64 if arr.dtype.kind == "f" else np.int32))


def _reshape(path: Path):
    np.save(path, np.load(path).reshape(-1)[None, None])


def _link_out(path: Path, outside: Path):
    """Put a link to a file (or folder) outside the run folder in place of `path`."""
    target = outside / f"link-target-{path.name}"
    if not target.exists():
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            target.write_bytes(path.read_bytes() if path.exists() else b"outside\n")
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.symlink_to(target)


def _zero_slots(path: Path, slot: int):
    arr = np.load(path, mmap_mode="r+")
    arr[:, :, :, slot] = 0
    arr.flush()
    del arr


def damage_cases(quick: bool):
    """(name, action(run_dir, onnx_dir, outside)) for every kind of damage; quick: one of each kind."""
    S, P = "step_0003", "step_0000"  # a decode step and the first prompt chunk
    cases = []
    files = ("input_ids.npy", "attention_mask.npy", "position_ids.npy", "hidden_block0.npy", "hidden_block1.npy",
             "hidden_block2.npy", "logits.npy", "meta.json", "next_token_id.txt", "next_token.txt")
    for step in (S, P):
        for f in files:
            if step == P and f.startswith("next_token"):
                continue  # the first chunk is followed by another: it samples nothing
            cases.append((f"truncate {step}/{f}", lambda r, o, x, p=f"{step}/{f}": _truncate(r / p)))
            cases.append((f"delete {step}/{f}", lambda r, o, x, p=f"{step}/{f}": (r / p).unlink()))
    for f in ("input_ids.npy", "attention_mask.npy", "hidden_block1.npy", "logits.npy"):
        cases.append((f"wrong dtype {S}/{f}", lambda r, o, x, p=f"{S}/{f}": _retype(r / p)))
        cases.append((f"wrong shape {S}/{f}", lambda r, o, x, p=f"{S}/{f}": _reshape(r / p)))
        cases.append((f"flipped byte {S}/{f}", lambda r, o, x, p=f"{S}/{f}": _flip_byte(r / p)))
    meta = f"{S}/meta.json"
    for name, edit in (("past_len + 1", lambda m: m.update(past_len=m["past_len"] + 1)),
                       ("past_len and next_past_len + 1", lambda m: m.update(past_len=m["past_len"] + 1,
                                                                            next_past_len=m["next_past_len"] + 1)),
                       ("q_len 2", lambda m: m.update(q_len=2)),
                       ("history changed", lambda m: m.update(history="0" * 32)),
                       ("block0 record dropped", lambda m: m["stages"].pop("block0")),
                       ("output record dropped", lambda m: m["stages"].pop("output")),
                       ("mode sideways", lambda m: m.update(mode="sideways"))):
        cases.append((f"edited {meta}: {name}", lambda r, o, x, e=edit: _edit_json(r / meta, e)))
    cases += [
        (f"garbage {S}/next_token_id.txt", lambda r, o, x: (r / S / "next_token_id.txt").write_text("abc\n")),
        (f"delete the folder {S}", lambda r, o, x: shutil.rmtree(r / S)),
        (f"stray folder {S}.bak", lambda r, o, x: shutil.copytree(r / S, r / f"{S}.bak")),
        ("stray file and folder", lambda r, o, x: ((r / "notes.txt").write_text("x"), (r / "step_03").mkdir())),
        ("truncate run.json", lambda r, o, x: _truncate(r / "run.json")),
        ("delete run.json", lambda r, o, x: (r / "run.json").unlink()),
        ("edited run.json: prompt", lambda r, o, x: _edit_json(r / "run.json", lambda m: m.update(prompt="Hi"))),
        ("edited run.json: sampling seed", lambda r, o, x: _edit_json(r / "run.json",
                                                                       lambda m: m["sampling"].update(seed=5))),
        ("truncate summary.json", lambda r, o, x: _truncate(r / "summary.json")),
        ("delete summary.json", lambda r, o, x: (r / "summary.json").unlink()),
        ("truncate kv_cache/past_key_block1.npy", lambda r, o, x: _truncate(r / "kv_cache/past_key_block1.npy")),
        ("delete kv_cache/past_value_block0.npy", lambda r, o, x: (r / "kv_cache/past_value_block0.npy").unlink()),
        ("delete kv_cache/", lambda r, o, x: shutil.rmtree(r / "kv_cache")),
        ("delete kv_cache/cache.json", lambda r, o, x: (r / "kv_cache/cache.json").unlink()),
        ("truncate kv_cache/cache.json", lambda r, o, x: _truncate(r / "kv_cache/cache.json")),
        ("edited kv_cache/cache.json: fingerprint",
         lambda r, o, x: _edit_json(r / "kv_cache/cache.json", lambda m: m.update(onnx_fingerprint="0" * 64))),
        ("wrong dtype kv_cache/past_key_block0.npy", lambda r, o, x: _retype(r / "kv_cache/past_key_block0.npy")),
        ("wrong shape kv_cache/past_value_block1.npy",
         lambda r, o, x: _reshape(r / "kv_cache/past_value_block1.npy")),
        ("zeroed slots kv_cache/past_key_block1.npy", lambda r, o, x: _zero_slots(r / "kv_cache/past_key_block1.npy",
                                                                                   11)),
        ("flipped byte kv_cache/past_value_block0.npy", lambda r, o, x: _flip_byte(r / "kv_cache/past_value_block0.npy")),
        ("truncate .doit.db", lambda r, o, x: _truncate(r / ".doit.db")),
        ("empty .doit.db", lambda r, o, x: (r / ".doit.db").write_bytes(b"")),
        ("garbage .doit.db", lambda r, o, x: (r / ".doit.db").write_bytes(b"\x00\xff not json")),
        ("truncate manifest.json", lambda r, o, x: _truncate(o / "manifest.json")),
        ("edited manifest.json: mask_value 0", lambda r, o, x: _edit_json(o / "manifest.json",
                                                                          lambda m: m.update(mask_value=0))),
        ("edited manifest.json: blocks []", lambda r, o, x: _edit_json(o / "manifest.json",
                                                                       lambda m: m.update(blocks=[]))),
        ("edited manifest.json: max_input_len 0", lambda r, o, x: _edit_json(o / "manifest.json",
                                                                             lambda m: m.update(max_input_len=0))),
        ("edited manifest.json: graph path ../", lambda r, o, x: _edit_json(
            o / "manifest.json", lambda m: m["graphs"]["decode_c16"]["block0"].update(file="../../outside.onnx"))),
        ("swapped graph prefill/block1_c16.onnx", lambda r, o, x: _own(o / "prefill/block1_c16.onnx").write_bytes(
            (o / "prefill/block0_c16.onnx").read_bytes())),
        ("swapped graph prefill/block0.onnx", lambda r, o, x: _own(o / "prefill/block0.onnx").write_bytes(
            (o / "prefill/block1.onnx").read_bytes())),
        ("truncate prefill/embed.onnx", lambda r, o, x: _truncate(o / "prefill/embed.onnx")),
        ("delete decode/output.onnx", lambda r, o, x: (o / "decode/output.onnx").unlink()),
        ("truncate decode/block1.data", lambda r, o, x: _truncate(o / "decode/block1.data")),
        ("flipped byte decode/output.data", lambda r, o, x: _flip_byte(o / "decode/output.data")),
    ]
    for rel in (".lock", ".doit.db", "run.json", "summary.json", "kv_cache/past_key_block0.npy",
                "kv_cache/cache.json", "kv_cache", S, f"{S}/logits.npy", f"{S}/meta.json"):
        cases.append((f"symlink {rel}", lambda r, o, x, p=rel: _link_out(r / p, x)))
    return [c for c in cases if c[0] in QUICK] if quick else cases


# one case of each kind, for the test suite
QUICK = ("truncate step_0003/logits.npy", "delete step_0003/attention_mask.npy",
         "wrong dtype step_0003/hidden_block1.npy", "wrong shape step_0003/input_ids.npy",
         "edited step_0003/meta.json: past_len + 1", "delete kv_cache/", "truncate kv_cache/past_key_block1.npy",
         "edited manifest.json: mask_value 0", "swapped graph prefill/block1_c16.onnx",
         "symlink kv_cache/past_key_block0.npy")


def _needs_own_onnx(name: str) -> bool:
    return any(k in name for k in ("manifest.json", ".onnx", ".data"))


def _own_onnx(sb: Sandbox, dst: Path) -> Path:
    """A copy of the onnx_dir whose files are hard links of the originals (damage gives a file its own inode)."""
    shutil.copytree(sb.onnx, dst, copy_function=os.link)
    return dst


def damage_campaign(sb: Sandbox, quick: bool, log=print, full_disk: bool = True) -> dict:
    results = []
    for i, (name, action) in enumerate(damage_cases(quick)):
        case = sb.root / "damage" / f"{i:03d}"
        run_dir = case / "run"
        shutil.copytree(sb.reference, run_dir, symlinks=True)
        onnx = _own_onnx(sb, case / "onnx") if _needs_own_onnx(name) else None
        action(run_dir, onnx, sb.outside)
        before = sb.watched()
        proc = sb.run(run_dir, onnx)
        outcome = classify(proc, run_dir, sb)
        changed = sb.watched() != before
        results.append({"case": name, "outcome": outcome, "rc": proc.returncode, "line": last_error(proc),
                        "wrote_outside": changed})
        log(f"  {name}: {outcome}{' (' + last_error(proc) + ')' if outcome != 'identical' else ''}"
            f"{'; WROTE OUTSIDE THE RUN FOLDER' if changed else ''}")
    if full_disk:
        results += full_disk_cases(sb, log)
    return {"cases": len(results), "outcomes": dict(Counter(r["outcome"] for r in results)),
            "writes_outside": sum(r["wrote_outside"] for r in results), "results": results}


def _file_size_limit(limit: int):
    def preexec():
        _ctrl_c_as_in_a_terminal()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def full_disk_cases(sb: Sandbox, log=print, limits=(100_000, 400_000)) -> list[dict]:
    """A run that cannot write (a file size limit; a 1 MiB tmpfs in a mount namespace where one can be made):
    one clear line naming the file; then, with room again, the same command finishes identical."""
    results = []
    for limit in limits:
        run_dir = sb.root / "full_disk" / f"fsize{limit}"
        before = sb.watched()
        first = sb.run(run_dir, preexec=_file_size_limit(limit))
        again = sb.run(run_dir)
        for name, proc in ((f"file size limit {limit // 1000} KB", first), ("  ... then with room again", again)):
            outcome = classify(proc, run_dir, sb)
            results.append({"case": name, "outcome": outcome, "rc": proc.returncode, "line": last_error(proc),
                            "wrote_outside": sb.watched() != before})
            log(f"  {name}: {outcome}{' (' + last_error(proc) + ')' if outcome != 'identical' else ''}")
    results += _tmpfs_case(sb, log)
    return results


def _tmpfs_case(sb: Sandbox, log) -> list[dict]:
    unshare = shutil.which("unshare")
    if not unshare:
        return []
    mnt = sb.root / "full_disk" / "tmpfs"
    mnt.mkdir(parents=True, exist_ok=True)
    keep = sb.root / "full_disk" / "tmpfs_run"
    out = sb.root / "full_disk" / "tmpfs_out.json"
    cmd = " ".join(f"'{c}'" for c in sb.command(mnt / "run"))
    script = (f"mount -t tmpfs -o size=1m tmpfs '{mnt}' || exit 99\n"
              f"cd '{REPO}'\n"
              f"{cmd} >'{mnt}.1.out' 2>'{mnt}.1.err'; echo $? >'{mnt}.1.rc'\n"
              f"mount -o remount,size=64m '{mnt}'\n"
              f"{cmd} >'{mnt}.2.out' 2>'{mnt}.2.err'; echo $? >'{mnt}.2.rc'\n"
              f"cp -a '{mnt}/run' '{keep}'\n"
              f"mount -o remount,ro '{mnt}'\n"
              f"{cmd} >'{mnt}.3.out' 2>'{mnt}.3.err'; echo $? >'{mnt}.3.rc'\n")
    flags = ["-m"] if os.geteuid() == 0 else ["-rm"]
    probe = subprocess.run([unshare, *flags, "sh", "-c", script], capture_output=True, text=True)
    if probe.returncode == 99 or not Path(f"{mnt}.1.rc").exists():
        log("  (no small tmpfs: mount namespaces are not allowed here)")
        return []
    results = []
    for i, name in ((1, "tmpfs of 1 MiB full"), (2, "  ... then with room again"), (3, "  ... then read-only")):
        proc = subprocess.CompletedProcess([], int(Path(f"{mnt}.{i}.rc").read_text()),
                                           Path(f"{mnt}.{i}.out").read_text(), Path(f"{mnt}.{i}.err").read_text())
        outcome = classify(proc, keep, sb)
        results.append({"case": name, "outcome": outcome, "rc": proc.returncode, "line": last_error(proc),
                        "wrote_outside": False})
        log(f"  {name}: {outcome}{' (' + last_error(proc) + ')' if outcome != 'identical' else ''}")
    out.write_text(json.dumps(results))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.fault_campaign", description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=100, help="kills in all (default: 100)")
    p.add_argument("--damage", choices=("all", "quick", "none"), default="all",
                   help="damage cases: every one, one of each kind, or none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="sandbox folder (default: a temporary one, removed)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    a = p.parse_args(argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="stagepipe-faults-"))
    started = time.perf_counter()
    try:
        print(f"sandbox {work}: converting the demo checkpoint, running the uninterrupted reference ...", flush=True)
        sb = make_sandbox(work)
        print(f"kills ({a.kills}):", flush=True)
        kills = kill_campaign(sb, a.kills, a.seed, log=lambda line: print(line, flush=True))
        damage = {"cases": 0, "outcomes": {}, "writes_outside": 0, "results": []}
        if a.damage != "none":
            print("damage:", flush=True)
            damage = damage_campaign(sb, a.damage == "quick", log=lambda line: print(line, flush=True))
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    figures = {"kills": kills, "damage": damage, "seconds": round(time.perf_counter() - started, 1)}
    print(summary_text(figures))
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def summary_text(f: dict) -> str:
    k, d = f["kills"], f["damage"]
    finals = Counter(k["final_outcomes"])
    damage = Counter(d["outcomes"])
    tracebacks = finals["traceback"] + damage["traceback"] + k["killed_runs_with_traceback_or_unclean_sigint"]
    return "\n".join([
        f"kills: {k['kills']} in {k['chains']} chains; by signal {k['by_signal']}; by phase {k['by_phase']} "
        f"({k['end_phase_before_record_saved']} at the end before doit's record was saved)",
        f"  chains whose next run was identical to the uninterrupted run: {finals['identical']}/{k['chains']}; "
        f"clear error {finals['clear error']}; silently different {finals['silently different']}; "
        f"other {finals['other']}",
        f"  killed runs with a traceback (or a Ctrl-C or SIGTERM without its line and exit code 130 or 143): "
        f"{k['killed_runs_with_traceback_or_unclean_sigint']}",
        f"damage cases: {d['cases']}: identical {damage['identical']}, clear error {damage['clear error']}, "
        f"edit followed with a note {damage['edit followed, with a note']}, traceback {damage['traceback']}, "
        f"silently different {damage['silently different']}, other {damage['other']}",
        f"tracebacks: {tracebacks}; silently different: {finals['silently different'] + damage['silently different']}; "
        f"writes outside the run folder: {k['chains_writing_outside'] + d['writes_outside']}",
        f"({f['seconds']} s)"])


if __name__ == "__main__":
    main()
