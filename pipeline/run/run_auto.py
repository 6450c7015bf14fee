"""run_auto: plan a generation as doit tasks, one per (step, stage), and the actions those tasks run.

A run is a list of turns (pipeline/run/turns.py): each prefills its tokens in chunks of max_input_len, one step
per chunk, then each later step decodes the token the step before it sampled. Tasks exist for every step the run
may need; a step after its turn stopped (end of sequence) does nothing but remove any stale folder of that number.
A conversation gains a turn once the last one finished (add_turn), and the task graph then runs again: the
earlier turns' steps are up to date and are not recomputed. Stages run in this process with one backend, so each
graph's onnxruntime session is created once per run.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pipeline.core import layout
from pipeline.core.atomic import fsync_folder, fsync_path, write_text
from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import load_manifest, load_model_file
from pipeline.core.layout import StepPaths, read_token_file, step_name
from pipeline.run import conversation
from pipeline.run.display import Progress, completed_steps, print_summary_line, prompt_preview
from pipeline.run.image_run import ImageStep
from pipeline.run.lock import lock_run_dir
from pipeline.run import verify
from pipeline.run.options import RunOptions
from pipeline.run.summary import build_summary, turn_result
from pipeline.run.task_graph import step_tasks
from pipeline.run.turns import plan_turns
from pipeline.runtime import stage_ops
from pipeline.runtime.backends import make_backend, stage_process_kwargs
from pipeline.runtime.chat_template import ChatTemplate
from pipeline.runtime.hybrid import hybrid_label, hybrid_manifest, open_backend, plan_routes, route_records
from pipeline.runtime.kv_cache import KVCacheDir
from pipeline.runtime.sampling import check_sampling
from pipeline.runtime.tokenizer import Tokenizer
from schemas.run import RunSettings, SamplingSettings

# run.json fields a rerun must keep unless it branches (--from_step) or starts over (--clean)
FIXED_SETTINGS = ("prompt", "chat", "no_think", "system", "prompt_token_ids", "onnx_fingerprint", "backend",
                  "ignore_eos", "full_logits", "sampling", "image")


def changed_settings(old: RunSettings, new: RunSettings) -> list[str]:
    return [f for f in FIXED_SETTINGS if getattr(old, f) != getattr(new, f)]


def steps_to_discard(existing: list[int], from_step: int | None, n_steps: int) -> list[int]:
    """Step numbers a rerun removes: those >= --from_step. Without it, a step past the plan is an error."""
    if from_step is None:
        beyond = [s for s in existing if s >= n_steps]
        if beyond:
            raise StagepipeError(f"{step_name(beyond[0])} is past the {n_steps} steps these settings plan; raise "
                                 f"--steps, or discard with --from_step {n_steps}")
        return []
    if from_step < 0:
        raise StagepipeError(f"--from_step {from_step}: must be >= 0")
    return [s for s in existing if s >= from_step]


class Run:
    def __init__(self, options: RunOptions, onnx_dir: Path, sampling: SamplingSettings | None = None,
                 request: conversation.Request | None = None, backend=None):
        """sampling: settings to use instead of the options' (a conversation's recorded ones); request: the later
        user turns a --reply / --messages command asks for; backend: one to reuse (doit chat's /reset)."""
        self.options = options
        self.onnx_dir = Path(onnx_dir)
        self.dir = Path(options.run_root)
        self.manifest = m = load_manifest(onnx_dir)
        # a hybrid run (--stage_onnx/--stage_backend) has its own graphs fingerprint: cache and steps are its own
        self.routes = plan_routes(self.onnx_dir, m, options.backend, options.stage_onnx, options.stage_backend)
        if self.routes:
            self.manifest = m = hybrid_manifest(m, options.backend, self.routes)
        self.tokenizer = Tokenizer.load(onnx_dir)
        self.request = request or conversation.Request()
        prompt = options.prompt_text()
        if (options.system or options.no_think) and not options.chat:
            raise StagepipeError("--system and --no_think go with --chat (the checkpoint's chat template)")
        system = options.system or None
        self.image = ImageStep(self.dir, m, Path(options.image), self.onnx_dir) if options.image else None
        if self.image:  # a VL model's image step comes first (pipeline/run/image_run.py)
            self.template = self.image.chat_template(options, self.onnx_dir)
            ids = self.image.prompt_ids(self.tokenizer, prompt, options.chat, self.onnx_dir, system)
        else:
            self.template = ChatTemplate.load(onnx_dir) if options.chat else None
            text = self.template.prompt(prompt, system=system, no_think=options.no_think) if options.chat else prompt
            ids = self.tokenizer.encode(text)
        if len(ids) >= m.max_cache_len:
            raise StagepipeError(f"the prompt has {len(ids)} tokens; the {m.max_cache_len}-slot KV cache needs room "
                                 "for at least one more: shorten it or convert with a larger --max_cache_len")
        if options.steps < 1:
            raise StagepipeError(f"--steps {options.steps}: must be at least 1")
        self.settings = RunSettings(
            prompt=prompt, chat=options.chat, no_think=options.no_think, system=system, prompt_token_ids=ids,
            onnx_dir=str(self.onnx_dir.resolve()), onnx_fingerprint=m.graphs_fingerprint,
            backend=hybrid_label(options.backend, self.routes), stage_routes=route_records(self.routes),
            max_new_tokens=options.steps, ignore_eos=options.ignore_eos, full_logits=options.full_logits,
            stop_token_ids=[] if options.ignore_eos else m.model.eos_token_ids,
            sampling=check_sampling(sampling or options.sampling_settings(self.onnx_dir)), image=options.image or None)
        self.pending: list[str] = []  # user turns still to add (set by prepare)
        self.show_stop_tokens = True  # stream them like any token (doit chat leaves them out)
        self.report = print_summary_line
        self.stop_requested = False  # doit chat's Ctrl-C: the remaining steps of the graph do nothing
        self._backend = backend
        self._kv = None
        self.redo: set[tuple[int, str]] = set()  # (step, stage) whose recorded work does not hold (verify)
        self.progress = Progress()
        self._replan()
        self.backend  # a backend that cannot run here (--provider cuda without CUDA) fails before anything is written

    def _replan(self):
        self.plan = plan_turns(self.settings, self.manifest.max_input_len, self.manifest.max_cache_len)
        self._stopped: dict[int, bool] = {}
        self._fed: dict[int, list[int]] = {}  # step -> the token ids it fed (its meta.json input_token_ids)
        self.new_steps = 0  # steps whose output this graph computed (resumed work is not streamed again)

    # -- helpers -------------------------------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return self.plan.n_steps

    def step_dir(self, s: int) -> Path:
        return self.dir / step_name(s)

    def past_len(self, s: int) -> int:
        return self.plan.turn_of(s).past_len_at(s)

    @property
    def backend(self):
        if self._backend is None:
            # this process runs stages only: their sessions can share one thread pool
            o = self.options

            def make(name, onnx_dir, manifest):
                return make_backend(name, onnx_dir, manifest, **stage_process_kwargs(name, o.provider, o.threads))

            self._backend = open_backend(make, o.backend, self.onnx_dir, self.manifest, self.routes)
        return self._backend

    @property
    def kv(self) -> KVCacheDir:
        if self._kv is None:
            self._kv = KVCacheDir(self.dir / layout.KV_DIR, self.manifest).open(create=True)
        return self._kv

    def stopped_before(self, s: int) -> bool:
        """True when an earlier step of its turn ended it (end-of-sequence token), so step s must not run.

        Memoized per step: a step's answer is asked only after every earlier step finished in this process."""
        if not self.settings.stop_token_ids or self.plan.turn_of(s).chunk(s) is not None:
            return False
        if s not in self._stopped:
            token_file = self.step_dir(s - 1) / layout.NEXT_TOKEN_ID
            ended = token_file.exists() and read_token_file(token_file) in self.settings.stop_token_ids
            self._stopped[s] = ended or self.stopped_before(s - 1)
        return self._stopped[s]

    def context_ids(self, s: int) -> list[int]:
        """The token ids in the cache before step s: those fed to steps 0..s-1 (a repetition penalty sees them)."""
        ids = []
        for i in range(s):
            if i not in self._fed:
                self._fed[i] = stage_ops.load_meta(self.step_dir(i) / layout.META).input_token_ids
            ids += self._fed[i]
        return ids

    # -- before the tasks ----------------------------------------------------------------------------------------
    def prepare(self):
        """Lock the folder, reconcile run.json with these settings, apply --clean / --from_step / --reset_kv."""
        lock_run_dir(self.dir)
        o = self.options
        run_json = self.dir / layout.RUN_JSON
        if o.clean:
            for child in self.dir.iterdir():
                if child.name != layout.LOCK_FILE and not child.name.startswith(layout.DOIT_DB):
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        verify.refuse_links(self.dir)
        verify.remove_temp_files(self.dir)  # a write cut short by a crash (kill -9) leaves its temp file
        from_step = 0 if o.reset_kv else (None if o.from_step < 0 else o.from_step)
        if run_json.exists():
            old = load_model_file(run_json, RunSettings, fix="restore it, delete it to go on with this command's "
                                  "settings, or use --clean to start over")
            changed = changed_settings(old, self.settings)
            if changed and from_step is None:
                raise StagepipeError(f"{run_json}: this run was made with other {', '.join(changed)}; use "
                                     "--from_step K to regenerate from step K, --clean to start over, or another "
                                     "--run_root")
            if "onnx_fingerprint" in changed and not o.reset_kv and (self.dir / layout.KV_DIR).exists():
                raise StagepipeError(f"{self.dir}: the onnx_dir changed since this run began; add --reset_kv to "
                                     "recompute the run with the new graphs")
            self._keep_turns(old, from_step)
        self.pending = self.request.pending([t.text for t in self.settings.turns])
        existing = {layout.step_number(d.name): d for d in layout.step_dirs(self.dir)}
        for s in steps_to_discard(sorted(existing), from_step, self.n_steps):
            shutil.rmtree(existing[s])
        if o.reset_kv:
            KVCacheDir(self.dir / layout.KV_DIR, self.manifest).open(create=True, reset=True)
        self._check_history()
        write_text(run_json, self.settings.model_dump_json(indent=2) + "\n")
        if o.fsync:
            fsync_path(run_json)
        self.kv  # create or check the cache now, before any step runs
        self.redo = verify.stages_to_redo(self)  # finished steps are checked before they are trusted
        self._open_sessions()

    def _keep_turns(self, old: RunSettings, from_step: int | None):
        """Carry the recorded later turns over (those that begin before --from_step). --steps sets the limit of
        the turn that is generated now: the last one, or the new ones when the command adds turns."""
        turns = [t for t in old.turns if from_step is None or t.first_step < from_step]
        adding = bool(self.request.pending([t.text for t in turns]))
        if turns or adding:
            self.settings.max_new_tokens = old.max_new_tokens
        if turns and not adding:
            turns[-1] = turns[-1].model_copy(update={"max_new_tokens": self.options.steps})
        self.settings.turns = turns
        self._replan()

    def _check_history(self):
        """The turns before the last are history: their replies must still be those the next turns followed."""
        for turn, after in zip(self.plan.turns, self.settings.turns):
            got, want = turn_result(self, turn).generated, after.previous_reply
            bad = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
            if bad is not None:
                s = turn.first_sampling_step + bad
                raise StagepipeError(f"{self.step_dir(s)}: turn {turn.index}'s reply changed after the next turn "
                                     f"began (token {want[bad]} -> {got[bad]}); regenerate with --from_step {s}")

    def _open_sessions(self):
        if hasattr(self.backend, "open_all"):
            # sessions up front: step timings (TTFT, tokens/s) measure compute only
            self.backend.open_all(self.plan.step_sizes())

    # -- conversation ----------------------------------------------------------------------------------------------
    def last_turn_done(self) -> bool:
        return turn_result(self, self.plan.last).stop_reason != "running"

    def add_turn(self, text: str, interrupted: bool = False):
        """Append a user turn after the last one, whose reply is done (interrupted=True: or was cut short)."""
        if self.template is None:
            raise StagepipeError("a conversation needs --chat (the checkpoint's chat template)")
        last = self.plan.last
        r = turn_result(self, last)
        stop = r.stop_reason if r.stop_reason != "running" else "interrupted"
        if stop == "interrupted" and not interrupted:
            raise StagepipeError(f"turn {last.index} has not finished; run the command again to finish it")
        if not r.generated:
            raise StagepipeError(f"turn {last.index} has no reply yet")
        turn = conversation.next_turn(self, text, last, r.generated, stop)
        for d in layout.step_dirs(self.dir):  # an interrupted reply's unfinished step
            if layout.step_number(d.name) >= turn.first_step:
                shutil.rmtree(d)
        self.settings.turns.append(turn)
        write_text(self.dir / layout.RUN_JSON, self.settings.model_dump_json(indent=2) + "\n")
        self._replan()
        self._open_sessions()

    def drop_last_turn(self):
        """Forget the last later turn and its steps (doit chat: a reply stopped before its first token)."""
        first = self.settings.turns.pop().first_step
        for d in layout.step_dirs(self.dir):
            if layout.step_number(d.name) >= first:
                shutil.rmtree(d)
        write_text(self.dir / layout.RUN_JSON, self.settings.model_dump_json(indent=2) + "\n")
        self._replan()

    # -- actions -------------------------------------------------------------------------------------------------
    def vision(self):
        self.image.run(self.backend)

    def embed(self, s: int):
        if self.stop_requested:
            return
        if self.stopped_before(s):
            shutil.rmtree(self.step_dir(s), ignore_errors=True)
            return
        turn = self.plan.turn_of(s)
        # a next_token_id.txt edited by hand is the token: its step's next_token.txt and meta.json follow it
        tokens = turn.chunk(s) or [
            stage_ops.adopt_token_edit(StepPaths(self.step_dir(s - 1)), self.tokenizer.token_text)]
        self._fed[s] = tokens
        # the first turn's prompt steps take the image's rows and positions; every later step continues its delta
        mrope = self.image.mrope(list(turn.token_ids)) if self.image and turn.index == 0 and turn.chunk(s) else None
        stage_ops.token_embed(self.backend, StepPaths(self.step_dir(s)), s, turn.past_len_at(s), tokens,
                              self.settings.sampling, sample_next=s >= turn.first_sampling_step,
                              prev_step_dir=self.step_dir(s - 1) if s else None, mrope=mrope)

    def block(self, s: int, k: int):
        if self.stop_requested or self.stopped_before(s):
            return
        stage_ops.block(self.backend, StepPaths(self.step_dir(s)), k, *self.kv.past(k))

    def output(self, s: int):
        if self.stop_requested or self.stopped_before(s):
            return
        context = self.context_ids(s) if self.settings.sampling.repetition_penalty != 1.0 else None
        meta = stage_ops.output(self.backend, StepPaths(self.step_dir(s)), None, None, self.tokenizer.token_text,
                                self.options.full_logits, context)
        if meta.reused:
            return
        if self.options.fsync:  # the finished step survives a power loss
            self.kv.sync()
            fsync_folder(self.step_dir(s))
            fsync_path(self.dir)
        self.new_steps += 1
        turn = self.plan.turn_of(s)
        if meta.next_token_id is None:  # a prompt chunk that another chunk follows
            self.progress.prefill(s - turn.first_step + 1, turn.n_chunks)
        else:
            self.progress.token(s, self.n_steps)
            if self.show_stop_tokens or meta.next_token_id not in self.settings.stop_token_ids:
                print(self.tokenizer.decode([meta.next_token_id]), end="", flush=True)

    def summarize(self):
        self.kv.flush()
        summary = build_summary(self)
        write_text(self.dir / layout.SUMMARY_JSON, summary.model_dump_json(indent=2) + "\n")
        self.report(self, summary)
        return summary

    def announce(self):
        """Before the steps run: the last turn's prompt as the model sees it and a separator, or where a resumed
        run goes on."""
        done, turn = completed_steps(self), self.plan.last
        if done <= turn.first_step:
            new = turn.token_ids[1:] if turn.index else turn.token_ids  # a later turn's first id ended the reply
            what = f"turn {turn.index}, {len(new)} new tokens" if turn.index else f"{len(new)} prompt tokens"
            print(f"{prompt_preview(self.tokenizer.decode(new))}\n--- reply ({what}) ---", flush=True)
        elif done < self.n_steps:
            print(f"[{self.dir}: resumed at {step_name(done)}]", file=sys.stderr, flush=True)

    # -- doit tasks ----------------------------------------------------------------------------------------------
    def tasks(self, guard, basename: str = "run_auto"):
        """doit task dicts: embed/block{k}/output per step, then summary (pipeline/run/task_graph.py)."""
        return step_tasks(self, guard, basename)
