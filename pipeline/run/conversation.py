"""A run folder as a conversation: what --reply / --messages ask for, and the record of each new user turn.

The KV cache keeps what the model actually saw and generated. A new user turn prefills only what the chat
template adds for it: the template's rendering of the whole conversation minus the text already in the cache when
that text is a prefix of it ("exact"), else the template's closing of the last reply and its rendering of the new
user turn ("new_turn": Qwen3's template drops earlier think blocks when it re-renders a conversation). The history
is never re-tokenized or recomputed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.core import layout
from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import load_model_file
from pipeline.run.options import RunOptions
from schemas.run import RunSettings, UserTurn

ROLES = ("system", "user", "assistant")


def short(text: str, keep: int = 40) -> str:
    return repr(text if len(text) <= keep else text[:keep - 3] + "...")


@dataclass
class Request:
    """The user turns a command wants after turn 0: --messages lists them all, --reply adds one."""

    replies: list[str] = field(default_factory=list)
    from_messages: bool = False
    messages_file: str = ""

    def pending(self, recorded: list[str]) -> list[str]:
        """The turns still to add, given the texts of the run's recorded later turns."""
        if not self.from_messages:
            # rerunning the same --reply resumes that turn instead of sending the message again
            return [] if not self.replies or (recorded and recorded[-1] == self.replies[0]) else self.replies
        for i, (have, want) in enumerate(zip(recorded, self.replies), start=1):
            if have != want:
                raise StagepipeError(f"{self.messages_file}: turn {i} differs from this run's ({short(have)}); "
                                     "use --clean, --from_step K or another --run_root")
        if len(recorded) > len(self.replies):
            raise StagepipeError(f"{self.messages_file}: {len(self.replies) + 1} user turns, this run has "
                                 f"{len(recorded) + 1}; use --clean, --from_step K or another --run_root")
        return self.replies[len(recorded):]


