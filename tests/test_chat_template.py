"""Chat templates as the checkpoint defines them: same text and token ids as transformers' apply_chat_template.

The published Qwen1.5 / Qwen2.5 / Qwen3 templates (tests/fixtures/chat_templates, sources in its README) are put
into copies of the Qwen3 tokenizer folder the project builds; transformers' AutoTokenizer on the same folder is the
oracle.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from pipeline.core.errors import StagepipeError
from pipeline.runtime.chat_template import ChatTemplate, chat_messages
from pipeline.demo.tokenizer_files import QWEN3_CHAT_TEMPLATE, qwen3_tokenizer_config, write_qwen3_tokenizer
from pipeline.runtime.tokenizer import EMPTY_THINK_BLOCK, Tokenizer

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
FAMILIES = ("qwen1.5", "qwen2.5", "qwen3")
DEFAULT_SYSTEM = {  # what each template adds when the conversation has no system turn
    "qwen1.5": "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n",
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
    "qwen3": "",
}
USER = "Write 你好 twice, then say why. <b>&'quotes'</b>"
CONVERSATIONS = {
    "user": chat_messages(USER),
    "system+user": chat_messages(USER, system="You are terse."),
    "multi-turn": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                   {"role": "user", "content": "And times 3?"}],
}
MSG = [{"role": "user", "content": "x"}]


def fixture_template(family: str) -> str:
    return (FIXTURES / f"{family}.jinja").read_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return write_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3-tokenizer"))


@pytest.fixture(scope="module")
def make_checkpoint(base_dir, tmp_path_factory):
    """(name, **tokenizer_config changes) -> a folder with the Qwen3 tokenizer.json and the changed config."""

    def make(name: str, jinja_file: str | None = None, **changes) -> Path:
        out = tmp_path_factory.mktemp(name)
        shutil.copy(base_dir / "tokenizer.json", out / "tokenizer.json")
        config = {**qwen3_tokenizer_config(), **changes}
        config = {k: v for k, v in config.items() if v is not ...}  # ... removes a key
        (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
        if jinja_file is not None:
            (out / "chat_template.jinja").write_text(jinja_file, encoding="utf-8")
        return out

    return make


@pytest.fixture(scope="module")
def tok(base_dir) -> Tokenizer:
    return Tokenizer.load(base_dir)


@pytest.fixture(scope="module")
def families(make_checkpoint):
    """family -> (ours: ChatTemplate, oracle: transformers tokenizer), each loaded once."""
    cache = {}

    def get(family: str):
        if family not in cache:
            folder = make_checkpoint(family, chat_template=fixture_template(family))
            cache[family] = ChatTemplate.load(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
        return cache[family]

    return get


def fixed_qwen3_prompt(user: str, system: str | None = None) -> str:
    """What --chat sent before it rendered the checkpoint's template: Qwen3's format, whatever the checkpoint."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def hf_render(hf, messages, add_generation_prompt=True, **kwargs):
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                 return_dict=False, **kwargs)
    return text, ids


def test_fixtures_are_the_published_templates():
    # sizes and ends of the published strings (the README names where each was read)
    assert [len(fixture_template(f)) for f in FAMILIES] == [327, 2507, 4168]
    assert fixture_template("qwen2.5").endswith("{%- endif %}\n")
    assert fixture_template("qwen3").endswith("{%- endif %}")


