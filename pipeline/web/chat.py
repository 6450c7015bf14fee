"""The chat page's engine: each conversation is a run folder under <runs>/chats/, and each message is a turn run by
a child process (`python -m pipeline.web.turn`: doit chat's Chat, one message) on that folder. The stop button is
its Ctrl-C: the reply ends after the step running, its steps stay, and the next message follows it. The reply
streams from the step folders as they appear, the way every other page reads runs.

    turn = turns.start(conversation, message, settings)   # returns at once; the child process generates
    for event in turn.events():                            # {"text": "..."} deltas, then {"done": {...}}
        ...
    turn.stop()
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

from pipeline.core import layout
from pipeline.core.errors import StagepipeError
from pipeline.core.options import from_values, to_argv
from pipeline.run.options import RunOptions
from pipeline.tools.run_reading import load_step_meta, read_json, run_tokenizer, step_next_token
from pipeline.web.folder import CHATS, RequestError, RunsFolder

# what the chat page may set (RunOptions fields)
SETTINGS = ("onnx_dir", "steps", "temperature", "top_k", "top_p", "seed", "repetition_penalty", "no_think",
            "ignore_eos", "system")
POLL_S = 0.1


def chat_options(settings: dict, defaults: dict) -> dict:
    """The page's settings as RunOptions values: known names only, each converted to its field's type."""
    hints = typing.get_type_hints(RunOptions)
    values = dict(defaults)
    for name, raw in settings.items():
        if name not in SETTINGS:
            continue
        kind = hints[name] if hints[name] in (bool, int, float) else str
        try:
            values[name] = raw in (True, 1, "1", "true", "on") if kind is bool else kind(raw)
        except (TypeError, ValueError):
            raise RequestError(400, f"{name}={raw!r}: expected {kind.__name__}") from None
    if values.get("steps", 1) < 1:
        raise RequestError(400, "steps must be at least 1")
    return values


def turn_argv(run_dir: Path, message: str, values: dict) -> list[str]:
    """The child's command: pipeline.web.turn with the message and the page's settings as run_auto flags."""
    values = {**values, "run_root": str(run_dir), "reply": message}
    try:
        from_values(RunOptions, values)  # a bad choice fails here, not in the child
        return [sys.executable, "-m", "pipeline.web.turn", *to_argv(RunOptions, values)]
    except (StagepipeError, TypeError) as e:
        raise RequestError(400, f"chat settings: {e}") from None


def turn_start(run_dir: Path, message: str) -> int | None:
    """The first step of the turn that answers `message`: the last user turn run.json records, when it is that
    message (turn 0 is run.json's prompt); None before the child has recorded it."""
    try:
        settings = read_json(run_dir / layout.RUN_JSON)
    except StagepipeError:  # being replaced: the next poll reads it
        return None
    if not settings:
        return None
    turns = settings.get("turns") or []
    if turns:
        return turns[-1]["first_step"] if turns[-1]["text"] == message else None
    return 0 if settings.get("prompt") == message else None


def generated_ids(run_dir: Path, first_step: int) -> list[int]:
    """Tokens the steps from first_step on sampled so far (a prompt chunk that another chunk follows samples none)."""
    ids = []
    if not run_dir.is_dir():  # the child has not made it yet
        return ids
    for d in layout.step_dirs(run_dir):
        if layout.step_number(d.name) < first_step:
            continue
        try:
            meta = load_step_meta(d)
        except StagepipeError:  # being written: the next poll reads it
            break
        if meta is None or "output" not in meta.stages:
            break
        token = step_next_token(d, meta)
        if token is not None:
            ids.append(token)
    return ids


def history(run_dir: Path) -> list[dict]:
    """The conversation as messages: summary.json's turns, then any user turn run.json records beyond them (its
    reply is being generated)."""
    settings = read_json(run_dir / layout.RUN_JSON) or {}
    summary = read_json(run_dir / layout.SUMMARY_JSON) or {}
    keys = ("role", "text", "stop_reason", "time_to_first_token_s", "decode_tokens_per_s")
    messages = [{k: t.get(k) for k in keys} for t in summary.get("turns", [])]
    if not messages and summary.get("text") is not None:  # a one-prompt run (made before conversations)
        messages = [{"role": "user", "text": summary["prompt"]}, {"role": "assistant", **{k: summary.get(k)
                                                                                       for k in keys[1:]}}]
    users = [settings["prompt"]] + [t["text"] for t in settings.get("turns", [])] if "prompt" in settings else []
    told = sum(m["role"] == "user" for m in messages)
    return messages + [{"role": "user", "text": text} for text in users[told:]]


class ChatTurn:
    """One reply being generated by a child process; events() follows it through the run folder."""

    def __init__(self, run_dir: Path, message: str, argv: list[str], cwd: Path):
        self.run_dir, self.message = run_dir, message
        self.first_step: int | None = None  # known once the child has recorded the turn in run.json
        self.recorded_at = self._run_json_mtime()
        self.stopped = False
        self.output: list[str] = []  # the child's last lines (its error line, when it fails)
        # the child imports this very code (not another checkout's installed copy)
        code_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stdout:
            self.output = (self.output + [line.rstrip("\n")])[-50:]

    def _run_json_mtime(self) -> int | None:
        try:
            return (self.run_dir / layout.RUN_JSON).stat().st_mtime_ns
        except OSError:
            return None

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        """Ctrl-C for the child: it stops after the stage it is in; its finished steps stay."""
        if self.running:
            self.stopped = True
            self.proc.send_signal(signal.SIGINT)

    def reply_ids(self) -> list[int]:
        if self.first_step is None and self._run_json_mtime() != self.recorded_at:
            self.first_step = turn_start(self.run_dir, self.message)
        return [] if self.first_step is None else generated_ids(self.run_dir, self.first_step)

    def events(self, timeout_s: float = 3600):
        """{"text": delta} as tokens appear, then {"done": {...}}; a partial UTF-8 character waits for its rest."""
        sent, tokenizer, started = "", None, time.monotonic()
        while True:
            finished = not self.running  # read before the folder: the last tokens are then on disk
            if tokenizer is None and (self.run_dir / layout.RUN_JSON).is_file():
                tokenizer = run_tokenizer(self.run_dir)
            ids = self.reply_ids()
            text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer else ""
            if finished or not text.endswith("\ufffd"):
                if text.startswith(sent) and text != sent:
                    yield {"text": text[len(sent):]}
                elif not text.startswith(sent):
                    yield {"text": text, "replace": True}
                sent = text
            if finished or time.monotonic() - started > timeout_s:
                yield {"done": self.result(len(ids))}
                return
            time.sleep(POLL_S)

    def result(self, tokens: int) -> dict:
        code = self.proc.wait()
        turns = (read_json(self.run_dir / layout.SUMMARY_JSON) or {}).get("turns") if code == 0 else None
        reply = turns[-1] if turns and turns[-1]["role"] == "assistant" else {}
        errors = [line for line in self.output if line.startswith("error:")]
        return {"exit_code": code, "tokens": tokens,
                "stop_reason": "stopped" if self.stopped else reply.get("stop_reason") or ("error" if code else None),
                "error": (errors or self.output or ["(no output)"])[-1] if code and not self.stopped else None,
                "time_to_first_token_s": reply.get("time_to_first_token_s"),
                "decode_tokens_per_s": reply.get("decode_tokens_per_s")}


class ChatTurns:
    """The turns this server started, by conversation (one at a time each), and where new conversations go."""

    def __init__(self, folder: RunsFolder, defaults: dict, cwd: Path | None = None):
        self.folder, self.defaults, self.cwd = folder, defaults, Path(cwd or os.getcwd())
        self.turns: dict[str, ChatTurn] = {}
        self.lock = threading.Lock()
        if defaults.get("onnx_dir"):
            self.warm(str(self.cwd / defaults["onnx_dir"]))

    def warm(self, onnx_dir: str):
        """Load the model's tokenizer in the background (it is cached), so a reply streams from its first token
        instead of arriving whole after a slow first load."""
        threading.Thread(target=run_tokenizer, args=(self.folder.root, {"onnx_dir": onnx_dir}), daemon=True).start()

    def new_name(self) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            name = f"{CHATS}/{stamp}" + (f"-{n}" if n else "")
            if not (self.folder.root / name).exists():
                return name
        raise RequestError(409, "too many new conversations this second")

    def start(self, conversation: str | None, message: str, settings: dict) -> tuple[str, ChatTurn]:
        if not message.strip():
            raise RequestError(400, "the message is empty")
        values = chat_options(settings, self.defaults)
        with self.lock:
            name = conversation or self.new_name()
            if not self.folder.is_chat_folder(name):
                raise RequestError(403, f"{name}: the chat writes only to its own folders ({CHATS}/NAME)")
            run_dir = self.folder.path(name)
            if name in self.turns and self.turns[name].running:
                raise RequestError(409, f"{name}: a reply is still being generated; stop it first")
            if values.get("onnx_dir"):
                values["onnx_dir"] = str(self.cwd / values["onnx_dir"])  # as the child sees it from self.cwd
                self.warm(values["onnx_dir"])
            (self.folder.root / CHATS).mkdir(parents=True, exist_ok=True)
            turn = ChatTurn(run_dir, message, turn_argv(run_dir, message, values), self.cwd)
            self.turns[name] = turn
        return name, turn

    def get(self, conversation: str) -> ChatTurn | None:
        return self.turns.get(conversation)

    def stop_all(self, wait_s: float = 10):
        """Ctrl-C every running turn and wait for them (the server is shutting down)."""
        for turn in self.turns.values():
            turn.stop()
        for turn in self.turns.values():
            try:
                turn.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                turn.proc.kill()
