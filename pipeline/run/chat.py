"""doit chat: talk to a model in the terminal. The conversation is a run folder: every turn is step folders over
one KV cache, and each reply streams as its steps sample it.

    doit chat [--run_root runs/chat] [--onnx_dir O | --model_path M] [--system TEXT] [--no_think] [--steps N]
    stagepipe chat ...                (the same options)

/exit (or Ctrl-D) ends; /reset starts a new conversation in the folder; /save FILE writes the conversation as
JSON messages (run_auto --messages FILE replays it). Ctrl-C stops a reply: what it said so far stays in the
conversation and the next message follows it. A folder that already holds a conversation is continued.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
from dataclasses import replace
from pathlib import Path

from pipeline.core import layout
from pipeline.core.errors import StagepipeError
from pipeline.run.options import RunOptions

DEFAULT_ROOT = "runs/chat"
# run_auto options that make no sense here: the messages come from the terminal
SKIPPED = ("prompt", "prompt_file", "reply", "messages", "chat", "from_step", "clean")
HELP = "/exit ends, /reset starts a new conversation, /save FILE writes it as JSON; Ctrl-C stops a reply"


def chat_params() -> list[dict]:
    """doit parameters of `doit chat`: run_auto's, less those above, with the folder runs/chat."""
    from pipeline.core.options import doit_params

    params = doit_params(RunOptions, skip=SKIPPED)
    for p in params:
        if p["name"] == "run_root":
            p.update(default=DEFAULT_ROOT, help=f"the conversation's run folder (default: {DEFAULT_ROOT})")
    return params


def print_turn_line(run, summary):
    reply = summary.turns[-1]
    if run.stop_requested:
        print(f"\n[stopped after {len(reply.token_ids)} tokens]", flush=True)
        return
    rate = f", {reply.decode_tokens_per_s:.1f} tokens/s" if reply.decode_tokens_per_s else ""
    print(f"\n[{len(reply.token_ids)} tokens, stop: {reply.stop_reason}{rate}]", flush=True)


@contextlib.contextmanager
def ctrl_c_stops(run):
    """Ctrl-C while a reply streams: the step running finishes, the rest of the turn's steps do nothing, and the
    graph ends as usual (doit's record saved). A second Ctrl-C interrupts at once."""

    def handler(signum, frame):
        if run.stop_requested:
            raise KeyboardInterrupt
        run.stop_requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        run.stop_requested = False


class Chat:
    def __init__(self, options: RunOptions):
        from pipeline.run.main import model_dir

        self.options = replace(options, chat=True, run_root=options.run_root or DEFAULT_ROOT)
        self.onnx_dir = model_dir(self.options)
        self.run = None
        self.backend = None
        self.fresh = False  # the next message starts the folder over (/reset)

    def _open(self, options: RunOptions, sampling=None):
        from pipeline.run.run_auto import Run

        run = Run(options, self.onnx_dir, sampling=sampling, backend=self.backend)
        run.show_stop_tokens, run.report = False, print_turn_line
        run.prepare()
        self.run, self.backend = run, run.backend

    def resume(self):
        """Continue the conversation the folder holds, finishing a reply a crash cut short."""
        from pipeline.core.jsonfile import load_model_file
        from pipeline.run.conversation import inherit
        from schemas.run import RunSettings

        run_json = Path(self.options.run_root) / layout.RUN_JSON
        if not run_json.is_file():
            return
        old = load_model_file(run_json, RunSettings)
        if not old.chat:
            raise StagepipeError(f"{run_json}: this run folder holds a run made without --chat; use another "
                                 "--run_root")
        options = inherit(replace(self.options, prompt=None), old)
        self._open(options, old.sampling if not options.sampling_given() else None)
        print(f"[continuing the conversation in {self.options.run_root}: {len(old.turns) + 1} turns]", flush=True)
        if not self.run.last_turn_done():
            self.generate()

    def send(self, text: str):
        from pipeline.run.summary import turn_result

        if self.run is not None:
            last = self.run.plan.last
            if not turn_result(self.run, last).generated:  # stopped before its reply began: forget that message
                if last.index == 0:
                    self.run, self.fresh = None, True
                else:
                    self.run.drop_last_turn()
        if self.run is None:
            self._open(replace(self.options, prompt=text, clean=self.fresh))
            self.fresh = False
        else:
            self.run.add_turn(text, interrupted=True)
        self.generate()

    def generate(self):
        from pipeline.run.doit_support import run_task_graph

        try:
            with ctrl_c_stops(self.run):
                if run_task_graph(self.run):
                    print("[the turn failed: see the error above]", flush=True)
        except KeyboardInterrupt:
            print("\n[stopped]", flush=True)

    def save(self, path: str):
        from pipeline.core.atomic import write_text
        from pipeline.run.conversation import conversation_messages
        from pipeline.run.summary import turn_result

        if self.run is None:
            raise StagepipeError("nothing to save yet")
        r = turn_result(self.run, self.run.plan.last)
        stop = r.stop_reason if r.stop_reason != "running" else "interrupted"
        messages = conversation_messages(self.run, r.generated, stop)
        write_text(Path(path), json.dumps(messages, ensure_ascii=False, indent=2) + "\n")
        print(f"[saved {len(messages)} messages to {path}]", flush=True)

    def loop(self, read=input) -> int:
        print(f"[chat with {self.onnx_dir} in {self.options.run_root}: {HELP}]", flush=True)
        self.resume()
        while True:
            try:
                line = read("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            command, _, arg = line.strip().partition(" ")
            try:
                if command == "/exit":
                    return 0
                elif command == "/reset":
                    self.run, self.fresh = None, True
                    print("[new conversation]", flush=True)
                elif command == "/save":
                    if not arg.strip():
                        raise StagepipeError("/save FILE: name the file")
                    self.save(arg.strip())
                elif command.startswith("/"):
                    print(f"[{command}: unknown; {HELP}]", flush=True)
                elif line.strip():
                    self.send(line)
            except StagepipeError as e:
                print(f"error: {e}", flush=True)
            except KeyboardInterrupt:  # while a turn was being set up
                print("\n[stopped]", flush=True)


def chat(options: RunOptions) -> int:
    try:
        return Chat(options).loop()
    except StagepipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def main(argv=None) -> int:
    """stagepipe chat: doit chat's options parsed with argparse."""
    from pipeline.run.main import command_main

    return command_main(chat, "stagepipe chat", __doc__.split("\n")[0], argv, skip=SKIPPED, run_root=DEFAULT_ROOT)


def chat_action(**params):
    """doit action for `doit chat`."""
    from pipeline.run.main import options_or_exit

    code = chat(options_or_exit(params))
    if code:
        sys.exit(code)
