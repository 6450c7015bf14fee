"""Last stage: final norm + lm_head -> logits.npy, then the next token (next_token_id.txt, next_token.txt)."""
from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import cli_entry
from pipeline.core.tensors import parse_token_ids
from pipeline.runtime.stage_ops import context_from_siblings, load_meta, output
from pipeline.runtime.tokenizer import load_optional_tokenizer
from stages.common import open_backend, stage_parser, step_paths
from stages.token_embed import add_sampling_args, sampling_from_args


@cli_entry
def main(argv=None):
    p = stage_parser("python -m stages.output", __doc__.split("\n")[0])
    p.add_argument("--hidden_in", type=Path, default=None, help="default STEP_DIR/hidden_block{N}.npy")
    p.add_argument("--logits", type=Path, default=None, help="default STEP_DIR/logits.npy")
    p.add_argument("--next_token_file", type=Path, default=None, help="default STEP_DIR/next_token_id.txt")
    p.add_argument("--full_logits", action="store_true", help="prefill: logits for all T rows, not just the last")
    p.add_argument("--context_ids", type=Path, default=None,
                   help="with a repetition penalty: the token ids in the cache before this step (default: the "
                        "input ids of the sibling folders step_0000 .. step_{N-1})")
    add_sampling_args(p)
    a = p.parse_args(argv)
    backend = open_backend(a)
    paths = step_paths(a, logits=a.logits, next_token_file=a.next_token_file)
    meta = load_meta(paths.meta)
    sampling = sampling_from_args(a, base=meta.sampling)
    context = None
    if (sampling or meta.sampling).repetition_penalty != 1.0 and meta.sample_next:
        context = parse_token_ids(a.context_ids) if a.context_ids else context_from_siblings(a.step_dir,
                                                                                            meta.past_len)
    tok = load_optional_tokenizer(a.onnx_dir)
    meta = output(backend, paths, sampling, a.hidden_in, tok.token_text if tok else None, a.full_logits, context)
    if meta.next_token_id is None:
        print(f"{a.step_dir}: logits written (prompt chunk: the next step takes more prompt tokens)")
    else:
        shown = tok.token_text(meta.next_token_id) if tok else ""
        print(f"{a.step_dir}: next token {meta.next_token_id} {shown!r}")


if __name__ == "__main__":
    main()