def test_demo_tokenizer_config_carries_the_real_qwen3_template(base_dir):
    assert QWEN3_CHAT_TEMPLATE == fixture_template("qwen3")
    assert qwen3_tokenizer_config()["chat_template"] == fixture_template("qwen3")
    written = json.loads((base_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert written["chat_template"] == fixture_template("qwen3")
    assert ChatTemplate.load(base_dir).source == fixture_template("qwen3")


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_same_text_and_ids_as_transformers(families, tok, family, conversation):
    ours, hf = families(family)
    messages = CONVERSATIONS[conversation]
    text = ours.render(messages)
    hf_text, hf_ids = hf_render(hf, messages)
    assert text == hf_text
    assert tok.encode(text) == hf_ids
    system = "" if conversation == "system+user" else DEFAULT_SYSTEM[family]
    assert text.startswith(system + "<|im_start|>") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    if conversation != "multi-turn":
        system = messages[0]["content"] if len(messages) == 2 else None
        assert ours.prompt(USER, system=system) == text
        # the fixed Qwen3 string --chat used to send misses Qwen1.5/2.5's default system turn
        assert (text == fixed_qwen3_prompt(USER, system=system)) == (family == "qwen3" or system is not None)


def test_issue_14_prompt_lengths(families, tok):
    """The report: --chat sent 18 ids where transformers gives 39 (Qwen2.5) and 28 (Qwen1.5)."""
    prompt = "Give me a short introduction to large language model."
    assert len(tok.encode(fixed_qwen3_prompt(prompt))) == 18
    for family, n in (("qwen2.5", 39), ("qwen1.5", 28), ("qwen3", 18)):
        ours, hf = families(family)
        ids = tok.encode(ours.prompt(prompt))
        assert len(ids) == n and ids == hf_render(hf, chat_messages(prompt))[1]


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_qwen3_enable_thinking(families, tok, enable_thinking):
    ours, hf = families("qwen3")
    messages = CONVERSATIONS["system+user"]
    text = ours.render(messages, enable_thinking=enable_thinking)
    hf_text, hf_ids = hf_render(hf, messages, enable_thinking=enable_thinking)
    assert text == hf_text and tok.encode(text) == hf_ids
    assert text.endswith("<|im_start|>assistant\n" + ("" if enable_thinking else EMPTY_THINK_BLOCK))
    assert ours.prompt(USER, system="You are terse.", no_think=not enable_thinking) == text


def test_qwen3_drops_earlier_reasoning_from_history(families, tok):
    ours, hf = families("qwen3")
    think = "<think>\nThe user wants a sum: 2+2=4.\n</think>\n\n4."
    history = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": think},
               {"role": "user", "content": "And times 3?"}]
    text = ours.render(history)
    hf_text, hf_ids = hf_render(hf, history)
    assert text == hf_text and tok.encode(text) == hf_ids
    assert "2+2=4" not in text and "<think>" not in text
    assert "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd times 3?" in text
    # an assistant turn after the last user turn keeps its reasoning
    text = ours.render(history[:2], add_generation_prompt=False)
    hf_text, hf_ids = hf_render(hf, history[:2], add_generation_prompt=False)
    assert text == hf_text and tok.encode(text) == hf_ids
    assert text.endswith("<|im_start|>assistant\n" + think + "<|im_end|>\n")
    # reasoning given as a field instead of inline (None-valued keys are dropped, as transformers does)
    split = history[:1] + [{"role": "assistant", "content": "4.", "reasoning_content": "2+2=4", "tool_calls": None}]
    text = ours.render(split, add_generation_prompt=False)
    assert text == hf_render(hf, split, add_generation_prompt=False)[0]
    assert text.endswith("<|im_start|>assistant\n<think>\n2+2=4\n</think>\n\n4.<|im_end|>\n")


@pytest.mark.parametrize("ended", ["eos", "max_steps"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_new_turn_adds_what_the_whole_conversation_renders(families, tok, family, ended):
    """Over a cache holding turn 0's prompt and reply (its stop token included when it stopped at one), a new user
    turn adds exactly the rest of the template's rendering of the whole conversation, with the same ids."""
    ours, hf = families(family)
    reply = "It is 4, 你好."
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": reply},
                {"role": "user", "content": "And times 3?"}]
    cached = ours.render(messages[:1]) + reply + ("<|im_end|>" if ended == "eos" else "")
    text, rule = ours.continuation(messages, cached, "<|im_end|>" if ended == "eos" else None)
    hf_text, hf_ids = hf_render(hf, messages)
    assert rule == "exact" and cached + text == hf_text
    assert text.startswith("\n<|im_start|>user" if ended == "eos" else "<|im_end|>\n<|im_start|>user")
    assert tok.encode(cached) + tok.encode(text) == hf_ids  # the pieces meet at a special token


@pytest.mark.parametrize("no_think", [False, True])
def test_qwen3_new_turn_keeps_the_cache_when_the_template_rewrites_history(families, tok, no_think):
    """Qwen3 re-renders an earlier reply without its think block (and without the empty one --no_think put
    before it): the cache is no prefix of that rendering, so a new turn adds the template's closing of the reply
    and its rendering of the new user turn; the cache keeps what the model saw."""
    ours, hf = families("qwen3")
    kwargs = {"enable_thinking": False} if no_think else {}
    reply = "4." if no_think else "<think>\n2+2=4\n</think>\n\n4."
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": reply},
                {"role": "user", "content": "And times 3?"}]
    cached = ours.render(messages[:1], **kwargs) + reply + "<|im_end|>"
    text, rule = ours.continuation(messages, cached, "<|im_end|>", **kwargs)
    hf_text = hf_render(hf, messages, **kwargs)[0]
    assert rule == "new_turn" and not hf_text.startswith(cached)
    new_turn = "\n<|im_start|>user\nAnd times 3?<|im_end|>\n<|im_start|>assistant\n"
    assert text == new_turn + ("<think>\n\n</think>\n\n" if no_think else "") and hf_text.endswith(text)
    # a reply cut short (no stop token) gets the template's closing first
    text, rule = ours.continuation(messages, cached[:-len("<|im_end|>")], None, **kwargs)
    assert rule == "new_turn" and text.startswith("<|im_end|>" + new_turn)


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_tools_and_tool_calls_match_transformers(families, tok, family):
    ours, hf = families(family)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Wetter für Zürich <heute> & 'morgen'",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}}]
    messages = [{"role": "user", "content": "Weather in Zürich?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function",
                                 "function": {"name": "get_weather", "arguments": {"days": 2, "city": "Zürich"}}}]},
                {"role": "tool", "content": "{\"temp\": 21}"}]
    text = ours.render(messages, tools=tools)
    hf_text, hf_ids = hf_render(hf, messages, tools=tools)
    assert text == hf_text and tok.encode(text) == hf_ids
    # tojson as transformers': no HTML escaping, non-ASCII kept, keys in the given order
    assert "Wetter für Zürich <heute> & 'morgen'" in text
    assert '{"days": 2, "city": "Zürich"}' in text


