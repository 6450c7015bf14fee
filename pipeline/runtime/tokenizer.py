"""The tokenizer a run uses: a checkpoint's tokenizer.json through HuggingFace `tokenizers`, with token text
shown byte-exact (a token that is part of a UTF-8 character shows as escaped bytes)."""
from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import StagepipeError
from pipeline.core.layout import TOKENIZER_JSON

IM_END = "<|im_end|>"
EMPTY_THINK_BLOCK = "<think>\n\n</think>\n\n"  # what Qwen3's template adds when enable_thinking=False


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def load_optional_tokenizer(path_or_dir) -> "Tokenizer | None":
    """Tokenizer.load(path_or_dir), or None when there is no tokenizer.json there (a corrupt one still raises)."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / TOKENIZER_JSON
    return Tokenizer.load(path) if path.is_file() else None


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` (chat prompts: runtime/chat_template.py)."""

    def __init__(self, tokenizer, source: str = "<memory>"):
        self._tk = tokenizer
        self.source = source
        self._added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}

    @classmethod
    def load(cls, path_or_dir) -> "Tokenizer":
        """Load tokenizer.json (a file, or a folder that holds one)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path_or_dir)
        if path.is_dir():
            path = path / TOKENIZER_JSON
        if not path.is_file():
            raise StagepipeError(f"{path}: tokenizer.json not found; point at a checkpoint folder that has one "
                                 "(python -m pipeline.demo writes one for the demo model)")
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception for any parse problem
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StagepipeError(f"{path}: not a valid tokenizer.json ({first_line}); re-download or rewrite it") from None
        return cls(tk, str(path))

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (151669 for Qwen3)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of text; added/special tokens written in the text (e.g. <|im_start|>) become their ids."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ids. Ids past the tokenizer's vocabulary (a model's embedding table is often padded: Qwen3 has
        151936 rows for 151669 tokens, and an untrained model can pick them) show as <unused id N>."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i < 0]
        if bad:
            raise StagepipeError(f"token id {bad[0]} is negative; token ids are 0..{self.vocab_size - 1}")
        parts, run = [], []
        for i in ids + [None]:
            if i is not None and i < self.vocab_size:
                run.append(i)
                continue
            if run:
                parts.append(self._tk.decode(run, skip_special_tokens=skip_special_tokens))
                run = []
            if i is not None:
                parts.append(f"<unused id {i}>")
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def token_text(self, token_id: int) -> str:
        """One token shown as text; a token that is only part of a UTF-8 character shows as escaped bytes (\\xe4)."""
        token_id = int(token_id)
        piece = self._tk.id_to_token(token_id)
        if piece is None:
            return f"<unused id {token_id}>"
        if piece in self._added:
            return piece
        try:
            raw = bytes(UNICODE_TO_BYTE[c] for c in piece)
        except KeyError:  # not a byte-level vocabulary: show the piece as stored
            return piece
        return raw.decode("utf-8", errors="backslashreplace")
