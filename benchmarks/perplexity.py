"""Perplexity through the split graphs: teacher-forced chunked prefill, every position's logits scored.

    python -m benchmarks.perplexity --onnx_dir DIR --text FILE [FILE ...] [--max_tokens 4096] [--context 512]
    python -m benchmarks.perplexity --onnx_dir DIR --held_out      # the trained demo's held-out stdlib files

Each text is tokenized with the onnx_dir's tokenizer and cut into segments of --context tokens (at most the cache
length C; default 512, the length the demo model was trained on); each segment starts from an empty cache and is prefilled T tokens at a time (as a run's prompt is), the output graph
giving the logits of every real row. Perplexity = exp(mean negative log-likelihood of tokens 2..n of each segment),
so any precision, any onnx_dir (QDQ, mixed, hybrid-converted) is judged by the number users know.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.core.atomic import write_json
from pipeline.core.cli_args import ArgumentParser, read_text_file
from pipeline.core.errors import StagepipeError, cli_entry


def chunk_logits(backend, token_ids: list[int]):
    """Yield the (len(chunk), V) logits of each prefill chunk of token_ids (at most the cache length C)."""
    from pipeline.runtime.generate import MemoryKVCache, forward_step, prompt_chunks

    m = backend.manifest
    if len(token_ids) > m.max_cache_len:
        raise StagepipeError(f"{len(token_ids)} tokens do not fit the cache ({m.max_cache_len} slots)")
    cache, past_len = MemoryKVCache(m), 0
    for chunk in prompt_chunks(token_ids, m.max_input_len):
        yield forward_step(backend, cache, chunk, past_len, all_rows=True)
        past_len += len(chunk)


def all_position_logits(onnx_dir: Path, token_ids: list[int]) -> np.ndarray:
    """(len(token_ids), V) logits of every position, prefill chunk by chunk."""
    from pipeline.runtime.backends import OnnxBackend

    return np.concatenate(list(chunk_logits(OnnxBackend(onnx_dir), token_ids)))


def segment_nll(backend, token_ids: list[int]) -> np.ndarray:
    """Negative log-likelihood of tokens 1..n-1 of one segment given the tokens before them."""
    nll, start = [], 0
    for logits in chunk_logits(backend, token_ids):
        logits = logits.astype(np.float64)
        top = logits.max(-1, keepdims=True)
        log_z = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
        rows = np.arange(len(logits))
        targets = np.asarray(token_ids[start + 1:start + 1 + len(logits)])
        n = len(targets)  # the last row of the last chunk has no next token
        nll.append(log_z[:n] - logits[rows[:n], targets])
        start += len(logits)
    return np.concatenate(nll)


def perplexity(onnx_dir: Path, texts: list[str], max_tokens: int, context: int = 512) -> dict:
    from pipeline.runtime.backends import OnnxBackend
    from pipeline.runtime.tokenizer import Tokenizer

    backend, tokenizer = OnnxBackend(onnx_dir), Tokenizer.load(onnx_dir)
    C, nll, budget = min(context, backend.manifest.max_cache_len), [], max_tokens
    for text in texts:
        ids = tokenizer.encode(text)[:budget]
        budget -= len(ids)
        nll.extend(segment_nll(backend, ids[i:i + C]) for i in range(0, len(ids), C) if len(ids[i:i + C]) > 1)
        if budget <= 0:
            break
    if not nll:
        raise StagepipeError("the texts hold fewer than 2 tokens; give longer --text files")
    nll = np.concatenate(nll)
    return {"onnx_dir": str(onnx_dir), "scored_tokens": int(len(nll)), "context": C, "mean_nll": float(nll.mean()),
            "perplexity": float(math.exp(nll.mean()))}


def held_out_texts() -> list[str]:
    from benchmarks import demo_corpus

    return [demo_corpus.read(p) for p in demo_corpus.split_files()[1]]


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.perplexity", description=__doc__.split("\n")[0])
    p.add_argument("--onnx_dir", required=True, help="converted graphs (any precision)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", help="UTF-8 text files to score")
    src.add_argument("--held_out", action="store_true", help="the trained demo model's held-out stdlib files")
    p.add_argument("--max_tokens", type=int, default=4096, help="score at most this many tokens (default 4096)")
    p.add_argument("--context", type=int, default=512, help="segment length in tokens, at most the cache length "
                                                             "(default 512)")
    p.add_argument("--json", help="also write the result as JSON here")
    a = p.parse_args(argv)
    for flag, value in (("--max_tokens", a.max_tokens), ("--context", a.context)):
        if value < 2:
            p.error(f"{flag} must be at least 2 (got {value})")
    texts = held_out_texts() if a.held_out else [read_text_file(f, "--text") for f in a.text]
    result = perplexity(Path(a.onnx_dir), texts, a.max_tokens, a.context)
    print(f"perplexity {result['perplexity']:.2f} over {result['scored_tokens']} tokens in segments of "
          f"{result['context']} ({a.onnx_dir})")
    if a.json:
        write_json(a.json, result)
    return 0


if __name__ == "__main__":
    main()
