"""run_auto: plan a generation as doit tasks, one per (step, stage), and the actions those tasks run.

Step s < n_chunks prefills prompt chunk s (max_input_len tokens each); every later step decodes the token the
step before it sampled. Tasks exist for every step the run may need; a step after the run stopped (end of
sequence) does nothing but remove any stale folder of that number. Stages run in this process with one
backend, so each graph's onnxruntime session is created once per run.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from pipeline.runtime import stage_ops
from pipeline.core.atomic import write_text
from pipeline.runtime.backends import make_backend
from pipeline.core.errors import StagepipeError
from pipeline.runtime.generate import prompt_chunks
from pipeline.runtime.kv_cache import KVCacheDir
from pipeline.core.jsonfile import load_manifest
from pipeline.run.lock import lock_run_dir
from pipeline.runtime.sampling import check_sampling
from pipeline.runtime.stage_ops import StepPaths, final_hidden
from pipeline.runtime.tokenizer import Tokenizer
from pipeline.core.jsonfile import load_model_file
from schemas.run import RunSettings, RunSummary, SamplingSettings

DEFAULT_PROMPT = "Give me a short introduction to large language models."


@dataclass
class RunParams:
    prompt: str
    onnx_dir: Path
    run_root: Path
    steps: int = 32
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    chat: bool = False
    no_think: bool = False
    backend: str = "onnx"
    ignore_eos: bool = False
    from_step: int | None = None
    clean: bool = False
    reset_kv: bool = False
    full_logits: bool = False
    provider: str = "cpu"


def step_name(s: int) -> str:
    return f"step_{s:04d}"


def read_token(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        raise StagepipeError(f"{path}: expected one integer token id; fix the file or rerun the output stage") from None


class Run:
    def __init__(self, params: RunParams):
        self.params = params
        self.dir = Path(params.run_root)
        self.manifest = load_manifest(params.onnx_dir)
        m = self.manifest
        self.tokenizer = Tokenizer.load(params.onnx_dir)
        if not params.prompt.strip():
            raise StagepipeError("--prompt is empty; give some text")
        text = Tokenizer.chat_prompt(params.prompt, no_think=params.no_think) if params.chat else params.prompt
        ids = self.tokenizer.encode(text)
        if len(ids) >= m.max_cache_len:
            raise StagepipeError(f"the prompt has {len(ids)} tokens; the {m.max_cache_len}-slot KV cache needs room "
                                 "for at least one more: shorten it or convert with a larger --max_cache_len")
        if params.steps < 1:
            raise StagepipeError(f"--steps {params.steps}: must be at least 1")
        self.settings = RunSettings(
            prompt=params.prompt, chat=params.chat, no_think=params.no_think, prompt_token_ids=ids,
            onnx_dir=str(Path(params.onnx_dir).resolve()), onnx_fingerprint=m.graphs_fingerprint, backend=params.backend,
            max_new_tokens=params.steps, ignore_eos=params.ignore_eos, full_logits=params.full_logits,
            stop_token_ids=[] if params.ignore_eos else m.model.eos_token_ids,
            sampling=check_sampling(params.sampling))
        self.chunks = prompt_chunks(ids, m.max_input_len)
        # the first new token comes from the last prompt step; each decode step then feeds one token in
        decode_steps = min(params.steps - 1, m.max_cache_len - len(ids))
        self.n_steps = len(self.chunks) + decode_steps
        self._backend = None
        self._kv = None
        self._stopped: dict[int, bool] = {}

    # -- helpers -------------------------------------------------------------------------------------------------
    def step_dir(self, s: int) -> Path:
        return self.dir / step_name(s)

    def past_len(self, s: int) -> int:
        n = len(self.chunks)
        return s * self.manifest.max_input_len if s < n else len(self.settings.prompt_token_ids) + (s - n)

    @property
    def backend(self):
        if self._backend is None:
            # this process runs stages only: their sessions can share one thread pool
            kwargs = {"provider": self.params.provider, "process_pool": True} if self.params.backend == "onnx" else {}
            self._backend = make_backend(self.params.backend, self.params.onnx_dir, self.manifest, **kwargs)
        return self._backend

    @property
    def kv(self) -> KVCacheDir:
        if self._kv is None:
            self._kv = KVCacheDir(self.dir / "kv_cache", self.manifest).open(create=True)
        return self._kv

    def stopped_before(self, s: int) -> bool:
        """True when an earlier step ended the run (end-of-sequence token), so step s must not run.

        Memoized per step: a step's answer is asked only after every earlier step finished in this process."""
        if not self.settings.stop_token_ids or s < len(self.chunks):
            return False
        if s not in self._stopped:
            token_file = self.step_dir(s - 1) / "next_token_id.txt"
            ended = token_file.exists() and read_token(token_file) in self.settings.stop_token_ids
            self._stopped[s] = ended or self.stopped_before(s - 1)
        return self._stopped[s]

    # -- actions -------------------------------------------------------------------------------------------------
    def prepare(self):
        """Lock the folder, reconcile run.json with these settings, apply --clean / --from_step / --reset_kv."""
        lock_run_dir(self.dir)
        for stale in self.dir.glob("**/.*.tmp"):  # a write cut short by a crash (kill -9) leaves its temp file
            stale.unlink(missing_ok=True)
        p = self.params
        run_json = self.dir / "run.json"
        if p.clean:
            for child in self.dir.iterdir():
                if child.name not in (".lock",) and not child.name.startswith(".doit"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        from_step = 0 if p.reset_kv else p.from_step
        if run_json.exists():
            old = load_model_file(run_json, RunSettings)
            fixed = ("prompt", "chat", "no_think", "prompt_token_ids", "onnx_fingerprint", "backend", "ignore_eos",
                     "full_logits")
            changed = [f for f in fixed if getattr(old, f) != getattr(self.settings, f)]
            if old.sampling != self.settings.sampling:
                changed.append("sampling")
            if changed and from_step is None:
                raise StagepipeError(f"{run_json}: this run was made with other {', '.join(changed)}; use "
                                     "--from_step K to regenerate from step K, --clean to start over, or another "
                                     "--run_root")
            if "onnx_fingerprint" in changed and not p.reset_kv and (self.dir / "kv_cache").exists():
                raise StagepipeError(f"{self.dir}: the onnx_dir changed since this run began; add --reset_kv to "
                                     "recompute the run with the new graphs")
        existing = sorted(d for d in self.dir.glob("step_*") if d.is_dir())
        if from_step is not None:
            if from_step < 0:
                raise StagepipeError(f"--from_step {from_step}: must be >= 0")
            for d in existing:
                if int(d.name.split("_")[1]) >= from_step:
                    shutil.rmtree(d)
        else:
            beyond = [d.name for d in existing if int(d.name.split("_")[1]) >= self.n_steps]
            if beyond:
                raise StagepipeError(f"{self.dir} already has {beyond[0]}, past the {self.n_steps} steps these "
                                     f"settings plan; raise --steps, or discard with --from_step {self.n_steps}")
        if p.reset_kv:
            KVCacheDir(self.dir / "kv_cache", self.manifest).open(create=True, reset=True)
        write_text(run_json, self.settings.model_dump_json(indent=2) + "\n")
        self.kv  # create or check the cache now, before any step runs
        if hasattr(self.backend, "open_all"):
            # sessions up front: step timings (TTFT, tokens/s) measure compute only
            self.backend.open_all(max_tokens=len(self.settings.prompt_token_ids) + self.n_steps - len(self.chunks))

    def embed(self, s: int):
        if self.stopped_before(s):
            shutil.rmtree(self.step_dir(s), ignore_errors=True)
            return
        n = len(self.chunks)
        tokens = self.chunks[s] if s < n else [read_token(self.step_dir(s - 1) / "next_token_id.txt")]
        stage_ops.token_embed(self.backend, StepPaths(self.step_dir(s)), s, self.past_len(s), tokens,
                              self.settings.sampling, sample_next=s >= n - 1,
                              prev_step_dir=self.step_dir(s - 1) if s else None)

    def block(self, s: int, k: int):
        if self.stopped_before(s):
            return
        stage_ops.block(self.backend, StepPaths(self.step_dir(s)), k, *self.kv.past(k))

    def output(self, s: int):
        if self.stopped_before(s):
            return
        meta = stage_ops.output(self.backend, StepPaths(self.step_dir(s)), None, None, self.tokenizer.token_text,
                                self.params.full_logits)
        if meta.next_token_id is not None:
            if s == len(self.chunks) - 1:
                print(self.settings.prompt, end="", flush=True)
            print(self.tokenizer.decode([meta.next_token_id]), end="", flush=True)

    def summarize(self) -> RunSummary:
        self.kv.flush()
        summary = build_summary(self)
        write_text(self.dir / "summary.json", summary.model_dump_json(indent=2) + "\n")
        rate = f"{summary.decode_tokens_per_s:.1f} tokens/s decode" if summary.decode_tokens_per_s else "no decode"
        ttft = f"{summary.time_to_first_token_s:.3f}s" if summary.time_to_first_token_s is not None else "-"
        print(f"\n[{self.dir}: {summary.steps} steps, {len(summary.generated_token_ids)} new tokens, "
              f"stop: {summary.stop_reason}, first token {ttft}, {rate}]", flush=True)
        return summary

    # -- doit tasks ----------------------------------------------------------------------------------------------
    def tasks(self, basename: str = "run_auto"):
        """doit task dicts: prepare, then embed/block{k}/output per step, then summary."""
        m, n = self.manifest, len(self.chunks)
        blocks = len(m.blocks)
        yield {"basename": basename, "name": "prepare", "actions": [_guard(self.prepare)], "uptodate": [False],
               "verbosity": 2}
        outputs = []
        for s in range(self.n_steps):
            d, name = self.step_dir(s), step_name(s)
            stopped = (lambda s=s: False if self.stopped_before(s) else None,)
            # the previous step's last hidden states stand for the cache content (stage_ops.history_of)
            history = [str(final_hidden(self.step_dir(s - 1), m))] if s else []
            deps = list(history)
            if s >= n:
                deps.append(str(self.step_dir(s - 1) / "next_token_id.txt"))
            step_config = {"tokens": self.chunks[s] if s < n else "previous", "past_len": self.past_len(s),
                           "onnx": m.graphs_fingerprint, "backend": self.params.backend}
            yield {"basename": basename, "name": f"{name}:embed", "actions": [_guard(self.embed, s)],
                   "file_dep": deps, "task_dep": [f"{basename}:prepare"], "verbosity": 2,
                   "uptodate": [*stopped, config_changed(step_config)],
                   "targets": [str(d / f) for f in ("input_ids.npy", "attention_mask.npy", "position_ids.npy",
                                                    "hidden_block0.npy", "meta.json")]}
            for k in range(blocks):
                yield {"basename": basename, "name": f"{name}:block{k}", "actions": [_guard(self.block, s, k)],
                       "file_dep": [str(d / f"hidden_block{k}.npy"), str(d / "attention_mask.npy"),
                                    str(d / "position_ids.npy"), *history],
                       "targets": [str(d / f"hidden_block{k + 1}.npy")], "uptodate": [*stopped], "verbosity": 2}
            targets = [str(d / "logits.npy")]
            if s >= n - 1:
                targets += [str(d / "next_token_id.txt"), str(d / "next_token.txt")]
            yield {"basename": basename, "name": f"{name}:output", "actions": [_guard(self.output, s)],
                   "file_dep": [str(d / f"hidden_block{blocks}.npy"), *history], "targets": targets,
                   "uptodate": [*stopped], "verbosity": 2}
            outputs.append(f"{basename}:{name}:output")
        yield {"basename": basename, "name": "summary", "actions": [_guard(self.summarize)], "task_dep": outputs,
               "uptodate": [False], "verbosity": 2}


def _guard(fn, *args):
    """A doit python-action that turns StagepipeError into a one-line task failure instead of a traceback."""

    def action():
        try:
            fn(*args)
        except StagepipeError as e:
            return TaskFailed(str(e))

    action.__name__ = getattr(fn, "__name__", "action")
    return (action, [], {})


def build_summary(run: Run) -> RunSummary:
    m, n = run.manifest, len(run.chunks)
    generated, prefill_s, decode_s, decode_steps, steps = [], 0.0, 0.0, 0, 0
    stop_reason = "running"
    stops = set(run.settings.stop_token_ids)
    complete_prefill = True
    for s in range(run.n_steps):
        meta_path = run.step_dir(s) / "meta.json"
        if not meta_path.exists():
            complete_prefill &= s >= n
            break
        meta = stage_ops.load_meta(meta_path)
        steps += 1
        seconds = sum(r.seconds for r in meta.stages.values())
        if s < n:
            prefill_s += seconds
        else:
            decode_s += seconds
            decode_steps += 1
        token_file = run.step_dir(s) / "next_token_id.txt"
        if s >= n - 1:
            if not token_file.exists() or "output" not in meta.stages:
                break
            generated.append(read_token(token_file))
            if generated[-1] in stops:
                stop_reason = "eos"
                break
            if len(generated) >= run.settings.max_new_tokens:
                stop_reason = "max_steps"
                break
            if meta.next_past_len >= m.max_cache_len:
                stop_reason = "cache_full"
                break
    ids = run.settings.prompt_token_ids
    return RunSummary(prompt=run.settings.prompt, prompt_token_ids=ids, generated_token_ids=generated,
                      text=run.tokenizer.decode(generated, skip_special_tokens=True), stop_reason=stop_reason,
                      steps=steps, time_to_first_token_s=prefill_s if generated and complete_prefill else None,
                      decode_tokens_per_s=decode_steps / decode_s if decode_steps and decode_s > 0 else None)


def open_run(params: dict) -> Run:
    """A Run from run_auto's doit parameters (converting the model first when needed)."""
    from pipeline.run.model_source import resolve_onnx_dir

    onnx_dir = resolve_onnx_dir(Path(params["model_path"]) if params.get("model_path") else None,
                                Path(params["onnx_dir"]) if params.get("onnx_dir") else None,
                                params.get("max_input_len") or None, params.get("max_cache_len") or None)
    sampled = params.get("temperature") or params.get("top_k") or params.get("top_p")
    sampling = SamplingSettings(greedy=bool(params.get("greedy") or not sampled),
                                temperature=params.get("temperature") or 1.0, top_k=params.get("top_k") or 0,
                                top_p=params.get("top_p") or 1.0, seed=params.get("seed") or 0)
    from_step = params.get("from_step", -1)
    return Run(RunParams(prompt=params.get("prompt") or DEFAULT_PROMPT, onnx_dir=onnx_dir,
                         run_root=Path(params.get("run_root") or "runs/demo"), steps=params.get("steps", 32),
                         sampling=sampling, chat=bool(params.get("chat")), no_think=bool(params.get("no_think")),
                         backend=params.get("backend") or "onnx", ignore_eos=bool(params.get("ignore_eos")),
                         from_step=None if from_step is None or from_step < 0 else from_step,
                         clean=bool(params.get("clean")), reset_kv=bool(params.get("reset_kv")),
                         full_logits=bool(params.get("full_logits")), provider=params.get("provider") or "cpu"))