def test_filters_globals_and_special_tokens_match_transformers(families, tok):
    _, hf = families("qwen3")
    source = ("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ tools }}|"
              "{{ x | tojson }}|{{ x | tojson(indent=2) }}|"
              "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}|"
              "{{ messages[0].name is defined }}|{{ messages[1].thinking }}/{{ messages[1].reasoning_content }}|\n"
              "{% for m in messages %}\n    {% if m.role == 'user' %}\n  {{ m.role }}\n    {% endif %}\n{% endfor %}")
    ours = ChatTemplate(source, ChatTemplate.load(hf.name_or_path).special_tokens)
    x = {"b": "ü<>&", "a": [1, 2.5, None, True]}
    messages = [{"role": "user", "content": "first", "name": None},
                {"role": "assistant", "content": "second", "reasoning": "why"}]
    text = ours.render(messages, x=x)
    assert text == hf.apply_chat_template(messages, chat_template=source, tokenize=False, x=x)
    assert text.startswith('|<|im_end|>|<|endoftext|>||None|{"b": "ü<>&", "a": [1, 2.5, null, true]}|{\n  "b"')
    # loopcontrols; None-valued keys dropped; reasoning aliases; trim_blocks + lstrip_blocks
    assert text.endswith("|first|False|why/why|\n  user\n")
    before = datetime.now().strftime("%Y-%m-%d")
    today = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}").render(MSG)
    assert today in {before, datetime.now().strftime("%Y-%m-%d")}


def test_added_token_dicts_list_templates_and_jinja_file(make_checkpoint, tok):
    eos = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
           "rstrip": False, "single_word": False, "special": True}
    source = "{{ bos_token }}+{{ eos_token }}+{{ messages[0].content }}"
    folder = make_checkpoint("named", eos_token=eos, bos_token="<|endoftext|>",
                             chat_template=[{"name": "tool_use", "template": "tools!"},
                                            {"name": "default", "template": source}])
    ours = ChatTemplate.load(folder)
    assert ours.special_tokens == {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                                   "pad_token": "<|endoftext|>"}
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.render(MSG) == hf.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True)
    assert ours.render(MSG) == "<|endoftext|>+<|im_end|>+x"
    # chat_template.jinja beside tokenizer_config.json wins, as in transformers
    folder = make_checkpoint("jinja-file", jinja_file=fixture_template("qwen2.5"))
    ours = ChatTemplate.load(folder)
    assert ours.origin.endswith("chat_template.jinja")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    text, ids = hf_render(hf, MSG)
    assert ours.render(MSG) == text and text.startswith(DEFAULT_SYSTEM["qwen2.5"]) and tok.encode(text) == ids


def _one_line_error(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(StagepipeError, match=match) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_errors_are_one_clear_line(make_checkpoint, families, tmp_path):
    no_template = make_checkpoint("no-template", chat_template=...)
    msg = _one_line_error("no chat template", ChatTemplate.load, no_template)
    assert "tokenizer_config.json" in msg and "--chat" in msg
    _one_line_error("no chat template", ChatTemplate.load, tmp_path)  # an empty folder
    _one_line_error("not a folder", ChatTemplate.load, tmp_path / "missing")
    _one_line_error(r"none is named 'default'", ChatTemplate.load,
                    make_checkpoint("no-default", chat_template=[{"name": "tool_use", "template": "x"}]))
    _one_line_error(r"does not compile \(line 1", ChatTemplate.load,
                    make_checkpoint("broken", chat_template="{% for m in messages %}{{ m.content }}"))
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": ')
    _one_line_error("cannot read it as JSON", ChatTemplate.load, tmp_path)

    raising = ChatTemplate("{{ raise_exception('Conversation roles must alternate user/assistant/user') }}")
    _one_line_error("roles must alternate", raising.render, MSG)
    _one_line_error("SecurityError", ChatTemplate("{{ messages.append(1) }}").render, MSG)  # immutable sandbox
    _one_line_error("SecurityError", ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render, MSG)
    _one_line_error("empty conversation", ChatTemplate("x").render, [])
    qwen25, _ = families("qwen2.5")
    _one_line_error("no enable_thinking switch", qwen25.prompt, "hi", no_think=True)


def test_chat_messages():
    assert chat_messages("hi") == [{"role": "user", "content": "hi"}]
    assert chat_messages("hi", system="Be brief.") == [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "hi"}]
