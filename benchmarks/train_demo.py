"""Train the demo model: a small Qwen3ForCausalLM on this Python's standard library sources (2 CPU cores, ~25 min).

    python -m benchmarks.train_demo                  # writes pipeline/demo/trained/ and docs/demo-training*.{json,png}
    python -m benchmarks.train_demo --steps 20 --out /tmp/t    # a quick try

The model is Qwen3 in miniature (4 layers, hidden 192, 6 query / 2 KV heads of head_dim 64 — head_dim is not
hidden/heads, as in real Qwen3) with the real Qwen tokenizer and tied embeddings. Only tokens that occur at least
MIN_COUNT times in the training text get an embedding row; `pipeline.demo.trained_model` gives every other id of the
151,936-row vocabulary a zero row. A zero row's logit is exactly 0, so training uses the same softmax the expanded
model computes: the compact vocabulary plus one extra column, fixed at logit 0 + log(number of zero rows), that
stands for all the rest. Held-out loss is therefore the expanded model's own loss, comparable with the unigram
baseline over the whole vocabulary. torch and transformers are needed here only (the test extra has them).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from benchmarks import demo_corpus
from pipeline.demo import trained_model

SEQ = 512
BATCH = 8
MIN_COUNT = 5
EOT = 151643  # <|endoftext|> separates files
NEWLINE = 198  # "\n"
LINE_SPLIT_SHARE = 0.25


def tokenize(files, tokenizer, line_split=()) -> np.ndarray:
    """The files' token ids, each file followed by <|endoftext|>. Files in line_split are encoded line by line
    with a bare "\n" token between lines: a prompt ends mid-text without its newline ("def f(x):" is the token
    "):" where the source has "):\n"), and the model should have seen such endings continue."""
    ids = []
    for path in files:
        text = demo_corpus.read(path)
        if path in line_split:
            for enc in tokenizer.encode_batch(text.split("\n")):
                ids.extend(enc.ids)
                ids.append(NEWLINE)
        else:
            ids.extend(tokenizer.encode(text).ids)
        ids.append(EOT)
    return np.asarray(ids, dtype=np.int64)


def unigram_perplexity(train_ids: np.ndarray, held_ids: np.ndarray) -> float:
    """Add-one smoothed unigram over the tokenizer's ids, counted on the training text."""
    counts = np.bincount(train_ids, minlength=trained_model.VOCAB).astype(np.float64)
    probs = (counts + 1.0) / (counts.sum() + trained_model.VOCAB)
    return float(np.exp(-np.log(probs[held_ids]).mean()))


def build_model(n_rows: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = trained_model.model_config()
    cfg.update(vocab_size=n_rows + 1, pad_token_id=n_rows, bos_token_id=None, eos_token_id=None)
    model = Qwen3ForCausalLM(Qwen3Config(**cfg))
    with torch.no_grad():
        model.model.embed_tokens.weight[n_rows].zero_()  # the "every other token" row: a zero row, as expanded
    return model


def loss_fn(model, batch: torch.Tensor, log_rest: float) -> torch.Tensor:
    """Mean negative log-likelihood per token under the expanded model's softmax."""
    logits = model(input_ids=batch[:, :-1]).logits
    logits[..., -1] += log_rest  # one column stands for all zero rows: each has logit 0
    targets = batch[:, 1:].reshape(-1)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="none")
    # the column gives the probability of "some zero-row token"; a target among them is one of n_rest: add
    # log(n_rest) back (a constant: the gradient is unchanged)
    return (nll + (targets == logits.shape[-1] - 1) * log_rest).mean()


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, log_rest: float) -> float:
    model.eval()
    losses = [loss_fn(model, windows[i:i + BATCH], log_rest).item() for i in range(0, len(windows), BATCH)]
    model.train()
    return float(np.mean(losses))


