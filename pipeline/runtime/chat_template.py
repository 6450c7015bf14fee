"""Render a checkpoint's own chat template, as transformers' `apply_chat_template` does.

The template is read from the checkpoint (or converted onnx_dir) folder: `chat_template.jinja` when there is one
(transformers lets it win over the config), else `tokenizer_config.json`'s "chat_template" (a string, or a list of
{"name", "template"} of which "default" is used). It is rendered with jinja2 set up like transformers'
`_compile_jinja_template`: a sandboxed, immutable environment with trim_blocks, lstrip_blocks and the loopcontrols
extension; a `raise_exception` global; a `tojson` filter that keeps non-ASCII text and key order; `strftime_now`.
Like `render_jinja_template`, the template also sees the checkpoint's special tokens (bos_token, eos_token, ...),
`messages` (keys whose value is None dropped, reasoning aliases filled in), `tools`, `documents`,
`add_generation_prompt`, and any extra keyword such as Qwen3's `enable_thinking`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import read_json_object
from pipeline.core.layout import CHAT_TEMPLATE, TOKENIZER_CONFIG

CONFIG_FILE = TOKENIZER_CONFIG
TEMPLATE_FILE = CHAT_TEMPLATE
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named special tokens a template can read
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_STAND_IN = "\x00stagepipe stand-in reply\x00"  # an assistant turn's content no real text contains


def chat_messages(prompt: str, system: str | None = None) -> list[dict]:
    """The conversation for one user prompt, with a system turn first when --system TEXT is given."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": prompt}]


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML and sorts keys; chat templates expect plain json.dumps
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile(source: str):
    """jinja2 Template for a chat template (raises jinja2.TemplateSyntaxError)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_message(message) -> dict:
    if not isinstance(message, dict):
        raise StagepipeError(f"chat message {message!r} is not a dict with 'role' and 'content'")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
    if reasoning is not None:  # templates read reasoning under different names (as transformers fills them in)
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _read_config(path: Path) -> dict:
    return read_json_object(path, "restore the checkpoint's copy")


def _config_template(config: dict, path: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is the chat template
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise StagepipeError(f"{path}: chat_template lists templates {sorted(map(str, named))} but none is named "
                                 "'default'; add one named 'default' or a chat_template.jinja beside it")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise StagepipeError(f"{path}: chat_template is a {type(template).__name__}, expected a string; "
                             "restore the checkpoint's tokenizer_config.json")
    return template


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja text
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token/eos_token/... that are set
    origin: str = "<string>"  # the file it came from, for messages

    @classmethod
    def load(cls, folder) -> "ChatTemplate":
        """The chat template of a checkpoint or onnx_dir folder; StagepipeError when it has none or it is broken."""
        folder = Path(folder)
        if not folder.is_dir():
            raise StagepipeError(f"{folder}: not a folder; point at the checkpoint or onnx_dir folder")
        config_path, template_path = folder / CONFIG_FILE, folder / TEMPLATE_FILE
        config = _read_config(config_path) if config_path.is_file() else {}
        special = {name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name))) is not None}
        if template_path.is_file():
            try:
                source, origin = template_path.read_text(encoding="utf-8"), template_path
            except (OSError, UnicodeDecodeError) as e:
                raise StagepipeError(f"{template_path}: cannot read it ({e}); restore the checkpoint's copy") from None
        else:
            source, origin = _config_template(config, config_path), config_path
        if not source:
            where = config_path if config_path.is_file() else folder
            raise StagepipeError(f"{where}: the checkpoint has no chat template (no chat_template in {CONFIG_FILE}, "
                                 f"no {TEMPLATE_FILE}); it is not a chat model: run without --chat")
        template = cls(source, special, str(origin))
        template._compiled  # compile now: a broken template is reported when it is loaded
        return template

    @cached_property
    def _compiled(self):
        import jinja2

        try:
            return _compile(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise StagepipeError(f"{self.origin}: the chat template does not compile (line {e.lineno}: {e.message}); "
                                 "restore the checkpoint's template") from None

    @cached_property
    def variables(self) -> frozenset[str]:
        """Names the template reads from its context (e.g. 'enable_thinking' for Qwen3's)."""
        import jinja2.meta

        env = self._compiled.environment
        return frozenset(jinja2.meta.find_undeclared_variables(env.parse(self.source)))

    def render(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text; keyword arguments (enable_thinking=False, tools=[...], ...) go to the template."""
        messages = [_template_message(m) for m in messages]
        if not messages:
            raise StagepipeError("cannot render a chat template for an empty conversation")
        context = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except Exception as e:  # the template is the checkpoint's code: any failure in it is reported as one line
            raise StagepipeError(f"{self.origin}: the chat template failed to render these messages "
                                 f"({type(e).__name__}: {e})") from None

    def switches(self, no_think: bool = False) -> dict:
        """Template keywords for --no_think (Qwen3's enable_thinking=False); a template without it is refused."""
        if not no_think:
            return {}
        if "enable_thinking" not in self.variables:
            raise StagepipeError(f"--no_think: the chat template in {self.origin} has no enable_thinking switch "
                                 "(Qwen3's has); run without --no_think")
        return {"enable_thinking": False}

    def prompt(self, user_text: str, system: str | None = None, no_think: bool = False) -> str:
        """What --chat sends: [--system turn,] the user turn, the assistant turn opened."""
        return self.render(chat_messages(user_text, system), add_generation_prompt=True, **self.switches(no_think))

    def continuation(self, messages, cached_text: str, stop_text: str | None = None, **kwargs) -> tuple[str, str]:
        """The text a new user turn adds to a conversation whose cache holds cached_text -> (text, rule).

        messages: the whole conversation, the new user turn last, the replies as the model wrote them (stop token
        left out); stop_text: the text of the stop token the last reply ended with (None: it did not stop at one).
        Rule "exact": the rendering of the whole conversation starts with cached_text; the text is the rest.
        Rule "new_turn" otherwise (Qwen3 re-renders earlier replies without their think blocks, and without the
        empty one --no_think put before them): the cache is kept as it is, and the text is what the template
        writes after a reply (its closing, less a stop token the model already wrote) up to the new assistant
        turn, taken from a rendering with a stand-in exchange before the new user turn.
        """
        full = self.render(messages, add_generation_prompt=True, **kwargs)
        if full.startswith(cached_text):
            return full[len(cached_text):], "exact"
        system = [messages[0]] if messages[0].get("role") == "system" else []
        stand_in = system + [{"role": "user", "content": "?"}, {"role": "assistant", "content": _STAND_IN}]
        rendered = self.render(stand_in + [messages[-1]], add_generation_prompt=True, **kwargs)
        if rendered.count(_STAND_IN) != 1:
            raise StagepipeError(f"{self.origin}: the chat template changes a reply's text, so a turn cannot be "
                                 "added over the cache; replay the conversation in a new run (--messages)")
        text = rendered[rendered.index(_STAND_IN) + len(_STAND_IN):]
        if stop_text and text.startswith(stop_text):
            text = text[len(stop_text):]
        return text, "new_turn"