def read_messages(path: Path) -> tuple[str | None, list[str]]:
    """(system text or None, user texts) of a conversation file: a JSON list of {"role", "content"} (or an object
    with "messages"). Assistant turns in it are not used: every reply is generated again."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StagepipeError(f"--messages {path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StagepipeError(f"--messages {path}: cannot read it as JSON ({e})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise StagepipeError(f"--messages {path}: expected a list of {{\"role\", \"content\"}} messages")
    system, users = None, []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise StagepipeError(f"--messages {path}: message {i} is not {{\"role\": system|user|assistant, "
                                 "\"content\": text}")
        if m["role"] == "system":
            if i:
                raise StagepipeError(f"--messages {path}: message {i}: a system message can only come first")
            system = m["content"]
        elif m["role"] == "user":
            users.append(m["content"])
    if not users:
        raise StagepipeError(f"--messages {path}: no user message in it")
    return system, users


def conversation_options(options: RunOptions) -> tuple[RunOptions, Request, RunSettings | None]:
    """The options a --reply / --messages command runs with, what it asks for, and the run's existing settings.

    On an existing run, the options left at their defaults take the run's recorded values (so `--reply TEXT`
    alone continues a conversation as it was made); options given must agree with them (else the usual
    'made with other settings' error)."""
    if not (options.reply or options.messages):
        return options, Request(), None
    if options.reply and options.messages:
        raise StagepipeError("--reply and --messages do not go together: --messages holds every user turn")
    run_json = Path(options.run_root) / layout.RUN_JSON
    old = load_model_file(run_json, RunSettings) if run_json.is_file() and not options.clean else None
    if old is not None and not old.chat:
        raise StagepipeError(f"{run_json}: made without --chat, so it cannot take more turns; use another "
                             "--run_root")
    if options.messages:
        if options.prompt is not None or options.prompt_file:
            raise StagepipeError("--messages holds the prompt (its first user turn); drop --prompt/--prompt_file")
        system, users = read_messages(Path(options.messages))
        if system is not None and options.system and options.system != system:
            raise StagepipeError(f"--system differs from the system message in {options.messages}; give one")
        options = replace(options, prompt=users[0], system=system if system is not None else options.system)
        request = Request(users[1:], from_messages=True, messages_file=options.messages)
    else:
        if old is None:
            raise StagepipeError(f"--reply: no conversation in {options.run_root}; start one with --chat --prompt "
                                 "TEXT or --messages FILE")
        request = Request([options.reply])
    if old is not None:
        options = inherit(options, old)
    return replace(options, chat=True), request, old


def inherit(options: RunOptions, old: RunSettings) -> RunOptions:
    defaults = RunOptions()
    routes = old.stage_routes  # a hybrid run's backend is recorded as a label: main backend + routes
    recorded = {"prompt": old.prompt, "no_think": old.no_think, "system": old.system or "",
                "backend": old.backend.split("+")[0] if routes else old.backend,
                "stage_onnx": ",".join(f"{stage}:{r.onnx_dir}" for stage, r in routes.items()),
                "stage_backend": ",".join(f"{stage}:{r.backend}" for stage, r in routes.items()),
                "ignore_eos": old.ignore_eos, "full_logits": old.full_logits}
    if options.prompt_file:
        del recorded["prompt"]
    return replace(options, **{k: v for k, v in recorded.items() if getattr(options, k) == getattr(defaults, k)})


def reply_content(run, reply: list[int], ended_by_stop: bool) -> str:
    """An assistant message as the model wrote it (special tokens kept), without the stop token it ended with."""
    return run.tokenizer.decode(reply[:-1] if ended_by_stop else reply)


def conversation_messages(run, last_reply: list[int] | None = None, last_stop: str = "") -> list[dict]:
    """The conversation so far as chat messages: [system,] user, assistant, ..., the last reply if given."""
    s = run.settings
    messages = [{"role": "system", "content": s.system}] if s.system is not None else []
    users = [s.prompt] + [t.text for t in s.turns]
    replies = [(t.previous_reply, t.previous_stop) for t in s.turns]
    if last_reply is not None:
        replies.append((last_reply, last_stop))
    for i, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        if i < len(replies):
            reply, stop = replies[i]
            messages.append({"role": "assistant", "content": reply_content(run, reply, stop == "eos")})
    return messages


def conversation_ids(settings: RunSettings, last_reply: list[int]) -> list[int]:
    """Every token of the conversation so far: all the cache holds, and the last reply's last token."""
    ids = list(settings.prompt_token_ids)
    for t in settings.turns:
        ids += t.previous_reply + t.token_ids[1:]  # token_ids[0] is the previous reply's last token
    return ids + last_reply


def overflow(C: int, free: int, need: int | None = None) -> StagepipeError:
    what = f"the turn needs {need} slots, {free} are left" if need else "the last reply filled it"
    return StagepipeError(f"the conversation no longer fits the {C}-slot KV cache ({what}): continue in a new run "
                          "with --messages FILE holding its last turns (chat: /save FILE)")


def next_turn(run, text: str, turn, reply: list[int], stop: str) -> UserTurn:
    """The record of a new user turn after `turn`, whose reply (possibly cut short: stop 'interrupted') is done."""
    C = run.manifest.max_cache_len
    if stop == "cache_full":
        raise overflow(C, 0)
    if not text.strip():
        raise StagepipeError("the message is empty; give some text")
    messages = conversation_messages(run, reply, stop) + [{"role": "user", "content": text}]
    cached = run.tokenizer.decode(conversation_ids(run.settings, reply))
    stop_text = run.tokenizer.decode(reply[-1:]) if stop == "eos" else None
    added, rendering = run.template.continuation(messages, cached, stop_text, **run.template.switches(
        run.settings.no_think))
    token_ids = reply[-1:] + run.tokenizer.encode(added)
    past_len = turn.past_len + len(turn.token_ids) + len(reply) - 1
    if past_len + len(token_ids) >= C:
        raise overflow(C, C - past_len, len(token_ids))
    return UserTurn(text=text, token_ids=token_ids, rendering=rendering,
                    first_step=turn.first_sampling_step + len(reply), past_len=past_len,
                    max_new_tokens=run.options.steps, previous_reply=reply, previous_stop=stop)