def learning_rate(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def plot_curve(record: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in record["train_curve"]], [p[1] for p in record["train_curve"]], label="training batch", alpha=0.6)
    ax.plot([p[0] for p in record["held_out_curve"]], [p[1] for p in record["held_out_curve"]], "o-", label="held-out")
    ax.axhline(math.log(record["unigram_perplexity"]), color="grey", ls="--", label="unigram baseline")
    ax.set_xlabel(f"step ({BATCH} x {SEQ} tokens)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("demo Qwen3 on the Python standard library")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=620)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval_every", type=int, default=50)
    ap.add_argument("--held_out_windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=trained_model.WEIGHTS_DIR, help="folder for the compact weights")
    ap.add_argument("--docs", type=Path, default=Path("docs"), help="folder for the training record and loss plot")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    from tokenizers import Tokenizer
    from pipeline.demo.tokenizer_files import build_qwen3_tokenizer_json
    tokenizer = Tokenizer.from_str(json.dumps(build_qwen3_tokenizer_json()))
    train_files, held_files = demo_corpus.split_files()
    t0 = time.time()
    line_split = {p for p in train_files if rng.random() < LINE_SPLIT_SHARE}
    train_ids, held_ids = tokenize(train_files, tokenizer, line_split), tokenize(held_files, tokenizer)
    print(f"corpus: {len(train_files)} training files ({len(train_ids)} tokens), {len(held_files)} held out "
          f"({len(held_ids)} tokens), tokenized in {time.time() - t0:.0f} s", flush=True)

    counts = Counter(train_ids.tolist())
    kept = np.array(sorted({t for t, c in counts.items() if c >= MIN_COUNT} | set(trained_model.SPECIAL_IDS)))
    compact = np.full(trained_model.VOCAB, len(kept), dtype=np.int64)  # full id -> row; len(kept) = "the rest"
    compact[kept] = np.arange(len(kept))
    log_rest = math.log(trained_model.VOCAB - len(kept))
    unigram = unigram_perplexity(train_ids, held_ids)
    print(f"{len(kept)} embedding rows (tokens seen >= {MIN_COUNT} times); unigram held-out perplexity {unigram:.1f}",
          flush=True)

    train_c, held_c = torch.from_numpy(compact[train_ids]), torch.from_numpy(compact[held_ids])
    n_held = min(args.held_out_windows, len(held_c) // (SEQ + 1))
    held_windows = held_c[: n_held * (SEQ + 1)].view(n_held, SEQ + 1)

    model = build_model(len(kept))
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    emb = model.model.embed_tokens.weight
    record = {"corpus": demo_corpus.describe(), "train_tokens": int(len(train_ids)), "held_out_tokens": int(len(held_ids)),
              "rows": int(len(kept)), "min_count": MIN_COUNT, "line_split_files": len(line_split), "seq": SEQ, "batch": BATCH, "steps": args.steps,
              "lr": args.lr, "seed": args.seed, "unigram_perplexity": unigram, "train_curve": [], "held_out_curve": []}
    t0 = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        starts = rng.integers(0, len(train_c) - SEQ - 1, size=BATCH)
        batch = torch.stack([train_c[s:s + SEQ + 1] for s in starts])
        loss = loss_fn(model, batch, log_rest)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            emb[len(kept)].zero_()
        if step % 10 == 0:
            record["train_curve"].append((step, round(loss.item(), 4)))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            held = held_out_loss(model, held_windows, log_rest)
            record["held_out_curve"].append((step + 1, round(held, 4)))
            print(f"step {step + 1}/{args.steps}  train {loss.item():.3f}  held-out {held:.3f} "
                  f"(perplexity {math.exp(held):.1f})  {time.time() - t0:.0f} s", flush=True)
    record["train_seconds"] = round(time.time() - t0, 1)
    record["held_out_loss"] = record["held_out_curve"][-1][1]
    record["held_out_perplexity"] = round(math.exp(record["held_out_loss"]), 2)
    record["torch"] = torch.__version__

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][: len(kept)]
    trained_model.save_compact(args.out, state, kept)
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "demo-training.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_curve(record, args.docs / "demo-training-loss.png")
    print(f"held-out perplexity {record['held_out_perplexity']} (unigram {unigram:.1f}); weights in {args.out}, "
          f"record and plot in {args.docs}")


if __name__ == "__main__":
    main()
